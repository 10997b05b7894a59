"""Shared machinery of the file-based datasets: listing (image, label) pairs, reading labels
without truncation, and checking every sample with errors that name the file.

A file dataset subclasses `FileSegmentation` and provides:

* `NAME`, `CLASS_NAMES` (or `class_names` set in `__init__`), `IGNORE_INDEX`, `LABEL_BITS` (8 or 16:
  the bit depth its label files must have), `SPLITS` (run split "train"/"val" -> the dataset's own
  split name, e.g. ADE20K's "training"/"validation");
* `list_samples(self)`: the `Sample`s of `self.split` under `self.root`, in a fixed order;
* `decode_label(self, raw, sample)`: the file's array -> class ids (int64), `ignore_index`
  elsewhere (e.g. Cityscapes' labelId -> trainId lookup). The default returns `raw` as is.

`__getitem__` reads the image (uint8 RGB) and the label, and checks that both have the same size and
that every label value is a class id or the ignore value. A problem raises `DataError` naming the
file. An unpaired file (an image without its label or a label without its image) is found when the
split is listed: an error naming every such file, or, with `on_bad_sample="skip"`, a warning with
the count; the sample stays listed and is skipped when read, like any other bad sample.

With `on_bad_sample="skip"`, `load_or_skip(index, substitute)` says what to do with a bad sample:
training replaces it by the next good one (`substitute=True`, so batches keep their size),
evaluation leaves it out (`substitute=False`); both return the problems passed over, which the
loaders hand to the engine to count and log (see `scaleseg.data.skipped_samples`).

Images and labels are read as stored: an image's EXIF orientation tag is not applied (label maps
are drawn on the stored pixels, and PNG label files carry no such tag), so the two stay aligned.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from scaleseg.data.io import read_image
from scaleseg.errors import DataError

# The most skipped samples in a row before a skip-mode dataset gives up (something is badly wrong).
MAX_CONSECUTIVE_SKIPS = 20
# Appended to a bad sample's error when it stops a run (data.on_bad_sample=error).
BAD_SAMPLE_FIX = (
    "run `scaleseg check-data` on the config to list every problem, or set data.on_bad_sample=skip to skip "
    "bad samples (counted and logged)"
)


@dataclass(frozen=True)
class Sample:
    """One item of a split: a name (unique in the split), its image file and its label file."""

    name: str
    image: Path
    label: Path


def read_label_file(path: str | Path, bits: int) -> np.ndarray:
    """A label PNG (or TIFF) -> its stored integer values, never truncated or colour-converted.

    Palette ("P") and 8-bit grey ("L") images give their indices; 16-bit PNGs ("I;16") and
    32-bit integer images ("I") their values. `bits` is the largest depth the dataset allows: a
    16-bit file where 8 bits are expected is an error (it would hold ids the dataset cannot have),
    as is a colour (RGB) image, which is a visualisation rather than a label map.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"label {str(path)!r} does not exist")
    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            if mode in ("P", "L", "1"):
                array = np.array(im if mode != "1" else im.convert("L"), dtype=np.uint8)
                depth = 8
            elif mode.startswith("I;16"):
                array = np.array(im, dtype=np.uint16)
                depth = 16
            elif mode == "I":
                array = np.array(im, dtype=np.int64)
                # PIL opens some 16-bit PNGs as mode "I": the file's bit depth decides, not the mode
                depth = 16 if (im.format == "PNG" or array.size == 0 or array.max() <= 65535) else 32
            else:
                raise DataError(
                    f"label {str(path)!r} is a {mode} image; a label map must be single-channel "
                    "(palette, 8-bit or 16-bit grey) holding class ids, not colours"
                )
    except DataError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"label {str(path)!r} cannot be decoded ({exc}); the file is corrupt or not an image") from None
    if depth > bits:
        raise DataError(
            f"label {str(path)!r} is a {depth}-bit image but this dataset's labels are {bits}-bit; "
            "it does not belong to this dataset (or was written with the wrong depth)"
        )
    return array


def format_values(values, limit: int = 10, sep: str = ", ") -> str:
    """The first `limit` items of `values` for an error message, with " ..." when there are more."""
    return sep.join(str(v) for v in values[:limit]) + (" ..." if len(values) > limit else "")


def list_pairs(image_folder: Path, label_folder: Path, image_suffix: str = ".jpg", label_suffix: str = ".png") -> list[Sample]:
    """A sample per stem found among `image_folder/*<image_suffix>` and `label_folder/*<label_suffix>`,
    sorted: `image_folder/<stem><image_suffix>` with `label_folder/<stem><label_suffix>` ([] when neither
    folder exists). A stem found on one side only is listed with the other side's expected path, which
    does not exist: the split's listing reports it (an unpaired file is never silently dropped)."""

    def stems(folder: Path, suffix: str) -> set[str]:
        if not folder.is_dir():
            return set()
        return {p.name[: -len(suffix)] for p in folder.iterdir() if p.name.lower().endswith(suffix) and p.is_file()}

    found = stems(image_folder, image_suffix) | stems(label_folder, label_suffix)
    return [Sample(s, image_folder / f"{s}{image_suffix}", label_folder / f"{s}{label_suffix}") for s in sorted(found)]


def make_palette(num_classes: int, seed: int = 0) -> np.ndarray:
    """(C, 3) uint8 distinct display colours (golden-ratio hues, varied saturation and value)."""
    ids = np.arange(num_classes, dtype=np.float64)
    hue = (ids * 0.6180339887498949 + seed * 0.1) % 1.0
    sat = 0.55 + 0.45 * ((ids * 0.7548776662466927) % 1.0)
    val = 0.6 + 0.4 * ((ids * 0.5698402909980532) % 1.0)
    i = np.floor(hue * 6).astype(np.int64) % 6
    f = hue * 6 - np.floor(hue * 6)
    p, q, t = val * (1 - sat), val * (1 - f * sat), val * (1 - (1 - f) * sat)
    r = np.choose(i, [val, q, p, p, t, val])
    g = np.choose(i, [t, val, val, q, p, p])
    b = np.choose(i, [p, p, t, val, val, q])
    return np.round(np.stack([r, g, b], axis=1) * 255).astype(np.uint8)


def read_lines(path: str | Path, what: str) -> list[str]:
    """Non-empty stripped lines of a text file (split lists, class lists), or a DataError naming it."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{what} {str(path)!r} does not exist")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{what} {str(path)!r} cannot be read ({exc})") from None
    return [line.strip() for line in lines if line.strip()]


def check_root(root: str | Path | None, dataset: str, expected: str) -> Path:
    """`data.root` as a Path, or a DataError saying what layout is expected there."""
    if root is None:
        raise DataError(f"data.root is not set; point it at the extracted {dataset} archive ({expected})")
    path = Path(root).expanduser()
    if not path.is_dir():
        raise DataError(f"data.root {str(path)!r} is not a folder; point it at the extracted {dataset} archive ({expected})")
    return path


class FileSegmentation(Dataset):
    """A split of (image file, label file) pairs; see the module docstring for the protocol."""

    NAME: ClassVar[str] = ""
    CLASS_NAMES: ClassVar[tuple[str, ...]] = ()
    IGNORE_INDEX: ClassVar[int] = 255
    LABEL_BITS: ClassVar[int] = 8
    SPLITS: ClassVar[dict[str, str]] = {"train": "train", "val": "val"}
    LAYOUT: ClassVar[str] = ""  # the expected layout under data.root, for error messages

    def __init__(self, root: str | Path | None, split: str, on_bad_sample: str = "error") -> None:
        if on_bad_sample not in ("error", "skip"):
            raise ValueError(f"on_bad_sample must be 'error' or 'skip', not {on_bad_sample!r}")
        self.root = check_root(root, self.NAME, self.LAYOUT)
        self.split = self.SPLITS.get(split, split)
        self.on_bad_sample = on_bad_sample
        if not getattr(self, "class_names", None):
            self.class_names = list(self.CLASS_NAMES)
        self.num_classes = len(self.class_names)
        self.ignore_index = self.IGNORE_INDEX
        if not hasattr(self, "palette"):
            self.palette = make_palette(self.num_classes)
        self.skipped = 0  # samples skipped by __getitem__ in this process (skip mode)
        samples = self.list_samples()
        if not samples:
            raise DataError(f"{self.NAME}: split {self.split!r} under {str(self.root)!r} has no samples ({self.LAYOUT})")
        self.samples = self._check_listed(samples)

    @classmethod
    def from_config(cls, cfg, split: str) -> "FileSegmentation":
        """Built from a DataConfig; `split` is "train", "val" or a dataset split name. Datasets
        with options (e.g. COCO-Stuff 10k's 171/182-class setting) override this."""
        return cls(root=cfg.root, split=split, on_bad_sample=cfg.on_bad_sample)

    # ------------------------------------------------------------------ to implement
    def list_samples(self) -> list[Sample]:
        raise NotImplementedError

    def decode_label(self, raw: np.ndarray, sample: Sample) -> np.ndarray:
        return raw

    def read_label(self, sample: Sample) -> np.ndarray:
        """The raw label array of a sample (override for non-image formats such as `.mat`)."""
        return read_label_file(sample.label, self.LABEL_BITS)

    # ------------------------------------------------------------------ protocol
    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        """Sample `index`; in skip mode a bad one is replaced by the next good one, with a warning."""
        item, skipped = self.load_or_skip(index, substitute=True)
        for problem in skipped:
            self.skipped += 1
            warnings.warn(f"skipping a bad sample ({self.skipped} skipped so far in this process): {problem}", stacklevel=2)
        return item

    def load_or_skip(self, index: int, substitute: bool) -> tuple[dict | None, list[str]]:
        """(sample, problems of the bad samples passed over). With on_bad_sample="error" a bad sample
        raises DataError (naming the file and the fix). With "skip" a bad sample is passed over: replaced
        by the next good one when `substitute` (training), else the sample is None (evaluation)."""
        if self.on_bad_sample == "error":
            try:
                return self.load(index), []
            except DataError as exc:
                raise DataError(f"{exc}; {BAD_SAMPLE_FIX}") from None
        skipped: list[str] = []
        for attempt in range(MAX_CONSECUTIVE_SKIPS if substitute else 1):
            i = (index + attempt) % len(self.samples)
            try:
                return self.load(i), skipped
            except DataError as exc:
                skipped.append(str(exc))
        if not substitute:
            return None, skipped
        raise DataError(
            f"{self.NAME}: {MAX_CONSECUTIVE_SKIPS} bad samples in a row from index {index}; "
            "the dataset is badly damaged, run `scaleseg check-data` on the config to list every problem"
        )

    def load(self, index: int) -> dict:
        """Read, decode and check sample `index` (raises DataError naming the file)."""
        sample = self.samples[index]
        if not (sample.image.is_file() and sample.label.is_file()):
            raise DataError(self.missing_file_message(sample))
        image = read_image(sample.image, exif=False)
        label = np.asarray(self.decode_label(self.read_label(sample), sample), dtype=np.int64)
        if label.shape != image.shape[:2]:
            raise DataError(
                f"image {str(sample.image)!r} is {image.shape[1]}x{image.shape[0]} but its label "
                f"{str(sample.label)!r} is {label.shape[1]}x{label.shape[0]} (width x height); "
                "they must be the same size"
            )
        self.check_values(label, sample)
        return {"image": image, "label": label, "name": sample.name}

    def check_values(self, label: np.ndarray, sample: Sample) -> None:
        bad = ((label < 0) | (label >= self.num_classes)) & (label != self.ignore_index)
        if bad.any():
            values = np.unique(label[bad])
            shown = format_values(values)
            raise DataError(
                f"label {str(sample.label)!r} has {int(bad.sum())} pixels with values that are neither a "
                f"class (0..{self.num_classes - 1} after decoding) nor ignore ({self.ignore_index}): {shown}. "
                f"Check that data.dataset ({self.NAME}) matches the files"
            )

    def missing_file_message(self, sample: Sample) -> str:
        """What is wrong with a sample whose image or label file does not exist."""
        image, label = sample.image.is_file(), sample.label.is_file()
        if label and not image:
            return f"label {str(sample.label)!r} has no image (expected {str(sample.image)!r})"
        if image and not label:
            return f"image {str(sample.image)!r} has no label (expected {str(sample.label)!r})"
        return f"neither {str(sample.image)!r} nor {str(sample.label)!r} exists (listed in split {self.split!r})"

    def _check_listed(self, samples: list[Sample]) -> list[Sample]:
        """Report samples with a missing file: an error, or in skip mode a warning with their count (they
        stay listed, so every read of one is skipped and counted, and check-data lists each)."""
        missing = [s for s in samples if not (s.image.is_file() and s.label.is_file())]
        if not missing:
            return samples
        shown = format_values([self.missing_file_message(s) for s in missing], limit=5, sep="; ")
        where = f"{self.NAME} split {self.split!r} under {str(self.root)!r}: {len(missing)} of {len(samples)} samples"
        if self.on_bad_sample == "error":
            raise DataError(
                f"{where} lack a file: {shown}. Add the missing files, or set data.on_bad_sample=skip to leave "
                "those samples out (each is skipped, counted and logged)"
            )
        if len(missing) == len(samples):
            raise DataError(f"{where} lack a file, every one of them: {shown}")
        warnings.warn(f"{where} lack a file and will be skipped: {shown}", stacklevel=3)
        return samples
