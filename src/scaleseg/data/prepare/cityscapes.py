"""Write Cityscapes trainId label maps: beside every gtFine/<split>/<city>/<name>_gtFine_labelIds.png,
an 8-bit <name>_gtFine_labelTrainIds.png holding the 19 trainIds (road 0 .. bicycle 18) and 255 for
every label id that is not evaluated. The `cityscapes` dataset reads these files when present
(the same values it would compute from the labelIds files).

Idempotent: label maps already written are skipped (each is written to a temporary name and
renamed, so a file that exists is complete); an interrupted run resumes where it stopped, and the
temporary files of a killed run are removed.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from scaleseg.data.datasets.base import read_label_file
from scaleseg.data.io import remove_temporaries, write_png_atomic
from scaleseg.data.datasets.cityscapes import LABEL_ID_SUFFIX, LABEL_TO_TRAIN, TRAIN_ID_SUFFIX, list_label_id_files
from scaleseg.errors import DataError

HELP = "write gtFine *_labelTrainIds.png (19 trainIds, 255 ignore) beside the *_labelIds.png files"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--root", required=True, help="the Cityscapes folder holding gtFine/ (and leftImg8bit/)")
    parser.add_argument("--splits", default="train,val", help="comma-separated gtFine splits to convert (default: train,val)")
    parser.add_argument("--overwrite", action="store_true", help="rewrite label maps that already exist")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    root = Path(args.root).expanduser()
    splits = [s.strip() for s in args.splits.split(",") if s.strip()]
    if not splits:
        raise DataError("--splits is empty; give e.g. --splits train,val")
    sources: list[Path] = []
    for split in splits:
        folder = root / "gtFine" / split
        if not folder.is_dir():
            raise DataError(
                f"folder {str(folder)!r} does not exist; --root must be the folder where gtFine_trainvaltest.zip "
                "was extracted (holding gtFine/train, gtFine/val)"
            )
        found = list_label_id_files(root, split)
        if not found:
            raise DataError(f"folder {str(folder)!r} holds no <city>/*{LABEL_ID_SUFFIX} files")
        sources += found
    for folder in sorted({p.parent for p in sources}):
        remove_temporaries(folder)  # of a run killed mid-write

    written = skipped = 0
    for source in tqdm(sources, desc="cityscapes trainIds", unit="img", disable=args.no_progress):
        target = source.with_name(source.name[: -len(LABEL_ID_SUFFIX)] + TRAIN_ID_SUFFIX)
        if not args.overwrite and is_complete(target, source):
            skipped += 1
            continue
        train_ids = LABEL_TO_TRAIN[read_label_file(source, bits=8)]  # (H, W) uint8
        write_png_atomic(target, train_ids)
        written += 1
    print(f"cityscapes: {written} trainId label maps written, {skipped} already present ({', '.join(splits)})")
    return 0


def is_complete(target: Path, source: Path) -> bool:
    """True if `target` exists as a single-channel PNG of the source's size (headers only)."""
    if not target.is_file():
        return False
    try:
        with Image.open(target) as out, Image.open(source) as src:
            return out.format == "PNG" and out.mode in ("L", "P") and out.size == src.size
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        return False
