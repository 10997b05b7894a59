"""Build Pascal VOC 2012 "trainaug" (VOC train + SBD train + SBD val, minus VOC val; 10,582 images
on the real data) for the `voc_aug` dataset. Writes, inside VOCdevkit/VOC2012:

* SegmentationClassAug/<id>.png: an 8-bit palette PNG (VOC colours) for every trainaug id: VOC's own
  SegmentationClass mask where VOC has one (VOC train ids; it takes priority), otherwise the SBD
  mask GTcls.Segmentation of dataset/cls/<id>.mat (0 background, 1..20 classes, values kept);
* ImageSets/Segmentation/trainaug.txt: the ids, sorted, one per line (written last, so its presence
  means every mask was written).

Idempotent: masks already written are skipped (each is written to a temporary name and renamed,
so a file that exists is complete); an interrupted run resumes where it stopped, and the temporary
files of a killed run are removed.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from scaleseg.data.datasets.base import read_label_file, read_lines
from scaleseg.data.datasets.voc import VOC_CLASSES, VOC_COLORMAP, find_voc2012
from scaleseg.data.io import remove_temporaries, write_png_atomic, write_text_atomic
from scaleseg.errors import DataError

HELP = "build VOC 2012 trainaug: SBD masks -> SegmentationClassAug/*.png and trainaug.txt"

SBD_LAYOUT = "the SBD folder (benchmark_RELEASE) holding dataset/cls/<id>.mat, dataset/train.txt and dataset/val.txt"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--voc", required=True, help="VOCdevkit/VOC2012 (or the folder holding VOCdevkit/)")
    parser.add_argument("--sbd", required=True, help=SBD_LAYOUT + " (or that dataset/ folder itself)")
    parser.add_argument("--overwrite", action="store_true", help="rewrite masks that already exist")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def find_sbd(root: str | Path) -> Path:
    """SBD's `dataset` folder: root/dataset or root itself (holding cls/ and train.txt)."""
    root = Path(root).expanduser()
    for candidate in (root / "dataset", root):
        if (candidate / "cls").is_dir() and (candidate / "train.txt").is_file():
            return candidate
    raise DataError(f"no SBD found under {str(root)!r}: --sbd must be {SBD_LAYOUT}")


def trainaug_ids(voc_train: list[str], voc_val: list[str], sbd_train: list[str], sbd_val: list[str]) -> list[str]:
    """VOC train + SBD train + SBD val, minus VOC val; sorted, without duplicates."""
    return sorted((set(voc_train) | set(sbd_train) | set(sbd_val)) - set(voc_val))


def read_sbd_mask(path: Path) -> np.ndarray:
    """GTcls.Segmentation of an SBD `cls/<id>.mat` file: (H, W) uint8 class ids 0..20."""
    import scipy.io
    from scipy.io.matlab import MatReadError

    if not path.is_file():
        raise DataError(f"SBD mask {str(path)!r} does not exist; the SBD archive is incomplete (re-extract benchmark.tgz)")
    try:
        mat = scipy.io.loadmat(path, variable_names=["GTcls"], struct_as_record=False, squeeze_me=True)
    except (MatReadError, ValueError, OSError, NotImplementedError, TypeError, EOFError) as exc:
        raise DataError(f"SBD mask {str(path)!r} cannot be read as a MATLAB file ({exc}); the file is corrupt") from None
    gt = mat.get("GTcls")
    seg = getattr(gt, "Segmentation", None) if gt is not None else None
    if seg is None:
        raise DataError(
            f"SBD mask {str(path)!r} has no GTcls.Segmentation; it is not an SBD class mask (dataset/cls/*.mat)"
        )
    seg = np.asarray(seg)
    if seg.ndim != 2 or not (np.issubdtype(seg.dtype, np.integer) or np.issubdtype(seg.dtype, np.floating)):
        raise DataError(f"SBD mask {str(path)!r}: GTcls.Segmentation is a {seg.dtype} array of shape {seg.shape}, not a 2-D label map")
    num_classes = len(VOC_CLASSES)
    bad = ((seg < 0) | (seg >= num_classes) | (seg != np.round(seg))) & (seg != 255)
    if bad.any():
        values = ", ".join(str(v) for v in np.unique(seg[bad])[:10])
        raise DataError(f"SBD mask {str(path)!r} has values that are not VOC class ids (0..20, 255): {values}")
    return seg.astype(np.uint8)


def is_complete(path: Path) -> bool:
    """True if `path` exists as a single-channel PNG (its header only is read)."""
    if not path.is_file():
        return False
    try:
        with Image.open(path) as im:
            return im.format == "PNG" and im.mode in ("P", "L")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        return False


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    voc = find_voc2012(args.voc, what="--voc")
    sbd = find_sbd(args.sbd)
    sets = voc / "ImageSets" / "Segmentation"
    voc_train = read_lines(sets / "train.txt", "VOC split list")
    voc_val = read_lines(sets / "val.txt", "VOC split list")
    sbd_train = read_lines(sbd / "train.txt", "SBD split list")
    sbd_val = read_lines(sbd / "val.txt", "SBD split list")
    ids = trainaug_ids(voc_train, voc_val, sbd_train, sbd_val)
    from_voc = set(voc_train)

    out_dir = voc / "SegmentationClassAug"
    out_dir.mkdir(exist_ok=True)
    remove_temporaries(out_dir)  # of a run killed mid-write
    written = skipped = 0
    for i in tqdm(ids, desc="voc trainaug masks", unit="img", disable=args.no_progress):
        target = out_dir / f"{i}.png"
        if not args.overwrite and is_complete(target):
            skipped += 1
            continue
        if i in from_voc:
            mask = read_label_file(voc / "SegmentationClass" / f"{i}.png", bits=8)  # indices, 255 borders kept
        else:
            mask = read_sbd_mask(sbd / "cls" / f"{i}.mat")
        write_png_atomic(target, mask, palette=VOC_COLORMAP)
        written += 1

    split_file = sets / "trainaug.txt"
    text = "".join(f"{i}\n" for i in ids)
    if args.overwrite or not split_file.is_file() or split_file.read_text(encoding="utf-8") != text:
        write_text_atomic(split_file, text)
    from_sbd = sum(1 for i in ids if i not in from_voc)
    print(
        f"voc-aug: trainaug has {len(ids)} images ({len(ids) - from_sbd} VOC masks, {from_sbd} SBD masks); "
        f"{written} masks written, {skipped} already present; list in {str(split_file)!r}"
    )
    return 0
