"""judge3d: a swap-consistent, cross-model VLM judge for image-to-3D, and the arms it scores."""

__version__ = "0.1.0"
