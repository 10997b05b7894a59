"""Pascal-Context (PASCAL VOC 2010 images, whole-scene labels): the 59-class benchmark (background
ignored) and the 60-class variant (with background), from the files `scaleseg prepare pascal-context`
writes (the same as mmsegmentation's converter writes, so folders it made are read as they are).

The benchmark keeps 59 of the 459 Pascal-Context categories, plus background. In the Detail API's
`trainval_merged.json` they are the category ids of `CONTEXT_CATEGORY_IDS`; the conversion maps them,
in ascending id order, to 0..59 (0 background), which is the order of `PASCAL_CONTEXT_CLASSES`
(the 459 categories are numbered alphabetically, so the 59 classes come out alphabetically too).
Sources (read, not copied): open-mmlab/mmsegmentation `tools/dataset_converters/pascal_context.py`
(the sorted id list and `np.digitize` to 0..59) and `mmseg/datasets/pascal_context.py`
(PascalContext59Dataset: reduce_zero_label; PascalContext60Dataset: background kept); the Detail API
(ccvl/detail-api, `Detail.getMask`: each annotation painted with its category id, 0 elsewhere).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from scaleseg.data.datasets.base import FileSegmentation, Sample, format_values, read_lines
from scaleseg.errors import ConfigError, DataError

# Detail API category id of each label 0..59 (0: background, no annotation), ascending.
CONTEXT_CATEGORY_IDS = (
    0, 2, 9, 18, 19, 22, 23, 25, 31, 33, 34, 44, 45, 46, 59, 65, 68, 72, 80, 85,
    98, 104, 105, 113, 115, 144, 158, 159, 162, 187, 189, 207, 220, 232, 258, 259, 260, 284, 295, 296,
    308, 324, 326, 347, 349, 354, 355, 360, 366, 368, 397, 415, 416, 420, 424, 427, 440, 445, 454, 458,
)
# Label 0..59: background, then the 59 classes (the Pascal-Context names of the ids above).
PASCAL_CONTEXT_CLASSES = (
    "background", "aeroplane", "bag", "bed", "bedclothes", "bench", "bicycle", "bird", "boat", "book",
    "bottle", "building", "bus", "cabinet", "car", "cat", "ceiling", "chair", "cloth", "computer",
    "cow", "cup", "curtain", "dog", "door", "fence", "floor", "flower", "food", "grass",
    "ground", "horse", "keyboard", "light", "motorbike", "mountain", "mouse", "person", "plate", "platform",
    "pottedplant", "road", "rock", "sheep", "shelves", "sidewalk", "sign", "sky", "snow", "sofa",
    "table", "track", "train", "tree", "truck", "tvmonitor", "wall", "water", "window", "wood",
)
assert len(CONTEXT_CATEGORY_IDS) == len(PASCAL_CONTEXT_CLASSES) == 60
SETTINGS = (59, 60)

LABEL_DIR = "SegmentationClassContext"  # VOC2010/SegmentationClassContext/<id>.png: 8-bit, 0..59
SPLIT_DIR = "ImageSets/SegmentationContext"  # VOC2010/ImageSets/SegmentationContext/{train,val}.txt
PREPARE_HINT = "scaleseg prepare pascal-context --voc <VOCdevkit/VOC2010> --json <trainval_merged.json>"
LAYOUT = (
    "data.root must be the folder holding VOCdevkit/ (or VOCdevkit/ itself, or VOCdevkit/VOC2010), with "
    f"VOC2010/JPEGImages/<id>.jpg, VOC2010/{LABEL_DIR}/<id>.png and VOC2010/{SPLIT_DIR}/{{train,val}}.txt "
    f"(written by `{PREPARE_HINT}`)"
)


def find_voc2010(root: str | Path, what: str = "data.root") -> Path:
    """The VOC2010 folder under `root`: root/VOCdevkit/VOC2010, root/VOC2010 or root itself (recognised
    by its JPEGImages/), or a DataError describing the layout `what` must point at."""
    root = Path(root).expanduser()
    for candidate in (root / "VOCdevkit" / "VOC2010", root / "VOC2010", root):
        if (candidate / "JPEGImages").is_dir():
            return candidate
    raise DataError(
        f"no PASCAL VOC 2010 found under {str(root)!r}: {what} must be the folder holding VOCdevkit/VOC2010 "
        "(the extracted VOCtrainval_03-May-2010.tar), or VOC2010/ itself, with JPEGImages/ in it"
    )


class PascalContext(FileSegmentation):
    """Pascal-Context (``data.dataset=pascal_context``): 59 classes (the benchmark, background ignored)
    or 60 (``data.num_classes=60``: background is class 0), ignore 255.

    Layout (``data.root`` holds ``VOCdevkit/``; ``VOCdevkit/`` or ``VOCdevkit/VOC2010`` are accepted)::

        VOC2010/JPEGImages/<id>.jpg                       the VOC 2010 images (VOCtrainval_03-May-2010.tar)
        VOC2010/SegmentationClassContext/<id>.png         8-bit labels 0..59 (0 background)
        VOC2010/ImageSets/SegmentationContext/train.txt   4,998 ids; val.txt: 5,105 ids

    The labels and lists are written once by ``scaleseg prepare pascal-context --voc <VOCdevkit/VOC2010>
    --json <trainval_merged.json>`` (or by mmsegmentation's converter: the same files).

    Labels: 0..59 in the files. 60 classes: as stored. 59 classes: reduce-zero-label, 0 (background)
    -> 255 (ignore) and k -> k - 1, so classes 0..58 are aeroplane .. wood. Any other value, or a
    16-bit file, raises `DataError` naming the file. Splits: ``train``, ``val``.
    """

    NAME = "pascal_context"
    IGNORE_INDEX = 255
    LABEL_BITS = 8
    SPLITS = {"train": "train", "val": "val"}
    LAYOUT = LAYOUT

    def __init__(self, root, split: str, on_bad_sample: str = "error", num_classes: int = 59) -> None:
        if num_classes not in SETTINGS:
            raise ConfigError(
                f"data.num_classes = {num_classes}: Pascal-Context has two settings, 59 (the benchmark: the 59 "
                "classes, background ignored) or 60 (background as class 0)"
            )
        self.class_names = list(PASCAL_CONTEXT_CLASSES[1:] if num_classes == 59 else PASCAL_CONTEXT_CLASSES)
        lut = np.full(256, -1, dtype=np.int64)  # stored value -> class; -1: not a Pascal-Context label
        if num_classes == 59:
            lut[0] = self.IGNORE_INDEX
            lut[1:60] = np.arange(59)
        else:
            lut[:60] = np.arange(60)
        self._lut = lut
        self.voc_dir = find_voc2010(root) if root is not None and Path(root).expanduser().is_dir() else None
        super().__init__(root, split, on_bad_sample)

    @classmethod
    def from_config(cls, cfg, split: str) -> "PascalContext":
        return cls(root=cfg.root, split=split, on_bad_sample=cfg.on_bad_sample, num_classes=cfg.num_classes)

    def list_samples(self) -> list[Sample]:
        split_file = self.voc_dir / SPLIT_DIR / f"{self.split}.txt"
        if not split_file.is_file():
            raise DataError(
                f"pascal_context: split list {str(split_file)!r} does not exist; the labels and split lists are "
                f"written once by `{PREPARE_HINT}`"
            )
        ids = [line.split()[0] for line in read_lines(split_file, "pascal_context split list")]
        return [Sample(i, self.voc_dir / "JPEGImages" / f"{i}.jpg", self.voc_dir / LABEL_DIR / f"{i}.png") for i in ids]

    def decode_label(self, raw: np.ndarray, sample: Sample) -> np.ndarray:
        label = self._lut[raw]  # raw is uint8: every value indexes the table
        bad = label < 0
        if bad.any():
            raise DataError(
                f"label {str(sample.label)!r} has {int(bad.sum())} pixels with values that are no Pascal-Context "
                f"label (0 background, 1..59): {format_values(np.unique(raw[bad]))}. Write the labels with `{PREPARE_HINT}`"
            )
        return label
