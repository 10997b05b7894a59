"""Pascal VOC 2012 segmentation (21 classes with background, ignore 255) and its SBD-augmented
training set "trainaug"."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

import numpy as np

from scaleseg.data.datasets.base import FileSegmentation, Sample, read_lines
from scaleseg.errors import DataError

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)

VOC_LAYOUT = (
    "data.root must be the folder holding VOCdevkit/ (or VOCdevkit/ itself, or VOCdevkit/VOC2012), "
    "with VOC2012/ImageSets/Segmentation/<split>.txt, VOC2012/JPEGImages/<id>.jpg and "
    "VOC2012/SegmentationClass/<id>.png (the extracted VOCtrainval_11-May-2012.tar)"
)
PREPARE_HINT = "scaleseg prepare voc-aug --voc <VOCdevkit/VOC2012> --sbd <benchmark_RELEASE>"


def voc_colormap(n: int = 256) -> np.ndarray:
    """(n, 3) uint8: the Pascal VOC colour of each index (1 -> (128, 0, 0), 255 -> (224, 224, 192)).

    Bit 3j + c of the index becomes bit 7 - j of channel c (c = 0 red, 1 green, 2 blue)."""
    ids = np.arange(n, dtype=np.int64)
    cmap = np.zeros((n, 3), dtype=np.int64)
    for j in range(8):  # over the 8 bit triples of the index, vectorised over all indices
        for c in range(3):
            cmap[:, c] |= ((ids >> (3 * j + c)) & 1) << (7 - j)
    return cmap.astype(np.uint8)


VOC_COLORMAP = voc_colormap(256)


def find_voc2012(root: str | Path, what: str = "data.root") -> Path:
    """The VOC2012 folder under `root`: root/VOCdevkit/VOC2012, root/VOC2012 or root itself
    (recognised by its ImageSets/ and JPEGImages/), or a DataError describing the layout that
    `what` (the option that named `root`) must point at."""
    root = Path(root).expanduser()
    for candidate in (root / "VOCdevkit" / "VOC2012", root / "VOC2012", root):
        if (candidate / "ImageSets").is_dir() and (candidate / "JPEGImages").is_dir():
            return candidate
    layout = VOC_LAYOUT.replace("data.root", what, 1)
    raise DataError(f"no Pascal VOC 2012 found under {str(root)!r}: {layout}")


class PascalVOC(FileSegmentation):
    """Pascal VOC 2012 segmentation (``data.dataset=voc``): 21 classes (0 background, 1..20
    objects), ignore 255.

    ``data.root`` is the folder holding ``VOCdevkit/`` (where ``VOCtrainval_11-May-2012.tar`` was
    extracted); ``VOCdevkit/`` itself or ``VOCdevkit/VOC2012`` are accepted as well. Under
    ``VOCdevkit/VOC2012``::

        ImageSets/Segmentation/{train,val,trainval}.txt   one image id per line
        JPEGImages/<id>.jpg
        SegmentationClass/<id>.png                          palette PNG

    Splits: ``train`` (1,464 images), ``val`` (1,449), ``trainval``; any other name reads
    ``ImageSets/Segmentation/<name>.txt``. Sample names are the image ids (``2007_000032``).

    Labels: ``SegmentationClass`` PNGs are palette images whose *indices* are the class ids (0..20,
    255 on object borders and difficult regions = ignore); they are read as indices, never
    converted through their colours. ``palette`` is the VOC colour map.
    """

    NAME = "voc"
    CLASS_NAMES = VOC_CLASSES
    IGNORE_INDEX = 255
    LABEL_BITS = 8
    SPLITS = {"train": "train", "val": "val"}
    LAYOUT = VOC_LAYOUT

    def __init__(self, root, split: str, on_bad_sample: str = "error") -> None:
        self.palette = VOC_COLORMAP[: len(VOC_CLASSES)].copy()
        super().__init__(root, split, on_bad_sample)

    @cached_property
    def voc_dir(self) -> Path:
        return find_voc2012(self.root)

    def split_file(self) -> Path:
        return self.voc_dir / "ImageSets" / "Segmentation" / f"{self.split}.txt"

    def label_dir(self) -> Path:
        return self.voc_dir / "SegmentationClass"

    def list_samples(self) -> list[Sample]:
        voc = self.voc_dir
        ids = read_lines(self.split_file(), f"{self.NAME} split list")
        label_dir = self.label_dir()
        return [Sample(name=i, image=voc / "JPEGImages" / f"{i}.jpg", label=label_dir / f"{i}.png") for i in ids]


class PascalVOCAug(PascalVOC):
    """Pascal VOC 2012 with the SBD training masks (``data.dataset=voc_aug``): the usual
    "trainaug" setting, 21 classes, ignore 255.

    Splits: ``train`` = ``trainaug`` (VOC train + SBD train + SBD val, minus VOC val: 10,582 images
    on the real data), ``val`` = VOC ``val`` (1,449). Other names are VOC's own splits.

    Layout: as ``voc`` (``data.root`` holds ``VOCdevkit/``), plus two things written once by
    ``scaleseg prepare voc-aug --voc <VOCdevkit/VOC2012> --sbd <SBD root>`` into ``VOC2012/``::

        ImageSets/Segmentation/trainaug.txt     the sorted trainaug ids
        SegmentationClassAug/<id>.png           palette PNG of every trainaug id

    The converter takes each id's mask from VOC's ``SegmentationClass`` when VOC has one (VOC train
    ids) and otherwise from SBD's ``dataset/cls/<id>.mat`` (``GTcls.Segmentation``: 0 background,
    1..20 classes, no 255 border), keeping the values. Images are VOC's ``JPEGImages`` (SBD's images
    are VOC images). ``trainaug`` labels are read from ``SegmentationClassAug``, every other split's
    from ``SegmentationClass``.
    """

    NAME = "voc_aug"
    SPLITS = {"train": "trainaug", "val": "val"}

    def label_dir(self) -> Path:
        return self.voc_dir / ("SegmentationClassAug" if self.split == "trainaug" else "SegmentationClass")

    def list_samples(self) -> list[Sample]:
        if self.split == "trainaug":
            split_file, label_dir = self.split_file(), self.label_dir()
            if not split_file.is_file() or not label_dir.is_dir():
                absent = split_file if not split_file.is_file() else label_dir
                raise DataError(
                    f"voc_aug: {str(absent)!r} does not exist; the trainaug split is made from VOC 2012 and "
                    f"SBD by running once: {PREPARE_HINT}"
                )
        return super().list_samples()

    def _check_listed(self, samples: list[Sample]) -> list[Sample]:
        try:
            return super()._check_listed(samples)
        except DataError as exc:
            if self.split != "trainaug":
                raise
            raise DataError(
                f"{exc}. SegmentationClassAug/ is written by `{PREPARE_HINT}`; if labels are missing there, "
                "run it again: it completes the missing ones"
            ) from None
