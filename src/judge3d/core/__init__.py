"""The bottom layer: params, files, seeds, statistics, process pools, CPU numerics, resumable work.

Nothing here imports another judge3d package."""
