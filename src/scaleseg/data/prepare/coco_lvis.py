"""Build COCO+LVIS, the 1,284-class dataset of the ESS paper, from LVIS v1 instance masks and
COCO-Stuff stuff annotations. Run once per split:

    scaleseg prepare coco-lvis --lvis lvis_v1_train.json --stuff stuff_train2017.json \\
        --images COCO --out coco_lvis --split train
    scaleseg prepare coco-lvis --lvis lvis_v1_val.json --stuff stuff_val2017.json stuff_train2017.json \\
        --images COCO --out coco_lvis --split val

`--images` is the COCO images root (the folder holding train2017/ and val2017/). Each image's path
is taken from its LVIS `coco_url`: LVIS val draws about three quarters of its images from COCO
train2017, whose stuff annotations are in stuff_train2017.json, so pass both stuff files for val
(images absent from every given stuff file get LVIS labels only, and the build warns about them).

Classes (0-based, as stored): LVIS v1 category id k -> class k - 1 (0..1202). Ten COCO-Stuff stuff
classes are the same things as LVIS classes and merge into them through one lookup table: banner
92 -> LVIS 50, blanket 93 -> 110, cabinet 98 -> 181, cupboard 108 -> 346, curtain 109 -> 350,
napkin 137 -> 713, pillow 141 -> 804, salad 153 -> 904, table 165 -> 1050, towel 168 -> 1108. The
other 81 stuff classes (ids 92..182) become classes 1203..1283 in ascending stuff id. Stuff 183
("other": pixels of COCO things) and pixels nobody labelled are ignore (65535). (The published
scripts remapped in place, key after key, so blanket pixels, first written as LVIS 110, were then
taken for stuff 110 and ended as desk-stuff, and cabinet (181) as window-other; a single table
cannot chain.)

Painting, in int32: the LVIS instances of an image first, largest decoded mask first, each one
overwriting what is below, so a pixel covered by several instances takes the class of the
smallest of them (equal areas: the lowest annotation id wins). Then the stuff annotations fill
only the pixels LVIS left empty, in annotation id order (the first to reach a pixel keeps it; COCO
stuff annotations do not overlap). Polygons (merged per instance), compressed and uncompressed
RLE are decoded with pycocotools.

Output under `--out` (see `scaleseg.data.datasets.coco_lvis.COCOLVIS`, which reads it):
`classes.json` (the 1,284 classes: name, LVIS id, COCO-Stuff id, LVIS frequency r/c/f, synset),
`labels/<split>/<12-digit image id>.png` (uint16: class id 0..1283, 65535 ignore), `<split>.txt`
(`<image path relative to the COCO root> <label path relative to --out>` a line),
`build_<split>.json` (the COCO root and inputs), `<split>_image_classes.json` ({image name: class
ids present}) and `summary_<split>.json` (images, pixels per class, fraction unlabelled).

Resuming: every label is written under a temporary name and renamed when complete, and a label
that already exists, decodes and has the image's size is kept; so an interrupted build continues
where it stopped, and a finished one rebuilds nothing. Only a build of the same inputs resumes:
`build_<split>.json` records each input file's size and SHA-256 (and the painting rules' version)
before any label is written, and a run whose inputs differ from those that built the labels already
in `labels/<split>/` stops with an error, unless `--overwrite` is given, which deletes them and
builds the split anew. Temporary files of a killed run are removed. The summary and the per-image
class lists always cover the whole split (kept labels are read back).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import re
import warnings
from pathlib import Path
from urllib.parse import urlparse

import numpy as np

from scaleseg.data.datasets.base import read_label_file, read_lines
from scaleseg.data.datasets.coco_lvis import (
    CLASSES_FILE,
    FORMAT,
    IGNORE_INDEX,
    LABEL_ENCODING,
    LABELS_DIR,
    NUM_CLASSES,
    NUM_LVIS_CLASSES,
    build_record_file,
    image_classes_file,
    split_list_file,
    summary_file,
)
from scaleseg.data.io import read_json, remove_temporaries, write_png_atomic, write_text_atomic
from scaleseg.errors import DataError, ScalesegError

HELP = "build the 1284-class COCO+LVIS labels (uint16 PNGs) from LVIS v1 and COCO-Stuff annotations"

# COCO-Stuff stuff id -> the LVIS v1 category id it merges into (the 10 classes both vocabularies have)
STUFF_TO_LVIS = {92: 50, 93: 110, 98: 181, 108: 346, 109: 350, 137: 713, 141: 804, 153: 904, 165: 1050, 168: 1108}
FIRST_STUFF_ID, LAST_STUFF_ID, STUFF_OTHER = 92, 182, 183
# Changes whenever the painting rules (order, merges, lookup table) change: labels of another version
# are from other "inputs" and are not kept by a resumed build.
PAINTING_VERSION = 1
EMPTY = -1  # painting: no annotation has reached the pixel yet
INVALID = -2  # stuff lookup: not a stuff id


def stuff_class_ids() -> dict[int, int]:
    """COCO-Stuff stuff id (92..182) -> COCO+LVIS class id (0-based)."""
    table = {stuff: lvis - 1 for stuff, lvis in STUFF_TO_LVIS.items()}
    next_id = NUM_LVIS_CLASSES
    for stuff in range(FIRST_STUFF_ID, LAST_STUFF_ID + 1):
        if stuff not in table:
            table[stuff] = next_id
            next_id += 1
    assert next_id == NUM_CLASSES
    return table


def stuff_lookup_table() -> np.ndarray:
    """(184,) int32: COCO-Stuff id -> class id; 183 ("other") -> ignore; ids below 92 -> INVALID.
    The one table through which every stuff pixel passes (never remapped a second time)."""
    lut = np.full(STUFF_OTHER + 1, INVALID, dtype=np.int32)
    for stuff, cls in stuff_class_ids().items():
        lut[stuff] = cls
    lut[STUFF_OTHER] = IGNORE_INDEX
    return lut


# ---------------------------------------------------------------- reading the annotation files
def _load_annotations(path: Path, what: str) -> dict:
    data = read_json(path, what)
    keys = ("images", "annotations", "categories")
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in keys):
        raise DataError(
            f"{what} {str(path)!r} is not a COCO-style annotation file (it needs images, annotations and categories lists)"
        )
    return data


def _normal(name: str) -> str:
    return re.sub(r"[\s_-]+", " ", re.sub(r"\(.*?\)", "", str(name))).strip().lower()


def lvis_categories(data: dict, path: Path) -> list[dict]:
    """The LVIS v1 categories sorted by id, checked to be ids 1..1203."""
    try:
        cats = sorted(data["categories"], key=lambda c: int(c["id"]))
        ids = [int(c["id"]) for c in cats]
        for c in cats:
            str(c["name"])
    except (KeyError, TypeError, ValueError):
        raise DataError(f"--lvis {str(path)!r}: a category lacks an integer 'id' or a 'name'") from None
    if ids != list(range(1, NUM_LVIS_CLASSES + 1)):
        raise DataError(
            f"--lvis {str(path)!r} has {len(ids)} categories (ids {ids[0] if ids else '-'}..{ids[-1] if ids else '-'}); "
            f"LVIS v1 has {NUM_LVIS_CLASSES} with ids 1..{NUM_LVIS_CLASSES}. Pass lvis_v1_train.json or lvis_v1_val.json "
            "(LVIS v0.5 has other ids and is not supported)"
        )
    return cats


def stuff_categories(data: dict, path: Path) -> dict[int, str]:
    """{stuff id: name} of a COCO-Stuff stuff file, checked to be ids 92..183."""
    try:
        cats = {int(c["id"]): str(c["name"]) for c in data["categories"]}
    except (KeyError, TypeError, ValueError):
        raise DataError(f"--stuff {str(path)!r}: a category lacks an integer 'id' or a 'name'") from None
    if sorted(cats) != list(range(FIRST_STUFF_ID, STUFF_OTHER + 1)):
        ids = sorted(cats)
        raise DataError(
            f"--stuff {str(path)!r} has {len(ids)} categories (ids {ids[0] if ids else '-'}..{ids[-1] if ids else '-'}); "
            f"the COCO-Stuff stuff files (stuff_train2017.json, stuff_val2017.json) have ids {FIRST_STUFF_ID}..{STUFF_OTHER}"
        )
    return cats


def build_class_list(lvis_cats: list[dict], stuff_names: dict[int, str]) -> list[dict]:
    """The 1,284 class records in class-id order (see `scaleseg.data.datasets.coco_lvis.read_class_list`)."""
    merged_from = {lvis: stuff for stuff, lvis in STUFF_TO_LVIS.items()}
    classes = []
    for c in lvis_cats:
        lvis_id = int(c["id"])
        stuff = merged_from.get(lvis_id)
        classes.append({
            "id": lvis_id - 1,
            "name": str(c["name"]),
            "source": "lvis+stuff" if stuff else "lvis",
            "lvis_id": lvis_id,
            "coco_id": stuff,
            "frequency": c.get("frequency"),
            "synset": c.get("synset"),
        })
    taken = {c["name"] for c in classes}
    table = stuff_class_ids()
    for stuff in range(FIRST_STUFF_ID, LAST_STUFF_ID + 1):
        if stuff in STUFF_TO_LVIS:
            continue
        name = stuff_names[stuff]
        if name in taken:  # keep names unique (the class list is also a lookup by name)
            name = f"{name} (stuff)"
        taken.add(name)
        classes.append({"id": table[stuff], "name": name, "source": "stuff", "lvis_id": None,
                        "coco_id": stuff, "frequency": None, "synset": None})
    assert [c["id"] for c in classes] == list(range(NUM_CLASSES))
    return classes


def _check_merge_names(lvis_cats: list[dict], stuff_names: dict[int, str], lvis_path: Path) -> None:
    for stuff, lvis in STUFF_TO_LVIS.items():
        a, b = _normal(lvis_cats[lvis - 1]["name"]), _normal(stuff_names[stuff])
        if a != b:
            warnings.warn(
                f"stuff class {stuff} ({stuff_names[stuff]!r}) merges into LVIS category {lvis}, which {str(lvis_path)!r} "
                f"names {lvis_cats[lvis - 1]['name']!r}; check that --lvis is LVIS v1",
                stacklevel=3,
            )


def image_relative_path(image: dict, path: Path) -> str:
    """`<folder>/<file>` of an LVIS image from its `coco_url` (e.g. `val2017/000000000139.jpg`)."""
    url = image.get("coco_url")
    parts = [p for p in urlparse(str(url)).path.split("/") if p] if url else []
    if len(parts) < 2:
        raise DataError(
            f"--lvis {str(path)!r}: image {image.get('id')} has no usable coco_url ({url!r}); LVIS v1 images name "
            "their COCO file as http://images.cocodataset.org/<train2017|val2017>/<file>.jpg"
        )
    return f"{parts[-2]}/{parts[-1]}"


def _group_by_image(annotations: list, wanted: set, path: Path, what: str, valid_category) -> dict[int, list]:
    by_image: dict[int, list] = {}
    for a in annotations:
        try:
            image_id, cat, _ = int(a["image_id"]), int(a["category_id"]), int(a["id"])
            if "segmentation" not in a:
                raise KeyError("segmentation")
        except (KeyError, TypeError, ValueError):
            raise DataError(f"{what} {str(path)!r}: annotation {a.get('id') if isinstance(a, dict) else a!r} lacks "
                            "id, image_id, category_id or segmentation") from None
        if image_id not in wanted:
            continue
        if not valid_category(cat):
            raise DataError(
                f"{what} {str(path)!r}: annotation {a['id']} has category {cat}, which is not in the file's categories"
            )
        by_image.setdefault(image_id, []).append(a)
    return by_image


# ---------------------------------------------------------------- masks and painting
def _mask_utils():
    try:
        from pycocotools import mask as mask_utils
    except ImportError:
        raise ScalesegError(
            "scaleseg prepare coco-lvis decodes LVIS and COCO-Stuff masks with pycocotools, which is not "
            "installed: pip install pycocotools (or scaleseg[coco])"
        ) from None
    return mask_utils


def segmentation_rle(segmentation, height: int, width: int, where: str):
    """One pycocotools RLE for an annotation's segmentation: polygons (merged), uncompressed RLE
    (counts a list) or compressed RLE (counts a string). None for an instance with no polygon of
    three or more points."""
    mask_utils = _mask_utils()
    if isinstance(segmentation, list):
        polygons = []
        for polygon in segmentation:
            if not isinstance(polygon, list) or len(polygon) % 2:
                raise DataError(f"{where}: a polygon must be a flat list of x, y coordinates")
            if len(polygon) >= 6:  # fewer than 3 points has no area (and pycocotools reads 4 numbers as a box)
                polygons.append([float(v) for v in polygon])
        if not polygons:
            return None
        return mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
    if isinstance(segmentation, dict) and "counts" in segmentation and "size" in segmentation:
        size = [int(v) for v in segmentation["size"]]
        if size != [height, width]:
            raise DataError(f"{where}: RLE size {size} (height, width) differs from the image's [{height}, {width}]")
        counts = segmentation["counts"]
        if isinstance(counts, list):
            if sum(int(c) for c in counts) != height * width:
                raise DataError(f"{where}: uncompressed RLE counts sum to {sum(counts)}, not height x width = {height * width}")
            return mask_utils.frPyObjects({"size": size, "counts": [int(c) for c in counts]}, height, width)
        if isinstance(counts, str):
            counts = counts.encode("ascii")
        if isinstance(counts, bytes):
            return {"size": size, "counts": counts}
    raise DataError(f"{where}: the segmentation is neither a list of polygons nor an RLE dict with size and counts")


def paint_label(height: int, width: int, lvis_annotations: list, stuff_annotations: list,
                where: str = "image", stuff_lut: np.ndarray | None = None) -> np.ndarray:
    """(H, W) int32 label of one image: class ids 0..1283 and IGNORE_INDEX (see the module doc for
    the order). `lvis_annotations` have LVIS category ids, `stuff_annotations` COCO-Stuff ids."""
    mask_utils = _mask_utils()
    lut = stuff_lookup_table() if stuff_lut is None else stuff_lut
    with warnings.catch_warnings():
        # pycocotools' decode trips a NumPy 2 DeprecationWarning (copy keyword) on every call
        warnings.simplefilter("ignore", DeprecationWarning)
        return _paint(height, width, lvis_annotations, stuff_annotations, where, lut, mask_utils)


def _paint(height, width, lvis_annotations, stuff_annotations, where, lut, mask_utils) -> np.ndarray:
    label = np.full((height, width), EMPTY, dtype=np.int32)
    instances = []
    for a in lvis_annotations:
        rle = segmentation_rle(a["segmentation"], height, width, f"{where}, LVIS annotation {a['id']}")
        if rle is None:
            continue
        area = int(mask_utils.area(rle))
        if area:
            # painted largest first; among equal areas the highest id first, so the lowest id ends on top
            instances.append((-area, -int(a["id"]), int(a["category_id"]) - 1, rle))
    instances.sort(key=lambda t: (t[0], t[1]))
    for _, _, cls, rle in instances:
        label[mask_utils.decode(rle).astype(bool)] = cls
    for a in sorted(stuff_annotations, key=lambda a: int(a["id"])):
        rle = segmentation_rle(a["segmentation"], height, width, f"{where}, stuff annotation {a['id']}")
        if rle is None:
            continue
        stuff_id = int(a["category_id"])
        cls = int(lut[stuff_id]) if 0 <= stuff_id < len(lut) else INVALID
        if cls == INVALID:
            raise DataError(
                f"{where}, stuff annotation {a['id']}: category {stuff_id} is not a COCO-Stuff stuff id "
                f"({FIRST_STUFF_ID}..{STUFF_OTHER})"
            )
        free = (label == EMPTY) & mask_utils.decode(rle).astype(bool)
        label[free] = cls
    label[label == EMPTY] = IGNORE_INDEX
    return label


def label_classes(label: np.ndarray) -> tuple[list[int], list[int], int]:
    """(classes present ascending, their pixel counts, ignored pixels) of a label map."""
    values, counts = np.unique(label, return_counts=True)
    keep = values != IGNORE_INDEX
    return values[keep].tolist(), counts[keep].tolist(), int(counts[~keep].sum())


def read_built_label(path: Path, height: int, width: int) -> np.ndarray | None:
    """A complete label written by this builder (16-bit, the image's size, valid values), or None."""
    if not path.is_file():
        return None
    try:
        raw = read_label_file(path, 16)
    except DataError:
        return None
    if raw.dtype == np.uint8 or raw.shape != (height, width):
        return None
    if ((raw >= NUM_CLASSES) & (raw != IGNORE_INDEX)).any():
        return None
    return raw


def image_class_lists(root: str | Path, split: str) -> dict[str, list[int]]:
    """{sample name: class ids present} computed from the label files of a built split, in the
    order of `<split>.txt` (the build saves the same as `<split>_image_classes.json`)."""
    root = Path(root)
    result = {}
    for line in read_lines(split_list_file(root, split), "COCO+LVIS split list"):
        label_path = root / line.split()[-1]
        label = read_label_file(label_path, 16)
        result[label_path.stem] = label_classes(label)[0]
    return result


# ---------------------------------------------------------------- atomic writes
def write_label_png(path: Path, label: np.ndarray) -> None:
    write_png_atomic(path, np.asarray(label, dtype=np.uint16))  # 16-bit grey


def _write_json(path: Path, data, indent: int | None = 1) -> None:
    write_text_atomic(path, json.dumps(data, indent=indent) + "\n")


# ---------------------------------------------------------------- the build
_STATE: dict = {}  # what workers need, set before the pool forks (shared copy-on-write)


def _work(index: int) -> tuple:
    """Build (or keep) label `index` of the split -> (built?, classes, counts, ignored pixels, pixels)."""
    s = _STATE
    image = s["images"][index]
    image_id, height, width = int(image["id"]), int(image["height"]), int(image["width"])
    path = s["label_dir"] / f"{image_id:012d}.png"
    label = read_built_label(path, height, width)
    built = label is None
    if built:
        label = paint_label(
            height, width, s["lvis"].get(image_id, []), s["stuff"].get(image_id, []),
            where=f"image {image_id} ({s['sources']})", stuff_lut=s["lut"],
        )
        write_label_png(path, label)
    classes, counts, ignored = label_classes(label)
    return built, classes, counts, ignored, height * width


def file_fingerprint(path: Path) -> dict:
    """{"file": absolute path, "bytes": size, "sha256": hex digest} of an input file (read in 1 MiB blocks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return {"file": str(path.resolve()), "bytes": path.stat().st_size, "sha256": h.hexdigest()}


def inputs_record(lvis_path: Path, stuff_paths: list[Path]) -> dict:
    """What a split's labels are built from: the input files' content (size and SHA-256; the names are
    kept for messages only) and the painting rules' version. --limit and --images are not part of it."""
    return {"painting_version": PAINTING_VERSION, "lvis": file_fingerprint(lvis_path),
            "stuff": sorted((file_fingerprint(p) for p in stuff_paths), key=lambda f: f["sha256"])}


def _same_inputs(a: dict | None, b: dict) -> bool:
    def content(r):
        return (r.get("painting_version"), (r["lvis"]["bytes"], r["lvis"]["sha256"]),
                sorted((f["bytes"], f["sha256"]) for f in r["stuff"]))

    try:
        return a is not None and content(a) == content(b)
    except (KeyError, TypeError):
        return False


def _describe_inputs(r: dict | None) -> str:
    if not isinstance(r, dict) or "lvis" not in r:
        return "unknown inputs (the build record names none: an older build)"
    try:
        files = [("--lvis", r["lvis"])] + [("--stuff", f) for f in r["stuff"]]
        return ", ".join(f"{opt} {Path(f['file']).name} ({f['bytes']} bytes, sha256 {f['sha256'][:12]})" for opt, f in files)
    except (KeyError, TypeError):
        return "unknown inputs (the build record is damaged)"


def _check_resume(label_dir: Path, record_path: Path, inputs: dict, overwrite: bool) -> None:
    """Labels already in `label_dir` must come from `inputs`, or be deleted with `overwrite`."""
    existing = sorted(label_dir.glob("*.png"))
    if not existing:
        return
    if overwrite:
        for path in existing:
            path.unlink()
        return
    try:
        previous = json.loads(record_path.read_text(encoding="utf-8")).get("inputs")
    except (OSError, ValueError, AttributeError):
        previous = None
    if not _same_inputs(previous, inputs):
        raise DataError(
            f"{str(label_dir)!r} holds {len(existing)} labels built from other inputs than this run's: "
            f"{_describe_inputs(previous)}; this run: {_describe_inputs(inputs)}. Resuming would keep those labels. "
            "Run again with --overwrite to rebuild the split from this run's inputs, or build into another --out"
        )


def build(lvis: str | Path, stuff: list, images: str | Path, out: str | Path, split: str = "train",
          limit: int | None = None, progress: bool = True, workers: int = 1, overwrite: bool = False) -> dict:
    """Build (or finish building) one split; returns the summary (also written to summary_<split>.json).
    Labels already there are kept only if they were built from the same inputs (else an error, or with
    `overwrite` they are deleted and the split is built anew)."""
    from tqdm import tqdm

    _mask_utils()  # fail before reading gigabytes of JSON if pycocotools is missing
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", split):
        raise DataError(f"--split {split!r}: use a plain name such as train or val")
    lvis_path, stuff_paths = Path(lvis), [Path(p) for p in stuff]
    images_root, out = Path(images).expanduser().resolve(), Path(out).expanduser()
    if not images_root.is_dir():
        raise DataError(
            f"--images {str(images_root)!r} is not a folder; pass the COCO images root (holding train2017/ and val2017/)"
        )

    data = _load_annotations(lvis_path, "--lvis annotation file")
    lvis_cats = lvis_categories(data, lvis_path)
    try:
        image_list = sorted(data["images"], key=lambda im: int(im["id"]))
        for im in image_list:
            int(im["height"]), int(im["width"])
    except (KeyError, TypeError, ValueError):
        raise DataError(f"--lvis {str(lvis_path)!r}: an image lacks an integer id, height or width") from None
    if limit is not None:
        image_list = image_list[: max(0, limit)]
    paths = [image_relative_path(im, lvis_path) for im in image_list]
    wanted = {int(im["id"]) for im in image_list}
    lvis_by_image = _group_by_image(data["annotations"], wanted, lvis_path, "--lvis",
                                    lambda c: 1 <= c <= NUM_LVIS_CLASSES)
    del data

    stuff_names: dict[int, str] | None = None
    stuff_by_image: dict[int, list] = {}
    with_stuff: set = set()
    for path in stuff_paths:
        data = _load_annotations(path, "--stuff annotation file")
        names = stuff_categories(data, path)
        if stuff_names is not None and names != stuff_names:
            raise DataError(f"--stuff {str(path)!r} names its categories differently from {str(stuff_paths[0])!r}")
        stuff_names = names
        with_stuff |= wanted & {int(im["id"]) for im in data["images"]}
        for image_id, anns in _group_by_image(data["annotations"], wanted, path, "--stuff",
                                              lambda c: FIRST_STUFF_ID <= c <= STUFF_OTHER).items():
            stuff_by_image.setdefault(image_id, []).extend(anns)
        del data
    if stuff_names is None:
        raise DataError("--stuff: give at least one COCO-Stuff stuff annotation file (stuff_train2017.json, stuff_val2017.json)")
    _check_merge_names(lvis_cats, stuff_names, lvis_path)
    without_stuff = len(wanted - with_stuff)
    if without_stuff:
        warnings.warn(
            f"{without_stuff} of {len(wanted)} images are in none of the --stuff files and get LVIS labels only; "
            "LVIS val takes most of its images from COCO train2017: pass stuff_train2017.json as well as stuff_val2017.json",
            stacklevel=2,
        )
    missing = [p for p in paths if not (images_root / p).is_file()]
    if missing:
        warnings.warn(
            f"{len(missing)} of {len(paths)} images are not under --images {str(images_root)!r} (e.g. {missing[0]}); "
            "their labels are built, but the loader will report them missing",
            stacklevel=2,
        )

    # the class list: the same for every split (LVIS train and val share their categories)
    out.mkdir(parents=True, exist_ok=True)
    label_dir = out / LABELS_DIR / split
    label_dir.mkdir(parents=True, exist_ok=True)
    class_list = {"format": FORMAT, "num_classes": NUM_CLASSES, "ignore_index": IGNORE_INDEX,
                  "label_encoding": LABEL_ENCODING, "classes": build_class_list(lvis_cats, stuff_names)}
    classes_path = out / CLASSES_FILE

    def key(classes):
        return [(c.get("id"), c.get("name"), c.get("lvis_id"), c.get("coco_id")) for c in classes]

    existing = None
    if classes_path.is_file():
        try:
            existing = key(json.loads(classes_path.read_text(encoding="utf-8"))["classes"])
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            existing = None  # unreadable: rewritten below
    if existing is not None and existing != key(class_list["classes"]):
        raise DataError(
            f"{str(classes_path)!r} lists other classes than --lvis/--stuff give (another build?); "
            "build into an empty --out folder, or delete it to rebuild"
        )
    if existing is None:  # the first split's build writes it; later ones (same categories) keep it
        _write_json(classes_path, class_list)
    remove_temporaries(label_dir)  # of a run killed mid-write
    inputs = inputs_record(lvis_path, stuff_paths)
    _check_resume(label_dir, build_record_file(out, split), inputs, overwrite)
    # written before any label: every label in label_dir is then from these inputs
    _write_json(build_record_file(out, split), {
        "format": FORMAT, "split": split, "images_root": str(images_root),
        "lvis": str(lvis_path.resolve()), "stuff": [str(p.resolve()) for p in stuff_paths],
        "limit": limit, "label_encoding": LABEL_ENCODING, "inputs": inputs,
    })

    # the labels (resumable: complete ones are read back, not rebuilt)
    sources = f"--lvis {str(lvis_path)!r}, --stuff {', '.join(repr(str(p)) for p in stuff_paths)}"
    _STATE.update(images=image_list, label_dir=label_dir, lvis=lvis_by_image, stuff=stuff_by_image,
                  lut=stuff_lookup_table(), sources=sources)
    results = []
    bar = tqdm(total=len(image_list), desc=f"coco-lvis {split}", unit="img", disable=not progress, dynamic_ncols=True)
    try:
        use_pool = workers > 1 and len(image_list) > 1 and "fork" in multiprocessing.get_all_start_methods()
        if use_pool:
            with multiprocessing.get_context("fork").Pool(workers) as pool:
                for r in pool.imap(_work, range(len(image_list)), chunksize=4):
                    results.append(r)
                    bar.update()
        else:
            for i in range(len(image_list)):
                results.append(_work(i))
                bar.update()
    finally:
        bar.close()
        _STATE.clear()

    # the split list, per-image class lists and summary, over the whole split
    names = [f"{int(im['id']):012d}" for im in image_list]
    lines = [f"{p} {LABELS_DIR}/{split}/{n}.png" for p, n in zip(paths, names)]
    write_text_atomic(split_list_file(out, split), "".join(line + "\n" for line in lines))
    _write_json(image_classes_file(out, split), {n: r[1] for n, r in zip(names, results)}, indent=None)
    pixels_per_class = np.zeros(NUM_CLASSES, dtype=np.int64)
    images_per_class = np.zeros(NUM_CLASSES, dtype=np.int64)
    for _, classes, counts, _, _ in results:
        classes = np.asarray(classes, dtype=np.int64)
        pixels_per_class[classes] += np.asarray(counts, dtype=np.int64)
        images_per_class[classes] += 1
    pixels = sum(r[4] for r in results)
    ignored = sum(r[3] for r in results)
    summary = {
        "split": split,
        "images": len(results),
        "images_built": sum(1 for r in results if r[0]),
        "images_kept": sum(1 for r in results if not r[0]),
        "images_without_stuff": without_stuff,
        "images_missing": len(missing),
        "num_classes": NUM_CLASSES,
        "classes_present": int((pixels_per_class > 0).sum()),
        "pixels": int(pixels),
        "pixels_unlabelled": int(ignored),
        "fraction_unlabelled": ignored / pixels if pixels else 0.0,
        "pixels_per_class": pixels_per_class.tolist(),
        "images_per_class": images_per_class.tolist(),
    }
    _write_json(summary_file(out, split), summary, indent=None)
    return summary


# ---------------------------------------------------------------- the command
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--lvis", required=True, metavar="JSON", help="lvis_v1_train.json or lvis_v1_val.json")
    parser.add_argument("--stuff", required=True, nargs="+", metavar="JSON",
                        help="COCO-Stuff stuff annotations: stuff_train2017.json (train); stuff_val2017.json and "
                             "stuff_train2017.json (val, whose images come from both)")
    parser.add_argument("--images", required=True, metavar="DIR", help="COCO images root, holding train2017/ and val2017/")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder (data.root of the coco_lvis dataset)")
    parser.add_argument("--split", default="train", help="split name of this run's output (default: train)")
    parser.add_argument("--limit", type=int, default=None, metavar="N", help="only the first N images (by id): a trial run")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), metavar="N",
                        help="processes painting labels (default: min(8, CPUs))")
    parser.add_argument("--overwrite", action="store_true",
                        help="delete the split's labels and build it anew (needed when the inputs changed since they were built)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    summary = build(args.lvis, args.stuff, args.images, args.out, split=args.split, limit=args.limit,
                    progress=not args.no_progress, workers=max(1, args.workers), overwrite=args.overwrite)
    print(
        f"coco-lvis {summary['split']}: {summary['images']} images ({summary['images_built']} built, "
        f"{summary['images_kept']} already complete), {summary['classes_present']} of {NUM_CLASSES} classes present, "
        f"{100 * summary['fraction_unlabelled']:.1f}% of pixels unlabelled; wrote {args.out}"
    )
    return 0
