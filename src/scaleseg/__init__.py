"""scaleseg: semantic segmentation for any number of classes on one GPU."""

__version__ = "0.1.0"
