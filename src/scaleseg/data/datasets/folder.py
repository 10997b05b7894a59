"""A dataset of one's own: images and label maps in two parallel folder trees, class names in a text file."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np

from scaleseg.data.datasets.base import FileSegmentation, Sample, check_root, make_palette
from scaleseg.data.io import IMAGE_SUFFIXES
from scaleseg.errors import DataError

LABEL_SUFFIXES = (".png", ".tif", ".tiff")
MAX_CLASSES = 65535  # ids 0..65534 in a 16-bit label, 65535 = ignore


def read_class_names(path: Path) -> list[str]:
    """Line i of classes.txt = the name of class i. Trailing blank lines are allowed; a blank line
    between names is an error (it would shift every later id)."""
    if not path.is_file():
        raise DataError(f"class list {str(path)!r} does not exist; write one class name per line (line i = class id i)")
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines()]
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"class list {str(path)!r} cannot be read ({exc})") from None
    while lines and not lines[-1]:
        lines.pop()
    blank = [n + 1 for n, line in enumerate(lines) if not line]
    if blank:
        raise DataError(
            f"class list {str(path)!r} has blank lines ({', '.join(map(str, blank[:10]))}) between class names; "
            "line i must name class id i, so give every class a name"
        )
    if not lines:
        raise DataError(f"class list {str(path)!r} is empty; write one class name per line (line i = class id i)")
    if len(lines) > MAX_CLASSES:
        raise DataError(
            f"class list {str(path)!r} names {len(lines)} classes; the folder dataset stores ids in 16-bit labels "
            f"with 65535 as ignore, so at most {MAX_CLASSES} classes"
        )
    return lines


def read_palette(path: Path, num_classes: int) -> np.ndarray:
    """palette.txt: line i = `r g b` (0..255, spaces or commas) of class i -> (C, 3) uint8."""
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines()]
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"palette {str(path)!r} cannot be read ({exc})") from None
    while lines and not lines[-1]:
        lines.pop()
    colours = []
    for n, line in enumerate(lines, start=1):
        parts = [p for p in re.split(r"[,\s]+", line) if p]
        try:
            rgb = [int(p) for p in parts]
        except ValueError:
            rgb = []
        if len(rgb) != 3 or not all(0 <= v <= 255 for v in rgb):
            raise DataError(f"palette {str(path)!r} line {n} is {line!r}; each line must be three integers 0..255: r g b")
        colours.append(rgb)
    if len(colours) < num_classes:
        raise DataError(
            f"palette {str(path)!r} has {len(colours)} colours but classes.txt names {num_classes} classes; "
            "give one `r g b` line per class (or delete palette.txt for generated colours)"
        )
    return np.array(colours[:num_classes], dtype=np.uint8)


def _index_files(folder: Path, suffixes: tuple[str, ...], what: str) -> tuple[dict[str, Path], dict[str, list[Path]]]:
    """(relative path without suffix (posix) -> file, the keys that more than one file has -> those files),
    for the files under `folder` with one of `suffixes`."""
    found: dict[str, Path] = {}
    duplicates: dict[str, list[Path]] = {}
    for path in sorted(folder.rglob("*")):
        if path.suffix.lower() not in suffixes or not path.is_file() or path.name.startswith("."):
            continue
        key = path.relative_to(folder).with_suffix("").as_posix()
        if key in found:
            duplicates.setdefault(key, [found[key]]).append(path)
            continue
        found[key] = path
    return found, duplicates


def _same_name_message(what: str, files: list[Path]) -> str:
    return (f"{what} {' and '.join(repr(str(p)) for p in files)} have the same name; keep one file per name "
            "(images and labels are paired by their path without the suffix)")


class FolderSegmentation(FileSegmentation):
    """Your own data (``data.dataset=folder``): images and label maps in parallel folder trees.

    Layout under ``data.root``::

        classes.txt                  one class name per line: line i (from 0) names class id i
        palette.txt                  optional: line i = "r g b" display colour of class i
        images/<split>/**/<stem>.<jpg|jpeg|png|bmp|tif|tiff|webp|ppm|pgm>
        labels/<split>/**/<stem>.<png|tif|tiff>

    An image and its label have the same path relative to ``images/<split>`` and ``labels/<split>``
    and the same stem (``images/train/a/x.jpg`` <-> ``labels/train/a/x.png``); the sample name is
    that path without suffix (``a/x``). Splits: ``train`` and ``val`` by default; any folder name
    under ``images/`` works (``data.train_split`` / ``data.val_split``).

    Labels hold class ids as pixel values, single-channel: 8-bit or 16-bit PNG (palette PNGs give
    their indices), or TIFF. With up to 255 classes the labels are 8-bit and 255 is ignore; with
    256 to 65,535 classes they may be 16-bit and 65535 is ignore (8-bit files are fine there too,
    but can only hold ids 0..255). 16-bit labels are read without truncation. Without
    ``palette.txt``, display colours are generated.

    An image without a label or a label without an image is an error listing them, or skipped with
    ``data.on_bad_sample=skip`` (with a warning that counts them). No converter is needed.
    """

    NAME = "folder"
    SPLITS = {"train": "train", "val": "val"}
    LAYOUT = (
        "data.root must hold classes.txt (one class name per line), images/<split>/... and "
        "labels/<split>/... with the same relative paths and stems (labels .png or .tif)"
    )

    def __init__(self, root, split: str, on_bad_sample: str = "error") -> None:
        folder = check_root(root, self.NAME, self.LAYOUT)
        self.class_names = read_class_names(folder / "classes.txt")
        num_classes = len(self.class_names)
        # instance attributes: the ignore value and label depth depend on the class count
        self.IGNORE_INDEX = 255 if num_classes <= 255 else 65535
        self.LABEL_BITS = 8 if num_classes <= 255 else 16
        palette_file = folder / "palette.txt"
        self.palette = read_palette(palette_file, num_classes) if palette_file.is_file() else make_palette(num_classes)
        super().__init__(root, split, on_bad_sample)

    def list_samples(self) -> list[Sample]:
        image_dir = self.root / "images" / self.split
        label_dir = self.root / "labels" / self.split
        for folder in (image_dir, label_dir):
            if not folder.is_dir():
                raise DataError(f"folder: {str(folder)!r} does not exist ({self.LAYOUT})")
        images, same_images = _index_files(image_dir, IMAGE_SUFFIXES, "images")
        labels, same_labels = _index_files(label_dir, LABEL_SUFFIXES, "labels")
        # a name with two images (or labels) is ambiguous: an error, or in skip mode (check-data) a problem of
        # that sample alone, kept in `listing_problems` so that the split's other problems are still found
        self.listing_problems = [
            (key, tuple(str(p) for p in files), _same_name_message(what, files))
            for what, same in (("images", same_images), ("labels", same_labels)) for key, files in sorted(same.items())
        ]
        if self.listing_problems and self.on_bad_sample == "error":
            raise DataError("; ".join(m for _, _, m in self.listing_problems))
        ambiguous = {key for key, _, _ in self.listing_problems}
        if ambiguous:
            warnings.warn(f"folder split {self.split!r}: skipping {len(ambiguous)} samples whose name two files "
                          f"share: {', '.join(sorted(ambiguous)[:5])}", stacklevel=3)
        samples = []
        for key in sorted((images.keys() | labels.keys()) - ambiguous):
            # a missing side gets a placeholder path that does not exist: `_check_listed` reports it
            image = images.get(key, image_dir / f"{key}.*")
            label = labels.get(key, label_dir / f"{key}.png")
            samples.append(Sample(name=key, image=image, label=label))
        return samples

    def missing_file_message(self, sample: Sample) -> str:
        if sample.label.is_file() and not sample.image.is_file():
            return f"label {str(sample.label)!r} has no image (expected images/{self.split}/{sample.name}.<jpg|png|...>)"
        if sample.image.is_file() and not sample.label.is_file():
            return (f"image {str(sample.image)!r} has no label (expected labels/{self.split}/{sample.name}.png or "
                    ".tif, the same relative path and stem)")
        return super().missing_file_message(sample)
