"""Cityscapes, fine annotations: 19 evaluation classes (trainIds), ignore 255."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from scaleseg.data.datasets.base import FileSegmentation, Sample, format_values
from scaleseg.errors import DataError

# The 19 evaluated classes in trainId order, their official colours, and the labelId of each.
CITYSCAPES_CLASSES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
    "motorcycle", "bicycle",
)
CITYSCAPES_PALETTE = np.array(
    [
        (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153),
        (153, 153, 153), (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152),
        (70, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142), (0, 0, 70),
        (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32),
    ],
    dtype=np.uint8,
)
# labelIds run 0 (unlabeled) .. 33 (bicycle); license plate (-1) is never drawn into the files
MAX_LABEL_ID = 33
# labelId of trainId 0..18
EVALUATED_LABEL_IDS = (7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33)

IMAGE_SUFFIX = "_leftImg8bit.png"
LABEL_ID_SUFFIX = "_gtFine_labelIds.png"
TRAIN_ID_SUFFIX = "_gtFine_labelTrainIds.png"


def label_id_to_train_id() -> np.ndarray:
    """(256,) uint8 lookup table labelId -> trainId; every id that is not evaluated -> 255."""
    lut = np.full(256, 255, dtype=np.uint8)
    lut[list(EVALUATED_LABEL_IDS)] = np.arange(len(EVALUATED_LABEL_IDS), dtype=np.uint8)
    return lut


LABEL_TO_TRAIN = label_id_to_train_id()


def list_label_id_files(root: Path, split: str) -> list[Path]:
    """The `*_gtFine_labelIds.png` files of `gtFine/<split>/<city>/`, sorted."""
    return sorted((root / "gtFine" / split).glob(f"*/*{LABEL_ID_SUFFIX}"))


class Cityscapes(FileSegmentation):
    """Cityscapes with its fine annotations (``data.dataset=cityscapes``): 19 classes, ignore 255.

    Layout under ``data.root`` (the folder where ``leftImg8bit_trainvaltest.zip`` and
    ``gtFine_trainvaltest.zip`` were extracted)::

        leftImg8bit/<split>/<city>/<name>_leftImg8bit.png
        gtFine/<split>/<city>/<name>_gtFine_labelIds.png
        gtFine/<split>/<city>/<name>_gtFine_labelTrainIds.png   (optional, see below)

    Splits: ``train`` (2,975 images) and ``val`` (500). ``test`` has no public labels and is refused.
    Sample names are the file stems without the suffix (``aachen_000000_000019``).

    Labels: the ``labelIds`` PNGs hold the 34 Cityscapes label ids (8-bit); they are mapped to the
    19 trainIds (road 0, sidewalk 1, ..., bicycle 18) through a 256-entry lookup table, and every
    other label id (unlabeled 0, ego vehicle 1, ..., 255) becomes 255 = ignore; a value 34..254 is no
    label id (the file is not a labelIds map) and raises `DataError` naming the file.
    Where a ``<name>_gtFine_labelTrainIds.png`` lies beside the labelIds file it is read instead,
    its values taken as trainIds already (0..18, 255). Such files are written by
    ``scaleseg prepare cityscapes --root <data.root>`` (or by the official cityscapesScripts'
    ``createTrainIdLabelImgs``); preparing is optional and only saves the lookup at load time.

    Class names and ``palette`` are the official ones, in trainId order. An image without a label
    (or a label without an image) is a missing file: an error, or skipped with
    ``data.on_bad_sample=skip``.
    """

    NAME = "cityscapes"
    CLASS_NAMES = CITYSCAPES_CLASSES
    IGNORE_INDEX = 255
    LABEL_BITS = 8
    SPLITS = {"train": "train", "val": "val"}
    LAYOUT = (
        "data.root must hold leftImg8bit/<split>/<city>/*_leftImg8bit.png and "
        "gtFine/<split>/<city>/*_gtFine_labelIds.png (the extracted leftImg8bit_trainvaltest.zip "
        "and gtFine_trainvaltest.zip)"
    )

    def __init__(self, root, split: str, on_bad_sample: str = "error") -> None:
        self.palette = CITYSCAPES_PALETTE.copy()
        super().__init__(root, split, on_bad_sample)

    def list_samples(self) -> list[Sample]:
        if self.split not in ("train", "val"):
            hint = " (the test split has no public labels)" if self.split == "test" else ""
            raise DataError(f"cityscapes: unknown split {self.split!r}{hint}; use 'train' or 'val'")
        image_dir = self.root / "leftImg8bit" / self.split
        label_dir = self.root / "gtFine" / self.split
        for folder, archive in ((image_dir, "leftImg8bit_trainvaltest.zip"), (label_dir, "gtFine_trainvaltest.zip")):
            if not folder.is_dir():
                raise DataError(f"cityscapes: folder {str(folder)!r} does not exist; extract {archive} into data.root ({self.LAYOUT})")

        # (city, stem) of every image and every label, so that a file missing on either side is reported
        images = {(p.parent.name, p.name[: -len(IMAGE_SUFFIX)]) for p in image_dir.glob(f"*/*{IMAGE_SUFFIX}")}
        labels = {(p.parent.name, p.name[: -len(LABEL_ID_SUFFIX)]) for p in label_dir.glob(f"*/*{LABEL_ID_SUFFIX}")}
        labels |= {(p.parent.name, p.name[: -len(TRAIN_ID_SUFFIX)]) for p in label_dir.glob(f"*/*{TRAIN_ID_SUFFIX}")}
        samples = []
        for city, stem in sorted(images | labels):
            prepared = label_dir / city / f"{stem}{TRAIN_ID_SUFFIX}"
            label = prepared if prepared.is_file() else label_dir / city / f"{stem}{LABEL_ID_SUFFIX}"
            samples.append(Sample(name=stem, image=image_dir / city / f"{stem}{IMAGE_SUFFIX}", label=label))
        return samples

    def decode_label(self, raw: np.ndarray, sample: Sample) -> np.ndarray:
        if sample.label.name.endswith(TRAIN_ID_SUFFIX):
            return raw  # already trainIds (255 = ignore)
        bad = (raw > MAX_LABEL_ID) & (raw != 255)
        if bad.any():  # not a labelId at all: the file is no gtFine labelIds map
            raise DataError(
                f"label {str(sample.label)!r} has {int(bad.sum())} pixels with values that are no Cityscapes "
                f"label id (0..{MAX_LABEL_ID}, or 255): {format_values(np.unique(raw[bad]))}. A *_gtFine_labelIds.png "
                "holds the 34 label ids; is it a colour or instance map, or from another dataset?"
            )
        return LABEL_TO_TRAIN[raw]  # (H, W) labelId -> trainId
