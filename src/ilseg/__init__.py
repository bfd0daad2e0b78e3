"""ilseg: class-incremental semantic segmentation (ILT on DeepLab-v3)."""

__version__ = "0.1.0"
