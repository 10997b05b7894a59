"""Dataset families, one file each. Every dataset yields {"image", "label", "name"} dicts and has
num_classes, class_names, ignore_index and palette."""

from scaleseg.data.datasets.synthetic import SyntheticSegmentation, default_ignore_index

__all__ = ["SyntheticSegmentation", "default_ignore_index"]
