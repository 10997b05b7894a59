"""ADE20K: the SceneParsing benchmark (150 classes) and ADE20K-full (847 classes, 16-bit labels).

`ADE20K` reads the SceneParsing release (`ADEChallengeData2016`) as published. `ADE20KFull` reads
the folder written by `scaleseg prepare ade20k-full` from the full ADE20K release
(`ADE20K_2021_17_01`), whose raw `*_seg.png` files encode ~3,600 classes in colour.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from scaleseg.data.datasets.base import (
    FileSegmentation, Sample, check_root, format_values, list_pairs, read_label_file, read_lines,
)
from scaleseg.errors import DataError

# The 150 SceneParsing classes in objectInfo150 order: annotation value k is class k - 1.
ADE20K_CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass",
    "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair",
    "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field",
    "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion",
    "base", "box", "column", "signboard", "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace",
    "refrigerator", "grandstand", "path", "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway",
    "river", "bridge", "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench",
    "countertop", "stove", "palm", "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel",
    "bus", "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver",
    "airplane", "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle", "buffet",
    "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything", "swimming pool",
    "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball",
    "food", "step", "tank", "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher",
    "screen", "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan",
    "pier", "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator", "glass", "clock", "flag",
)

IMAGE_SUFFIX = ".jpg"
LABEL_SUFFIX = ".png"


def _reduce_zero_label_lut(num_classes: int, ignore_index: int) -> np.ndarray:
    """(256,) int64: 0 ("other") -> ignore, k -> k - 1 for 1..num_classes; larger values -> -1 (invalid)."""
    lut = np.full(256, -1, dtype=np.int64)
    lut[0] = ignore_index
    lut[1 : num_classes + 1] = np.arange(num_classes)
    return lut


class ADE20K(FileSegmentation):
    """ADE20K SceneParsing (MIT Scene Parsing Benchmark, `ADEChallengeData2016.zip`): 150 classes.

    Layout under `data.root` (the extracted `ADEChallengeData2016` folder)::

        images/training/ADE_train_00000001.jpg ...       (20,210 images)
        images/validation/ADE_val_00000001.jpg ...       (2,000 images)
        annotations/training/ADE_train_00000001.png ...  (one per image, same stem)
        annotations/validation/ADE_val_00000001.png ...

    Splits: `train` -> `training`, `val` -> `validation` (the folder names may be given directly).
    Every image of the split folder is a sample; an image without its annotation is an error (or
    is skipped with `data.on_bad_sample=skip`).

    Labels: 8-bit grey PNGs holding 0..150, where 0 is "other" (not one of the 150 classes).
    Loading applies reduce_zero_label through a lookup table: 0 -> 255 (ignore) and k -> k - 1, so
    classes are 0..149 in objectInfo150 order (wall, building, sky, floor, tree, ...). A value above
    150 or a 16-bit file is a `DataError` naming the file. No converter is needed.
    """

    NAME = "ade20k"
    CLASS_NAMES = ADE20K_CLASSES
    IGNORE_INDEX = 255
    LABEL_BITS = 8
    SPLITS = {"train": "training", "val": "validation"}
    LAYOUT = "ADEChallengeData2016: images/{training,validation}/*.jpg, annotations/{training,validation}/*.png"

    def __init__(self, root, split: str, on_bad_sample: str = "error") -> None:
        self._lut = _reduce_zero_label_lut(len(ADE20K_CLASSES), self.IGNORE_INDEX)
        super().__init__(root, split, on_bad_sample)

    def list_samples(self) -> list[Sample]:
        return list_pairs(self.root / "images" / self.split, self.root / "annotations" / self.split, IMAGE_SUFFIX, LABEL_SUFFIX)

    def decode_label(self, raw: np.ndarray, sample: Sample) -> np.ndarray:
        label = self._lut[raw]  # raw is uint8, so every value indexes the (256,) table
        if (label < 0).any():
            values = np.unique(raw[label < 0])
            shown = format_values(values)
            raise DataError(
                f"label {str(sample.label)!r} has {int((label < 0).sum())} pixels with values above "
                f"{len(ADE20K_CLASSES)}: {shown}. ADEChallengeData2016 annotations hold 0 (other) to 150; "
                "check that data.dataset (ade20k) matches the files (ADE20K-full needs ade20k_full and "
                "`scaleseg prepare ade20k-full`)"
            )
        return label


CLASSES_FILE = "classes.txt"


def read_classes_file(path: str | Path) -> tuple[list[int], list[str]]:
    """`classes.txt` of a prepared ADE20K-full folder -> (full indices, names), in class-id order.

    One line per class: `<new id> <TAB> <full index> <TAB> <name>`, ids 0, 1, 2, ... in order;
    lines starting with `#` are comments. Anything else is a `DataError` naming the file and line.
    """
    path = Path(path)
    full_indices: list[int] = []
    names: list[str] = []
    for number, line in enumerate(read_lines(path, "class list"), start=1):
        if line.startswith("#"):
            continue
        fields = line.split("\t")
        try:
            new_id, full = int(fields[0]), int(fields[1])
        except (ValueError, IndexError):
            raise DataError(
                f"class list {str(path)!r}, line {number}: {line!r} is not '<id><TAB><full index><TAB><name>'; "
                "rewrite it with `scaleseg prepare ade20k-full`"
            ) from None
        if new_id != len(names):
            raise DataError(
                f"class list {str(path)!r}, line {number}: class id {new_id} where {len(names)} was expected "
                "(ids must run 0, 1, 2, ... in order); rewrite it with `scaleseg prepare ade20k-full`"
            )
        full_indices.append(full)
        names.append(fields[2].strip() if len(fields) > 2 and fields[2].strip() else f"class_{full}")
    if not names:
        raise DataError(f"class list {str(path)!r} lists no classes; rewrite it with `scaleseg prepare ade20k-full`")
    return full_indices, names


class ADE20KFull(FileSegmentation):
    """ADE20K-full: the full ADE20K annotations restricted to their most frequent classes (847 by
    default, as in MaskFormer's ADE20K-Full benchmark), with 16-bit labels.

    `data.root` is the output folder of `scaleseg prepare ade20k-full --root <ADE20K_2021_17_01>
    --out <folder>` (see `scaleseg.data.prepare.ade20k_full` for how classes are chosen)::

        classes.txt                                       <id> TAB <full ADE index> TAB <name>, one per class
        class_image_counts.tsv                            training images per full ADE class (the ranking)
        images/{training,validation}/<name>.jpg           symlinks to the release's images (or copies)
        annotations/{training,validation}/<name>.png      16-bit PNG labels

    Splits: `train` -> `training`, `val` -> `validation`. Every image of the split folder is a
    sample, with the annotation of the same stem.

    Labels: 16-bit PNGs read without truncation: 0..N-1 are the classes of `classes.txt` (N is the
    number of lines there), 65535 is ignore (unlabelled pixels and every class that was not kept).
    Class names come from `classes.txt`.
    """

    NAME = "ade20k_full"
    IGNORE_INDEX = 65535
    LABEL_BITS = 16
    SPLITS = {"train": "training", "val": "validation"}
    LAYOUT = (
        "the output of `scaleseg prepare ade20k-full`: classes.txt, "
        "images/{training,validation}/*.jpg, annotations/{training,validation}/*.png"
    )

    def __init__(self, root, split: str, on_bad_sample: str = "error") -> None:
        folder = check_root(root, self.NAME, self.LAYOUT)
        classes = folder / CLASSES_FILE
        if not classes.is_file():
            raise DataError(
                f"{str(classes)!r} does not exist: data.root must be the --out folder of "
                "`scaleseg prepare ade20k-full --root <ADE20K_2021_17_01> --out <folder>`, not the raw release"
            )
        self.full_indices, self.class_names = read_classes_file(classes)
        super().__init__(root, split, on_bad_sample)

    def list_samples(self) -> list[Sample]:
        return list_pairs(self.root / "images" / self.split, self.root / "annotations" / self.split, IMAGE_SUFFIX, LABEL_SUFFIX)

    def read_label(self, sample: Sample) -> np.ndarray:
        raw = read_label_file(sample.label, self.LABEL_BITS)
        if raw.dtype == np.uint8:
            raise DataError(
                f"label {str(sample.label)!r} is an 8-bit image; ADE20K-full labels are 16-bit PNGs (class ids up "
                f"to {self.num_classes - 1}, ignore 65535), so this file cannot hold them (its 255 would read as a "
                "class). Write the folder with `scaleseg prepare ade20k-full`"
            )
        return raw
