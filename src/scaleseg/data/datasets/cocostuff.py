"""COCO-Stuff: the 164k release (`stuffthingmaps_trainval2017` PNGs) and the 10k release (v1.1
`.mat` files), with the common 171-class benchmark and the ESS paper's 182-class setting.

COCO-Stuff ids run 1..182: 1..91 are the COCO thing ids (11 of which, listed in `UNUSED_IDS`, have
no annotations in COCO) and 92..182 the stuff classes. The 171-class setting drops the 11 unused
ids; the 182-class setting (the ESS paper on COCO-Stuff 10k) keeps every id, so its classes are
simply id - 1.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from scaleseg.data.datasets.base import FileSegmentation, Sample, format_values, list_pairs, read_lines
from scaleseg.errors import ConfigError, DataError

# COCO-Stuff ids 1..182 in order (index i holds the name of id i + 1); the names of COCO-Stuff's
# labels.txt. Ids 1..91: COCO things; 92..182: stuff. (183 "other", in the stuff-only JSONs, and
# 0 / 255 "unlabeled" are not classes.)
COCOSTUFF_ID_NAMES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "street sign", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep",
    "cow", "elephant", "bear", "zebra", "giraffe", "hat", "backpack", "umbrella", "shoe", "eye glasses",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove",
    "skateboard", "surfboard", "tennis racket", "bottle", "plate", "wine glass", "cup", "fork", "knife", "spoon",
    "bowl", "banana", "apple", "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut",
    "cake", "chair", "couch", "potted plant", "bed", "mirror", "dining table", "window", "desk", "toilet",
    "door", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone", "microwave", "oven", "toaster",
    "sink", "refrigerator", "blender", "book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
    "hair brush",
    # stuff, ids 92..182
    "banner", "blanket", "branch", "bridge", "building-other", "bush", "cabinet", "cage", "cardboard",
    "carpet", "ceiling-other", "ceiling-tile", "cloth", "clothes", "clouds", "counter", "cupboard", "curtain",
    "desk-stuff", "dirt", "door-stuff", "fence", "floor-marble", "floor-other", "floor-stone", "floor-tile",
    "floor-wood", "flower", "fog", "food-other", "fruit", "furniture-other", "grass", "gravel", "ground-other",
    "hill", "house", "leaves", "light", "mat", "metal", "mirror-stuff", "moss", "mountain", "mud",
    "napkin", "net", "paper", "pavement", "pillow", "plant-other", "plastic", "platform", "playingfield",
    "railing", "railroad", "river", "road", "rock", "roof", "rug", "salad", "sand", "sea",
    "shelf", "sky-other", "skyscraper", "snow", "solid-other", "stairs", "stone", "straw", "structural-other",
    "table", "tent", "textile-other", "towel", "tree", "vegetable", "wall-brick", "wall-concrete", "wall-other",
    "wall-panel", "wall-stone", "wall-tile", "wall-wood", "water-other", "waterdrops", "window-blind",
    "window-other", "wood",
)
NUM_IDS = 182  # COCO-Stuff ids 1..182
FIRST_STUFF_ID = 92
# COCO thing ids that COCO never annotated (street sign, hat, shoe, eye glasses, plate, mirror,
# window, desk, door, blender, hair brush): absent from the 171-class setting.
UNUSED_IDS = (12, 26, 29, 30, 45, 66, 68, 69, 71, 83, 91)
USED_IDS = tuple(i for i in range(1, NUM_IDS + 1) if i not in UNUSED_IDS)  # 171 ids, ascending

CLASSES_171 = tuple(COCOSTUFF_ID_NAMES[i - 1] for i in USED_IDS)
CLASSES_182 = COCOSTUFF_ID_NAMES
SETTINGS = (171, 182)


def id_to_class_lut(num_classes: int, ignore_index: int = 255) -> np.ndarray:
    """(65536,) int64 lookup table: COCO-Stuff id (1..182) -> class id of the 171- or 182-class
    setting, ignore for an id without a class (the 11 unused ids in the 171 setting, and 0), -1
    for values that are no COCO-Stuff id (183..65535), which the loaders report as bad data.

    Index the table with the raw label array (uint8 or uint16) to decode a whole map at once."""
    if num_classes not in SETTINGS:
        raise ValueError(f"COCO-Stuff has a 171- or a 182-class setting, not {num_classes}")
    lut = np.full(65536, -1, dtype=np.int64)
    lut[0] = ignore_index
    ids = np.array(USED_IDS if num_classes == 171 else range(1, NUM_IDS + 1))
    lut[1 : NUM_IDS + 1] = ignore_index
    lut[ids] = np.arange(len(ids))
    return lut


def _report_bad_values(raw: np.ndarray, bad: np.ndarray, sample: Sample, what: str, dataset: str) -> None:
    values = np.unique(raw[bad])
    shown = format_values(values)
    raise DataError(
        f"label {str(sample.label)!r} has {int(bad.sum())} pixels with values that are no COCO-Stuff id "
        f"({what}): {shown}. Check that data.dataset ({dataset}) matches the files"
    )


class COCOStuff164k(FileSegmentation):
    """COCO-Stuff 164k (COCO 2017 images with the stuff+thing maps): 171 classes, ignore 255.

    Layout under `data.root`::

        images/train2017/000000000009.jpg ...        (118,287 images; COCO's train2017.zip)
        images/val2017/000000000139.jpg ...          (5,000 images; val2017.zip)
        annotations/train2017/000000000009.png ...   (stuffthingmaps_trainval2017.zip, same stems)
        annotations/val2017/000000000139.png ...

    Splits: `train` -> `train2017`, `val` -> `val2017` (the folder names may be given directly).
    Every `.jpg` of the split's image folder is a sample (sorted by name); an image without its
    annotation PNG is an error (or skipped with `data.on_bad_sample=skip`).

    Labels: the published 8-bit grey PNGs, value = COCO-Stuff id - 1 (0..181), 255 unlabeled.
    Loading maps the 171 ids COCO annotates to classes 0..170 (80 things then 91 stuff, in id
    order: person, bicycle, ..., toothbrush, banner, ..., wood) through one lookup table; the 11
    unused thing ids and 255 become 255 (ignore). Values 182..254 are no COCO-Stuff id and raise
    `DataError` naming the file, as does a 16-bit label. No converter is needed.
    """

    NAME = "cocostuff164k"
    CLASS_NAMES = CLASSES_171
    IGNORE_INDEX = 255
    LABEL_BITS = 8
    SPLITS = {"train": "train2017", "val": "val2017"}
    LAYOUT = "images/{train2017,val2017}/*.jpg, annotations/{train2017,val2017}/*.png (stuffthingmaps_trainval2017)"

    def __init__(self, root, split: str, on_bad_sample: str = "error") -> None:
        # the file holds id - 1 and 255 for unlabeled: shift into a table indexed by the file's value
        by_id = id_to_class_lut(171, self.IGNORE_INDEX)
        self._lut = np.full(256, -1, dtype=np.int64)
        self._lut[:NUM_IDS] = by_id[1 : NUM_IDS + 1]
        self._lut[255] = self.IGNORE_INDEX
        super().__init__(root, split, on_bad_sample)

    def list_samples(self) -> list[Sample]:
        folder = self.root / "images" / self.split
        if not folder.is_dir():
            raise DataError(
                f"{self.NAME}: image folder {str(folder)!r} does not exist; data.root must hold "
                f"{self.LAYOUT} (split {self.split!r})"
            )
        return list_pairs(folder, self.root / "annotations" / self.split)

    def decode_label(self, raw: np.ndarray, sample: Sample) -> np.ndarray:
        label = self._lut[raw]  # raw is uint8 (LABEL_BITS = 8), so every value indexes the table
        bad = label < 0
        if bad.any():
            _report_bad_values(raw, bad, sample, "the files hold id - 1 = 0..181, or 255 unlabeled", self.NAME)
        return label


class COCOStuff10k(FileSegmentation):
    """COCO-Stuff 10k v1.1 (`cocostuff-10k-v1.1.zip`): 10,000 COCO images with `.mat` labels, in
    the 182-class setting of the ESS paper or the common 171-class benchmark.

    Layout under `data.root` (the extracted archive)::

        images/COCO_train2014_000000000077.jpg ...        (10,000 images)
        annotations/COCO_train2014_000000000077.mat ...   (`S`: label matrix; `names`: class names)
        imageLists/train.txt                              (9,000 image names, one a line, no suffix)
        imageLists/test.txt                               (1,000)

    Splits: `train` -> `train`, `val` -> `test` (the list names may be given directly).

    Labels: `S` holds 0 (unlabeled) and COCO-Stuff ids 1..182 (uint8 or uint16). The setting is
    chosen by `data.num_classes`:

    * 182 (the ESS paper): class = id - 1, so classes 0..181 are every COCO-Stuff id, including
      the 11 thing ids COCO never annotated (they simply never occur); 0 -> 255 (ignore).
    * 171 (the common benchmark): the same map as COCO-Stuff 164k; the 11 unused ids and 0 -> 255.

    Any other `data.num_classes` is a `ConfigError`. A value above 182, a missing or non-integer
    `S`, or an unreadable `.mat` raises `DataError` naming the file. No converter is needed.
    """

    NAME = "cocostuff10k"
    IGNORE_INDEX = 255
    LABEL_BITS = 16
    SPLITS = {"train": "train", "val": "test"}
    LAYOUT = "images/*.jpg, annotations/*.mat (COCO-Stuff 10k v1.1), imageLists/{train,test}.txt"

    def __init__(self, root, split: str, on_bad_sample: str = "error", num_classes: int = 182) -> None:
        if num_classes not in SETTINGS:
            raise ConfigError(
                f"data.num_classes = {num_classes}: COCO-Stuff 10k has two settings, 182 (the ESS paper: "
                "every COCO-Stuff id, class = id - 1) or 171 (the common benchmark: the 11 unused thing ids dropped)"
            )
        self.class_names = list(CLASSES_182 if num_classes == 182 else CLASSES_171)
        self._lut = id_to_class_lut(num_classes, self.IGNORE_INDEX)
        super().__init__(root, split, on_bad_sample)

    @classmethod
    def from_config(cls, cfg, split: str) -> "COCOStuff10k":
        return cls(root=cfg.root, split=split, on_bad_sample=cfg.on_bad_sample, num_classes=cfg.num_classes)

    def list_samples(self) -> list[Sample]:
        names = read_lines(self.root / "imageLists" / f"{self.split}.txt", f"{self.NAME} split list")
        # a line may carry a suffix or a folder in other copies of the lists: keep the bare stem
        stems = [Path(n.split()[0]).stem for n in names]
        return [Sample(s, self.root / "images" / f"{s}.jpg", self.root / "annotations" / f"{s}.mat") for s in stems]

    def read_label(self, sample: Sample) -> np.ndarray:
        return read_mat_label(sample.label)

    def decode_label(self, raw: np.ndarray, sample: Sample) -> np.ndarray:
        if raw.size and (raw.min() < 0 or raw.max() > 65535):
            bad = (raw < 0) | (raw > 65535)
            _report_bad_values(raw, bad, sample, "0 unlabeled or 1..182", self.NAME)
        label = self._lut[raw.astype(np.int64)]
        bad = label < 0
        if bad.any():
            _report_bad_values(raw, bad, sample, "0 unlabeled or 1..182", self.NAME)
        return label


def read_mat_label(path: str | Path) -> np.ndarray:
    """The `S` matrix of a COCO-Stuff 10k `.mat` file (2-D integers), or a DataError naming the file."""
    from scipy.io import loadmat

    path = Path(path)
    if not path.is_file():
        raise DataError(f"label {str(path)!r} does not exist")
    try:
        mat = loadmat(path, variable_names=["S"])
    except Exception as exc:  # scipy raises ValueError, MatReadError, OSError, TypeError ... on bad files
        raise DataError(f"label {str(path)!r} cannot be read as a .mat file ({exc}); the file is corrupt") from None
    if "S" not in mat:
        raise DataError(
            f"label {str(path)!r} has no variable 'S'; COCO-Stuff 10k v1.1 annotations hold the label "
            "matrix in 'S' (v1.0 files differ: download cocostuff-10k-v1.1.zip)"
        )
    s = np.asarray(mat["S"])
    if s.ndim != 2 or not (np.issubdtype(s.dtype, np.integer) or np.issubdtype(s.dtype, np.floating)):
        raise DataError(f"label {str(path)!r}: 'S' is a {s.dtype} array of shape {s.shape}, not a 2-D label matrix")
    if np.issubdtype(s.dtype, np.floating):
        if not np.all(np.isfinite(s)) or np.any(s != np.round(s)):
            raise DataError(f"label {str(path)!r}: 'S' holds non-integer values; it is not a label matrix")
        s = s.astype(np.int64)
    return s
