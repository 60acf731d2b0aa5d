"""The mini-world: procedural furniture (shapes), occupancy grids and the shared marching-cubes
decoder (voxel), oracle and validity metrics (geometry), input degradations (degrade), and the
dataset builders behind the `data` and `degrade` stages (dataset)."""
