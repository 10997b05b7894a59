"""Write the Pascal-Context labels (59 classes + background) from the Detail API's annotations:

    scaleseg prepare pascal-context --voc data/VOCdevkit/VOC2010 --json data/trainval_merged.json

Input: the PASCAL VOC 2010 folder (VOCtrainval_03-May-2010.tar, holding JPEGImages/) and the Detail
API's `trainval_merged.json` (PASCAL in Detail: `images` with image_id, file_name, height, width and
phase train/val; `annos_segmentation` with image_id, category_id and a COCO RLE `segmentation`;
`categories` with category_id and name).

Labels, as the Detail API's class mask and mmsegmentation's conversion make them: for each image, 0
everywhere, then every segmentation annotation of the image in file order painted with its category id
(a later one over an earlier one); then the 60 benchmark ids (0 and the 59 of
`scaleseg.data.datasets.pascal_context.CONTEXT_CATEGORY_IDS`) are mapped, in ascending order, to 0..59.
A category outside those 60 stops the build naming the image (mmsegmentation's converter asserts the
same: trainval_merged.json holds the benchmark's categories only). Decoded with pycocotools.

Output, inside the VOC2010 folder (the layout mmsegmentation's converter writes):
  SegmentationClassContext/<id>.png           8-bit grey, 0..59 (0 background)
  ImageSets/SegmentationContext/train.txt     the train ids, sorted (4,998 on the real data); val.txt (5,105)
  ImageSets/SegmentationContext/build.json    the --json file's size and SHA-256 the labels were built from

Resumable: each label is written under a temporary name and renamed, a complete one is kept, the
temporary files of a killed run are removed, and the split lists are written last. Only a build from
the same annotation file resumes; another file needs --overwrite (which rebuilds every label).
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from scaleseg.data.datasets.pascal_context import (
    CONTEXT_CATEGORY_IDS, LABEL_DIR, PASCAL_CONTEXT_CLASSES, SPLIT_DIR, find_voc2010,
)
from scaleseg.data.io import read_json, remove_temporaries, write_png_atomic, write_text_atomic
from scaleseg.data.prepare.coco_lvis import _mask_utils, file_fingerprint, segmentation_rle
from scaleseg.errors import DataError

HELP = "write Pascal-Context labels (59 classes + background) from the Detail API's trainval_merged.json"

PHASES = ("train", "val")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--voc", required=True, help="VOCdevkit/VOC2010 (or the folder holding VOCdevkit/)")
    parser.add_argument("--json", required=True, help="the Detail API's trainval_merged.json")
    parser.add_argument("--overwrite", action="store_true", help="rewrite every label (needed after another --json)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def category_lut() -> np.ndarray:
    """(max id + 1,) int64: Detail category id -> label 0..59; -1 for the ids outside the benchmark."""
    lut = np.full(max(CONTEXT_CATEGORY_IDS) + 1, -1, dtype=np.int64)
    lut[list(CONTEXT_CATEGORY_IDS)] = np.arange(len(CONTEXT_CATEGORY_IDS))
    return lut


def _load(path: Path) -> dict:
    data = read_json(path, "--json", "; pass the Detail API's trainval_merged.json")
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in ("images", "annos_segmentation")):
        raise DataError(
            f"--json {str(path)!r} is not a Detail API annotation file (it needs 'images' and 'annos_segmentation' "
            "lists); pass trainval_merged.json"
        )
    return data


def _images(data: dict, path: Path) -> list[dict]:
    try:
        images = [{"image_id": im["image_id"], "name": Path(str(im["file_name"])).stem, "height": int(im["height"]),
                   "width": int(im["width"]), "phase": str(im["phase"])} for im in data["images"]]
    except (KeyError, TypeError, ValueError):
        raise DataError(f"--json {str(path)!r}: an image lacks image_id, file_name, an integer height and width, or phase") from None
    return [im for im in images if im["phase"] in PHASES]


def _check_names(data: dict, path: Path) -> None:
    """Warn if the file names the benchmark ids otherwise than Pascal-Context does (another vocabulary?)."""
    names = {}
    for c in data.get("categories") or []:
        if isinstance(c, dict) and "category_id" in c:
            names[c["category_id"]] = str(c.get("name", ""))
    wrong = [(i, names[i], n) for i, n in zip(CONTEXT_CATEGORY_IDS[1:], PASCAL_CONTEXT_CLASSES[1:])
             if i in names and names[i].replace(" ", "").lower() != n]
    if wrong:
        shown = ", ".join(f"{i} is {a!r}, not {b!r}" for i, a, b in wrong[:3])
        warnings.warn(f"--json {str(path)!r} names {len(wrong)} benchmark categories otherwise ({shown}); is it "
                      "trainval_merged.json?", stacklevel=3)


def paint(image: dict, annotations: list[dict], lut: np.ndarray, where: str) -> np.ndarray:
    """(H, W) uint8 label 0..59 of one image (see the module docstring)."""
    mask_utils = _mask_utils()
    h, w = image["height"], image["width"]
    ids = np.zeros((h, w), dtype=np.int64)
    for a in annotations:
        rle = segmentation_rle(a["segmentation"], h, w, f"{where}, annotation {a.get('id')}")
        if rle is None:
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # pycocotools and NumPy 2
            ids[mask_utils.decode(rle).astype(bool)] = int(a["category_id"])
    bad = (ids < 0) | (ids >= len(lut))
    labels = np.where(bad, -1, lut[np.clip(ids, 0, len(lut) - 1)])
    if (labels < 0).any():
        values = ", ".join(str(v) for v in np.unique(ids[labels < 0])[:10])
        raise DataError(
            f"{where}: categories {values} are not among the 59 Pascal-Context benchmark classes; "
            "trainval_merged.json annotates only those (is --json another Detail API file?)"
        )
    return labels.astype(np.uint8)


def is_complete(path: Path, height: int, width: int) -> bool:
    """True if `path` is a single-channel PNG of the image's size (its header only is read)."""
    if not path.is_file():
        return False
    try:
        with Image.open(path) as im:
            return im.format == "PNG" and im.mode in ("L", "P") and im.size == (width, height)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        return False


def _check_resume(label_dir: Path, record_path: Path, fingerprint: dict, overwrite: bool) -> None:
    if overwrite or not any(label_dir.glob("*.png")):
        return
    try:
        previous = json.loads(record_path.read_text(encoding="utf-8")).get("json")
    except (OSError, ValueError, AttributeError):
        previous = None
    same = isinstance(previous, dict) and (previous.get("bytes"), previous.get("sha256")) == (
        fingerprint["bytes"], fingerprint["sha256"])
    if not same:
        was = (f"{Path(previous['file']).name} ({previous.get('bytes')} bytes, sha256 {str(previous.get('sha256'))[:12]})"
               if isinstance(previous, dict) and "file" in previous else "an unrecorded annotation file")
        raise DataError(
            f"{str(label_dir)!r} holds labels built from {was}, not from --json {Path(fingerprint['file']).name} "
            f"({fingerprint['bytes']} bytes, sha256 {fingerprint['sha256'][:12]}); resuming would keep them. "
            "Run again with --overwrite to rebuild every label"
        )


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    _mask_utils()  # fail before reading the JSON if pycocotools is missing
    voc = find_voc2010(args.voc, what="--voc")
    json_path = Path(args.json).expanduser()
    data = _load(json_path)
    images = _images(data, json_path)
    if not images:
        raise DataError(f"--json {str(json_path)!r} lists no image of phase train or val")
    _check_names(data, json_path)
    by_image: dict = {}
    for a in data["annos_segmentation"]:
        try:
            key, _ = a["image_id"], int(a["category_id"])
            if "segmentation" not in a:
                raise KeyError("segmentation")
        except (KeyError, TypeError, ValueError):
            raise DataError(f"--json {str(json_path)!r}: a segmentation annotation lacks image_id, category_id "
                            "or segmentation") from None
        by_image.setdefault(key, []).append(a)
    del data

    label_dir, split_dir = voc / LABEL_DIR, voc / SPLIT_DIR
    label_dir.mkdir(exist_ok=True)
    split_dir.mkdir(parents=True, exist_ok=True)
    remove_temporaries(label_dir)  # of a run killed mid-write
    fingerprint = file_fingerprint(json_path)
    record_path = split_dir / "build.json"
    _check_resume(label_dir, record_path, fingerprint, args.overwrite)
    write_text_atomic(record_path, json.dumps({"json": fingerprint}, indent=1) + "\n")

    missing = [im["name"] for im in images if not (voc / "JPEGImages" / f"{im['name']}.jpg").is_file()]
    if missing:
        warnings.warn(f"{len(missing)} of {len(images)} images are not in {str(voc / 'JPEGImages')!r} (e.g. "
                      f"{missing[0]}.jpg); their labels are written, the loader will report them", stacklevel=2)
    lut = category_lut()
    written = kept = 0
    for im in tqdm(images, desc="pascal-context labels", unit="img", disable=args.no_progress, dynamic_ncols=True):
        target = label_dir / f"{im['name']}.png"
        if not args.overwrite and is_complete(target, im["height"], im["width"]):
            kept += 1
            continue
        where = f"--json {str(json_path)!r}, image {im['name']}"
        write_png_atomic(target, paint(im, by_image.get(im["image_id"], []), lut, where))
        written += 1
    for phase in PHASES:  # last: a split list means its labels are complete
        names = sorted(im["name"] for im in images if im["phase"] == phase)
        write_text_atomic(split_dir / f"{phase}.txt", "".join(f"{n}\n" for n in names))
    counts = {p: sum(im["phase"] == p for im in images) for p in PHASES}
    print(f"pascal-context: {len(images)} images (train {counts['train']}, val {counts['val']}); {written} labels "
          f"written, {kept} already complete; in {str(label_dir)!r} and {str(split_dir)!r}")
    return 0
