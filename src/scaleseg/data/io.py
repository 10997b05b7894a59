"""Reading images and writing label maps, with errors that name the file."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from scaleseg.errors import DataError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


def read_image(path: str | Path, exif: bool = True) -> np.ndarray:
    """Any image PIL reads -> uint8 RGB (H, W, 3): grayscale (8/16-bit), palette, RGBA (alpha
    dropped), CMYK. With `exif` (a photo to predict on) its EXIF orientation is applied, as an image
    viewer shows it; datasets read `exif=False`, the pixels as stored, since their label maps are drawn
    on the stored pixels and carry no orientation of their own (image and label stay aligned)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"image {str(path)!r} does not exist")
    try:
        with Image.open(path) as im:
            if exif:
                im = ImageOps.exif_transpose(im)
            im.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"image {str(path)!r} cannot be decoded ({exc}); the file is corrupt or not an image") from None
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(im, dtype=np.float64)
        high = 65535.0 if im.mode.startswith("I;16") else max(float(array.max()), 1.0)
        gray = np.clip(array / high * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    return np.array(im.convert("RGB"), dtype=np.uint8)  # writable


def read_json(path: Path, what: str, missing_hint: str = "") -> object:
    """The parsed JSON of `path`; a missing or unreadable file is a DataError naming `what` and the path
    (`missing_hint` is appended to the missing-file message, e.g. "; pass ...")."""
    import json

    if not path.is_file():
        raise DataError(f"{what} {str(path)!r} does not exist{missing_hint}")
    try:
        with open(path, "rb") as f:
            return json.load(f)
    except (OSError, ValueError) as exc:
        raise DataError(f"{what} {str(path)!r} cannot be read as JSON ({exc})") from None


def save_label_map(path: Path, label: np.ndarray, num_classes: int) -> Path:
    """Write class ids losslessly: 8-bit PNG for up to 255 classes, 16-bit PNG up to 65,536,
    32-bit TIFF beyond (the suffix changes to .tif). Returns the path written."""
    path = Path(path)
    if num_classes <= 255:
        Image.fromarray(label.astype(np.uint8), mode="L").save(path.with_suffix(".png"))
        return path.with_suffix(".png")
    if num_classes <= 65536:
        Image.fromarray(label.astype(np.uint16)).save(path.with_suffix(".png"))  # mode I;16
        return path.with_suffix(".png")
    out = path.with_suffix(".tif")
    Image.fromarray(label.astype(np.int32), mode="I").save(out)
    return out


def overlay(image: np.ndarray, label: np.ndarray, palette: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend class colours over the image: uint8 (H, W, 3)."""
    colours = palette[label].astype(np.float32)
    return (image.astype(np.float32) * (1 - alpha) + colours * alpha + 0.5).astype(np.uint8)


def list_images(path: Path) -> list[Path]:
    """A single image file, or the image files in a folder (recursively), sorted."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise DataError(f"{str(path)!r} is neither an image file nor a folder")
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"folder {str(path)!r} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return files


def atomic_write(path: str | Path, write) -> None:
    """Call `write(tmp)` on a hidden temporary path beside `path`, then rename it over `path`, so a
    reader (or a resumed converter) never sees a half-written file. On failure the temporary is
    removed; an OSError becomes a DataError naming `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as exc:
        raise DataError(f"cannot write {str(path)!r} ({exc}); check that the folder is writable and the disk not full") from None
    finally:
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()


def remove_temporaries(folder: str | Path) -> int:
    """Delete the temporary files `atomic_write` leaves in `folder` when its process is killed mid-write
    (`.<name>.<pid>.tmp`, possibly empty); finished files are never touched. -> how many."""
    folder = Path(folder)
    stale = [p for p in folder.glob(".*.tmp") if p.is_file() or p.is_symlink()] if folder.is_dir() else []
    for path in stale:
        path.unlink()
    return len(stale)


def write_text_atomic(path: str | Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_png_atomic(path: str | Path, label: np.ndarray, palette: np.ndarray | None = None) -> None:
    """A label map as a PNG, atomically: uint8 -> 8-bit grey (a palette PNG with `palette`, (256, 3)
    uint8), uint16 -> 16-bit grey. Other dtypes are refused rather than silently converted."""
    label = np.ascontiguousarray(label)
    if label.dtype == np.uint8:
        image = Image.fromarray(label, mode="L")
        if palette is not None:
            image.putpalette(np.asarray(palette, dtype=np.uint8).reshape(-1).tolist())  # mode P
    elif label.dtype == np.uint16:
        if palette is not None:
            raise ValueError("a 16-bit PNG cannot have a palette")
        image = Image.fromarray(label)  # mode I;16
    else:
        raise ValueError(f"write_png_atomic takes uint8 or uint16 labels, not {label.dtype}")
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))
