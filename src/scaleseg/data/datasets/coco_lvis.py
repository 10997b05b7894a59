"""COCO+LVIS (1,284 classes): the dataset of the ESS paper, built from LVIS v1 instance masks and
COCO-Stuff stuff annotations by `scaleseg prepare coco-lvis` (see `scaleseg.data.prepare.coco_lvis`
for how labels are painted). This module reads the builder's output folder; the COCO images stay
where they are.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from scaleseg.data.datasets.base import FileSegmentation, Sample, check_root, read_label_file, read_lines
from scaleseg.errors import DataError

# ---------------------------------------------------------------- the build output's format
NUM_LVIS_CLASSES = 1203  # LVIS v1 category ids 1..1203 -> classes 0..1202
NUM_CLASSES = 1284  # + 81 COCO-Stuff stuff classes -> 1203..1283
IGNORE_INDEX = 65535
FORMAT = "scaleseg coco_lvis v1"
LABEL_ENCODING = "uint16 PNG; value = class id 0..1283, 65535 = ignore (unlabelled or COCO-Stuff 'other')"
CLASSES_FILE = "classes.json"
LABELS_DIR = "labels"
IMAGES_LINK = "images"  # an optional <root>/images folder or link overrides the recorded COCO images root


def split_list_file(root: Path, split: str) -> Path:
    """`<root>/<split>.txt`: one `<image path, relative to the COCO images root> <label path,
    relative to root>` pair a line, e.g. `val2017/000000000139.jpg labels/val/000000000139.png`."""
    return root / f"{split}.txt"


def build_record_file(root: Path, split: str) -> Path:
    """`<root>/build_<split>.json`: how the split was built (COCO images root, input JSONs, options)."""
    return root / f"build_{split}.json"


def image_classes_file(root: Path, split: str) -> Path:
    """`<root>/<split>_image_classes.json`: {sample name: [class ids present, ascending]} in the
    order of `<split>.txt` (for class-aware samplers such as repeat-factor sampling)."""
    return root / f"{split}_image_classes.json"


def summary_file(root: Path, split: str) -> Path:
    """`<root>/summary_<split>.json`: images, pixels per class, fraction unlabelled."""
    return root / f"summary_{split}.json"


def _read_json(path: Path, what: str, fix: str):
    if not path.is_file():
        raise DataError(f"{what} {str(path)!r} does not exist; {fix}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{what} {str(path)!r} cannot be read ({exc}); {fix}") from None


def read_class_list(root: str | Path) -> list[dict]:
    """`<root>/classes.json` -> the class records, in class-id order.

    The file is `{"format", "num_classes", "ignore_index", "label_encoding", "classes": [...]}`;
    each class is `{"id", "name", "source" ("lvis", "lvis+stuff" or "stuff"), "lvis_id",
    "coco_id" (the COCO-Stuff id of a stuff or merged class, else null), "frequency" (LVIS r/c/f,
    null for stuff-only classes), "synset"}`."""
    path = Path(root) / CLASSES_FILE
    fix = "rebuild it with `scaleseg prepare coco-lvis`"
    data = _read_json(path, "COCO+LVIS class list", fix)
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("classes"), list):
        raise DataError(f"class list {str(path)!r} is not a {FORMAT!r} class list; {fix}")
    classes = data["classes"]
    for i, c in enumerate(classes):
        if not isinstance(c, dict) or c.get("id") != i or not isinstance(c.get("name"), str):
            raise DataError(f"class list {str(path)!r}: entry {i} is not {{'id': {i}, 'name': ...}}; {fix}")
    if data.get("ignore_index", IGNORE_INDEX) != IGNORE_INDEX or len(classes) >= IGNORE_INDEX:
        raise DataError(f"class list {str(path)!r}: ignore index {data.get('ignore_index')} is not {IGNORE_INDEX}; {fix}")
    return classes


class COCOLVIS(FileSegmentation):
    """COCO+LVIS (the ESS paper's 1,284 classes): LVIS v1 things + COCO-Stuff stuff, uint16 labels.

    `data.root` is the output folder of `scaleseg prepare coco-lvis` (run once per split)::

        classes.json                       the 1,284 classes (name, LVIS id, COCO-Stuff id, LVIS frequency r/c/f)
        train.txt, val.txt                 `<image path> <label path>` a line, e.g.
                                           `train2017/000000000009.jpg labels/train/000000000009.png`
        labels/{train,val}/<12-digit COCO image id>.png   uint16 label maps
        build_{train,val}.json             the COCO images root and the inputs of each split's build
        summary_{train,val}.json           images, pixels per class, fraction unlabelled
        {train,val}_image_classes.json     the classes present in each image
        images/                            optional: a folder or link to the COCO images root

    Image paths are relative to the COCO images root (the folder holding `train2017/` and
    `val2017/`): `<root>/images` when it exists (link it there if the COCO images moved), else the
    root recorded in `build_<split>.json` at build time. LVIS val draws images from both
    train2017 and val2017, so its lines name both folders.

    Splits: `train`, `val` (LVIS v1 train: 100,170 images; val: 19,809).

    Labels: 16-bit PNGs holding the class id directly, 0..1283, and 65535 for ignore (no
    annotation, or COCO-Stuff's "other"); no decoding is applied. Classes 0..1202 are LVIS v1
    category ids 1..1203 (10 of them also take the COCO-Stuff class merged into them: banner,
    blanket, cabinet, cupboard, curtain, napkin, pillow, salad, table, towel); 1203..1283 are the
    other 81 COCO-Stuff stuff classes in ascending COCO-Stuff id. An 8-bit label file is refused
    (it would have lost every class id above 255), as is a value neither a class nor 65535.
    """

    NAME = "coco_lvis"
    IGNORE_INDEX = IGNORE_INDEX
    LABEL_BITS = 16
    SPLITS = {"train": "train", "val": "val"}
    LAYOUT = "the output of `scaleseg prepare coco-lvis`: classes.json, <split>.txt, labels/<split>/*.png"

    def __init__(self, root, split: str, on_bad_sample: str = "error") -> None:
        root_path = check_root(root, self.NAME, self.LAYOUT)
        self.classes = read_class_list(root_path)
        self.class_names = [c["name"] for c in self.classes]
        self.class_frequency = [c.get("frequency") for c in self.classes]  # LVIS r/c/f, None for stuff
        super().__init__(root_path, split, on_bad_sample)

    def images_root(self) -> Path:
        """The COCO images root that the split list's image paths are relative to."""
        link = self.root / IMAGES_LINK
        if link.is_dir():
            return link
        record_path = build_record_file(self.root, self.split)
        record = _read_json(
            record_path,
            f"{self.NAME} build record",
            f"rebuild the split with `scaleseg prepare coco-lvis --split {self.split}`, or make "
            f"{str(link)!r} a link to the COCO images root (the folder holding train2017/ and val2017/)",
        )
        images = Path(str(record.get("images_root", "")))
        if not images.is_dir():
            raise DataError(
                f"{self.NAME}: the COCO images root {str(images)!r} recorded in {str(record_path)!r} is not a "
                f"folder; make {str(link)!r} a link to the COCO images root (holding train2017/ and val2017/)"
            )
        return images

    def list_samples(self) -> list[Sample]:
        path = split_list_file(self.root, self.split)
        if not path.is_file():
            raise DataError(
                f"{self.NAME}: split list {str(path)!r} does not exist; build the split with "
                f"`scaleseg prepare coco-lvis --split {self.split} ...`"
            )
        images = self.images_root()
        samples = []
        for number, line in enumerate(read_lines(path, f"{self.NAME} split list"), start=1):
            fields = line.split()
            if len(fields) != 2:
                raise DataError(
                    f"{self.NAME} split list {str(path)!r}, line {number}: {line!r} is not "
                    "'<image path> <label path>'; rebuild it with `scaleseg prepare coco-lvis`"
                )
            label = self.root / fields[1]
            samples.append(Sample(label.stem, images / fields[0], label))
        return samples

    def read_label(self, sample: Sample) -> np.ndarray:
        raw = read_label_file(sample.label, self.LABEL_BITS)
        if raw.dtype == np.uint8:
            raise DataError(
                f"label {str(sample.label)!r} is an 8-bit image; COCO+LVIS labels are 16-bit PNGs (class ids "
                "up to 1283), so this file has lost its ids above 255. Rebuild it with `scaleseg prepare coco-lvis`"
            )
        return raw

    def image_classes(self) -> list[list[int]]:
        """The class ids present in each sample's label (ascending), in sample order, from
        `<split>_image_classes.json` (written by the builder): what repeat-factor sampling needs,
        without reading 100k labels (`scaleseg.data.samplers.image_class_sets` calls this)."""
        path = image_classes_file(self.root, self.split)
        data = _read_json(path, f"{self.NAME} image class lists", "rebuild the split with `scaleseg prepare coco-lvis`")
        if not isinstance(data, dict):
            raise DataError(f"{str(path)!r} is not a {{name: [class ids]}} object; rebuild it with `scaleseg prepare coco-lvis`")
        missing = [s.name for s in self.samples if s.name not in data]
        if missing:
            raise DataError(
                f"{str(path)!r} has no class list for {len(missing)} samples of {self.split!r} (e.g. {missing[0]}); "
                "it is from another build: rebuild the split with `scaleseg prepare coco-lvis`"
            )
        return [[int(c) for c in data[s.name]] for s in self.samples]
