"""Convert the full ADE20K release (ADE20K_2021_17_01) into ADE20K-full: 16-bit labels of 847 classes.

Two class lists (--classes):
  maskformer (default): the ADE20K-full benchmark as MaskFormer prepares it, which is what published
    results are compared against: a fixed list of 847 full indices, full index MASKFORMER_FULL_INDICES[t]
    -> class t (see `scaleseg.data.prepare.maskformer_ade20k_full` for the source), and every image
    whose shorter side exceeds 512 resized to a shorter side of 512 (--max-short-side).
  ranked: ours, the --num-classes most frequent classes of the training images you have (by the
    number of training images holding them, ties by the smaller full index), most frequent first.
    It recomputes a selection rather than reproducing the benchmark's ids.

Input (--root, the extracted release):
  images/ADE/{training,validation}/<scene folders...>/<name>.jpg with <name>_seg.png beside it,
  found recursively. In a *_seg.png the full class index of a pixel is (R // 10) * 256 + G
  (B encodes instances and is ignored); 0 means unlabelled.
  Optional: objects.txt (tab-separated, first column the class name, row k naming full index k)
  or index_ade20k.pkl (its 'objectnames' list, entry k - 1 naming full index k) for class names.

Resizing (--max-short-side, 512 by default as MaskFormer; 0 keeps every size): an image whose shorter
side S exceeds it gets the shorter side max_short_side and the longer side round(L / S * max), Python's
round as in MaskFormer's script. The class map follows OpenCV's nearest rule (INTER_NEAREST: output
pixel i takes input pixel floor(i * in / out)), so the labels equal MaskFormer's; the image is resized
bilinearly (half-pixel centres, no antialiasing, as OpenCV's INTER_LINEAR) and saved as JPEG quality
95. MaskFormer's script re-encodes every image with PIL's default quality 75; images that need no
resizing are linked here unchanged, so image pixels differ from its files by JPEG re-encoding only.

Output (--out, the `data.root` of `data.dataset=ade20k_full`):
  classes.txt                                     <id> TAB <full index> TAB <name>, one line per class
  prepare.json                                    the class list and resizing this folder was written with
  class_image_counts.tsv                          (ranked) every full index seen in training, ranked
  annotations/{training,validation}/<name>.png    16-bit PNG: listed classes -> 0..N-1, the rest and 0 -> 65535
  images/{training,validation}/<name>.jpg         absolute symlinks to the release's images (copies with
                                                  --copy-images), or the resized JPEG

Resumable and idempotent: each output is written to a temporary name in its folder and then
renamed, so a file that exists is complete; a second run skips finished samples (and reuses the
training counts while the training files are unchanged) and removes the temporary files of a
killed run. A run that would change the class list or the resizing of an existing --out stops with
an error unless --overwrite is given. Class names read from index_ade20k.pkl use a restricted
unpickler that only rebuilds numpy arrays and plain Python containers (no arbitrary code runs).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pickle
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from scaleseg.data.io import atomic_write, read_image, write_png_atomic, write_text_atomic
from scaleseg.data.prepare.maskformer_ade20k_full import MASKFORMER_FULL_INDICES
from scaleseg.errors import DataError

HELP = "full ADE20K release -> ADE20K-full: 16-bit labels of MaskFormer's 847 benchmark classes (or the N most frequent)"

SPLITS = ("training", "validation")
SEG_SUFFIX = "_seg.png"
IGNORE = 65535
# (R // 10) * 256 + G with R, G <= 255: the largest full index a *_seg.png can hold is 25 * 256 + 255
NUM_FULL_INDICES = (255 // 10) * 256 + 256
CLASSES_FILE = "classes.txt"
COUNTS_FILE = "class_image_counts.tsv"
RECORD_FILE = "prepare.json"
MASKFORMER_SHORT_SIDE = 512


def add_arguments(parser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter  # keep the layout of the module docstring
    parser.add_argument("--root", required=True, help="the extracted full release (ADE20K_2021_17_01), holding images/ADE/")
    parser.add_argument("--out", required=True, help="output folder (use it as data.root with data.dataset=ade20k_full)")
    parser.add_argument("--classes", choices=["maskformer", "ranked"], default="maskformer",
                        help="maskformer (default): the benchmark's fixed 847-class list; ranked: the --num-classes "
                             "most frequent classes of your training images")
    parser.add_argument("--num-classes", type=int, default=None,
                        help="with --classes ranked: keep this many most frequent classes (default 847)")
    parser.add_argument("--max-short-side", type=int, default=MASKFORMER_SHORT_SIDE,
                        help="resize images whose shorter side is longer to this shorter side (default 512, as "
                             "MaskFormer; 0 keeps every size)")
    parser.add_argument("--copy-images", action="store_true", help="copy the images instead of symlinking them")
    parser.add_argument("--workers", type=int, default=1, help="processes reading and writing files (default 1)")
    parser.add_argument("--overwrite", action="store_true", help="rewrite every output, even complete ones")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


# ---------------------------------------------------------------------------------------- decoding
def decode_full_index(seg: np.ndarray) -> np.ndarray:
    """(H, W, >=3) uint8 *_seg.png -> (H, W) int32 full class index (R // 10) * 256 + G; 0 = unlabelled."""
    return (seg[..., 0].astype(np.int32) // 10) * 256 + seg[..., 1].astype(np.int32)


def read_seg(path: Path) -> np.ndarray:
    """A *_seg.png -> its (H, W) full class indices, or a DataError naming the file."""
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode not in ("RGB", "RGBA"):
                raise DataError(
                    f"segmentation {str(path)!r} is a {im.mode} image; full-ADE20K *_seg.png files are RGB "
                    "(class = R // 10 * 256 + G). Is --root the full release (ADE20K_2021_17_01)?"
                )
            seg = np.asarray(im)
    except DataError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"segmentation {str(path)!r} cannot be decoded ({exc}); the file is corrupt, extract it again") from None
    return decode_full_index(seg)


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) from the image header, or a DataError naming the file."""
    if not path.is_file():
        raise DataError(f"image {str(path)!r} does not exist (its segmentation is beside it); extract the release again")
    try:
        with Image.open(path) as im:
            return im.size
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"image {str(path)!r} cannot be decoded ({exc}); the file is corrupt, extract it again") from None


# ---------------------------------------------------------------------------------------- listing
def find_samples(root: Path) -> dict[str, list[tuple[str, Path, Path]]]:
    """split -> sorted (name, image, seg) of every *_seg.png under images/ADE/<split>/ (recursively)."""
    base = root / "images" / "ADE"
    if not base.is_dir():
        raise DataError(
            f"--root {str(root)!r} has no images/ADE folder; point it at the extracted full ADE20K release "
            "(ADE20K_2021_17_01, holding images/ADE/{training,validation}/<scene>/<name>.jpg and <name>_seg.png)"
        )
    samples: dict[str, list[tuple[str, Path, Path]]] = {}
    for split in SPLITS:
        found: dict[str, tuple[str, Path, Path]] = {}
        folder = base / split
        for seg in sorted(folder.rglob(f"*{SEG_SUFFIX}")) if folder.is_dir() else []:
            if not seg.is_file():
                continue
            name = seg.name[: -len(SEG_SUFFIX)]
            if name in found:
                raise DataError(
                    f"two {split} images are named {name!r}: {str(found[name][2])!r} and {str(seg)!r}; "
                    "output files are named by image, so names must be unique within a split"
                )
            found[name] = (name, seg.with_name(f"{name}.jpg"), seg)
        samples[split] = [found[n] for n in sorted(found)]
    if not samples["training"]:
        raise DataError(f"no training segmentations (*{SEG_SUFFIX}) under {str(base / 'training')!r}; is --root the full release?")
    return samples


def _fingerprint(root: Path, segs: list[Path]) -> str:
    """Changes when a training segmentation is added, removed or rewritten (path, size, mtime)."""
    h = hashlib.sha1()
    for seg in segs:
        st = seg.stat()
        h.update(f"{seg.relative_to(root).as_posix()}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------- counting
def _present_indices(seg_path: Path) -> np.ndarray:
    """Full indices (> 0) present in one segmentation."""
    index = read_seg(seg_path)
    present = np.flatnonzero(np.bincount(index.ravel(), minlength=NUM_FULL_INDICES))
    return present[present > 0]


def count_class_images(segs: list[Path], workers: int = 1, progress: bool = True) -> np.ndarray:
    """(NUM_FULL_INDICES,) int64: for each full index, the number of the given segmentations holding it."""
    from tqdm import tqdm

    counts = np.zeros(NUM_FULL_INDICES, dtype=np.int64)
    with _pool(workers) as pool:
        mapped = pool.imap(_present_indices, segs, chunksize=8) if pool else map(_present_indices, segs)
        for present in tqdm(mapped, total=len(segs), desc="ade20k-full: counting classes", unit="img",
                            disable=not progress, dynamic_ncols=True):
            counts[present] += 1
    return counts


def select_classes(counts: np.ndarray, num_classes: int) -> np.ndarray:
    """The full indices of the `num_classes` largest counts (ties: smaller index first), most
    frequent first; index 0 (unlabelled) and zero counts are never selected."""
    indices = np.flatnonzero(counts)
    indices = indices[indices > 0]
    order = np.lexsort((indices, -counts[indices]))  # primary key: count descending; then index ascending
    return indices[order][:num_classes]


def class_lut(kept: np.ndarray) -> np.ndarray:
    """(NUM_FULL_INDICES,) uint16: kept[i] -> i, every other full index (and 0) -> 65535."""
    lut = np.full(NUM_FULL_INDICES, IGNORE, dtype=np.uint16)
    lut[kept] = np.arange(len(kept), dtype=np.uint16)
    return lut


# ---------------------------------------------------------------------------------------- names
class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays and plain containers only: any other global is refused."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("builtins", "list"), ("builtins", "dict"), ("builtins", "tuple"), ("builtins", "set"),
        ("builtins", "frozenset"), ("builtins", "bytearray"), ("collections", "OrderedDict"),
        ("_codecs", "encode"),  # how protocol 2 stores bytes (array buffers)
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        if module.startswith("numpy.core"):
            module = "numpy._core" + module[len("numpy.core"):]
        return super().find_class(module, name)


def _names_from_objects_txt(path: Path) -> dict[int, str]:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        return {}
    first = [f.strip().lower() for f in lines[0].split("\t")]
    if any("name" in f or f in ("id", "index", "object", "objects") for f in first):
        lines = lines[1:]  # a header naming the columns
    return {k: line.split("\t")[0].strip() for k, line in enumerate(lines, start=1)}


def _names_from_index_pkl(path: Path) -> dict[int, str]:
    with open(path, "rb") as f:
        index = _RestrictedUnpickler(f).load()
    names = index.get("objectnames") if isinstance(index, dict) else None
    if names is None:
        raise ValueError("it has no 'objectnames' list")
    return {k: str(name).strip() for k, name in enumerate(names, start=1)}


# Three classes of the 2021 release (as MaskFormer's class list also has them): a names file that
# disagrees is read with an offset, and the names it gives would be wrong.
RELEASE_2021_NAMES = {2978: "wall", 312: "building", 2420: "sky"}


def load_class_names(root: Path) -> tuple[dict[int, str], str]:
    """full index -> name from the release's objects.txt, else index_ade20k.pkl (restricted
    unpickler), else nothing (names become class_<index>). Names are only labels: a names file
    that cannot be read (safely) gives a warning, not an error. Returns (names, their source)."""
    names: dict[int, str] = {}
    source = "none (objects.txt and index_ade20k.pkl not found: names are class_<full index>)"
    objects, pkl = root / "objects.txt", root / "index_ade20k.pkl"
    try:
        if objects.is_file():
            names, source = _names_from_objects_txt(objects), str(objects)
        elif pkl.is_file():
            names, source = _names_from_index_pkl(pkl), str(pkl)
    except (OSError, pickle.UnpicklingError, EOFError, AttributeError, ImportError, ValueError, TypeError,
            IndexError, KeyError) as exc:
        bad = objects if objects.is_file() else pkl
        print(f"warning: {str(bad)!r} cannot be read safely ({exc}); class names will be class_<full index>",
              file=sys.stderr)
        return {}, f"none ({bad.name} unreadable: names are class_<full index>)"
    if len(names) >= max(RELEASE_2021_NAMES) and not any(
        names.get(full, "").lower().startswith(expected) for full, expected in RELEASE_2021_NAMES.items()
    ):
        print(
            f"warning: in {source} full index 2978 is named {names.get(2978)!r}, not 'wall' as in the "
            "ADE20K_2021_17_01 release; if this is that release, the names in classes.txt are misaligned "
            "(the labels are not affected)",
            file=sys.stderr,
        )
    return names, source


def _clean_name(name: str, full: int) -> str:
    name = " ".join(name.replace("\t", " ").split())
    return name or f"class_{full}"


# ---------------------------------------------------------------------------------------- writing
def _place_image(source: Path, target: Path, copy: bool) -> None:
    def place(tmp: Path) -> None:
        if copy:
            shutil.copyfile(source, tmp)
            return
        try:
            os.symlink(source.resolve(), tmp)
        except OSError as exc:
            raise DataError(f"cannot create the symlink {str(target)!r} ({exc}); run again with --copy-images") from None

    atomic_write(target, place)


_LUT: np.ndarray | None = None


def _set_lut(lut: np.ndarray) -> None:
    global _LUT
    _LUT = lut


def resized_size(height: int, width: int, max_short_side: int) -> tuple[int, int] | None:
    """(new height, new width) when the shorter side exceeds `max_short_side` (MaskFormer's rule: the
    shorter side becomes max_short_side, the longer round(long / short * max)), else None."""
    if max_short_side <= 0:
        return None
    if width >= height > max_short_side:
        return max_short_side, round(width / float(height) * max_short_side)
    if height >= width > max_short_side:
        return round(height / float(width) * max_short_side), max_short_side
    return None


def resize_nearest_opencv(array: np.ndarray, height: int, width: int) -> np.ndarray:
    """OpenCV's INTER_NEAREST: output (i, j) takes input (floor(i * ifx_y), floor(j * ifx_x)), clipped,
    with ifx = 1 / (out / in) in double precision, as OpenCV computes it (no half-pixel centres)."""
    def source(n_in: int, n_out: int) -> np.ndarray:
        scale = 1.0 / (n_out / n_in)
        return np.minimum(np.floor(np.arange(n_out) * scale).astype(np.int64), n_in - 1)

    return array[source(array.shape[0], height)[:, None], source(array.shape[1], width)[None, :]]


def resize_bilinear(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 (H, W, 3) -> (height, width, 3): bilinear, half-pixel centres, no antialiasing (OpenCV's
    INTER_LINEAR up to its fixed-point rounding)."""
    import torch
    import torch.nn.functional as F

    t = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float()
    out = F.interpolate(t, size=(height, width), mode="bilinear", align_corners=False, antialias=False)
    return out[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()


def _convert(job: tuple[Path, Path, Path, Path, bool, bool, int]) -> bool:
    """Write one sample's label and image; False when both were already complete."""
    image, seg, label_out, image_out, copy, overwrite, max_short_side = job
    if not overwrite and label_out.is_file() and image_out.exists():
        return False
    index = read_seg(seg)
    width, height = image_size(image)
    if (height, width) != index.shape:
        raise DataError(
            f"segmentation {str(seg)!r} is {index.shape[1]}x{index.shape[0]} but its image {str(image)!r} is "
            f"{width}x{height} (width x height); they must be the same size"
        )
    size = resized_size(height, width, max_short_side)
    if size is not None:
        index = resize_nearest_opencv(index, *size)
    write_png_atomic(label_out, _LUT[index].astype(np.uint16))  # label first: an image in --out implies its label is complete
    if size is None:
        _place_image(image, image_out, copy)
    else:
        resized = Image.fromarray(resize_bilinear(read_image(image, exif=False), *size))
        atomic_write(image_out, lambda tmp: resized.save(tmp, format="JPEG", quality=95))
    return True


class _pool:
    """A multiprocessing pool for workers > 1, else None (run in this process)."""

    def __init__(self, workers: int, lut: np.ndarray | None = None) -> None:
        self.workers, self.lut, self.pool = workers, lut, None

    def __enter__(self):
        if self.lut is not None:
            _set_lut(self.lut)
        if self.workers > 1:
            import multiprocessing

            self.pool = multiprocessing.get_context().Pool(self.workers, initializer=_set_lut, initargs=(self.lut,))
        return self.pool

    def __exit__(self, *exc) -> None:
        if self.pool is not None:
            if exc[0] is not None:
                self.pool.terminate()
            else:
                self.pool.close()
            self.pool.join()


# ---------------------------------------------------------------------------------------- the command
def _load_counts(out: Path, fingerprint: str) -> np.ndarray | None:
    """The cached training counts of a previous run over the same training files, else None."""
    path = out / COUNTS_FILE
    if not path.is_file():
        return None
    lines = path.read_text(encoding="utf-8").splitlines()
    if not lines or lines[0] != f"# training files fingerprint: {fingerprint}":
        return None
    counts = np.zeros(NUM_FULL_INDICES, dtype=np.int64)
    try:
        for line in lines[1:]:
            if line.startswith("#") or not line.strip():
                continue
            full, images = line.split("\t")[:2]
            counts[int(full)] = int(images)
    except (ValueError, IndexError):
        return None  # damaged: count again
    return counts


def _counts_text(counts: np.ndarray, names: dict[int, str], fingerprint: str, num_images: int) -> str:
    ranked = select_classes(counts, NUM_FULL_INDICES)
    rows = [f"# training files fingerprint: {fingerprint}",
            f"# {num_images} training images; columns: full index, training images holding it, name; most frequent first"]
    rows += [f"{full}\t{counts[full]}\t{_clean_name(names.get(int(full), ''), int(full))}" for full in ranked]
    return "\n".join(rows) + "\n"


def _record(args) -> dict:
    """What the labels depend on besides the class selection (which classes.txt holds)."""
    return {"format": "scaleseg ade20k-full v2", "classes": args.classes, "max_short_side": args.max_short_side}


def _check_record(out: Path, record: dict, overwrite: bool) -> None:
    """An --out written with another class list or resizing holds labels this run would not write."""
    path = out / RECORD_FILE
    if overwrite or not (out / CLASSES_FILE).is_file():
        return
    try:
        previous = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        previous = None
    if previous != record:
        was = ("written by an older scaleseg (no prepare.json)" if not isinstance(previous, dict) else
               f"written with --classes {previous.get('classes')} --max-short-side {previous.get('max_short_side')}")
        raise DataError(
            f"{str(out)!r} was {was}; this run has --classes {record['classes']} --max-short-side "
            f"{record['max_short_side']}, so its labels would be wrong. Use another --out, or --overwrite to "
            "rewrite every file"
        )


def _classes_text(kept: np.ndarray, names: dict[int, str]) -> str:
    return "".join(f"{i}\t{full}\t{_clean_name(names.get(int(full), ''), int(full))}\n" for i, full in enumerate(kept))


def _existing_selection(path: Path) -> list[int] | None:
    if not path.is_file():
        return None
    from scaleseg.data.datasets.ade20k import read_classes_file

    try:
        return read_classes_file(path)[0]
    except DataError:
        return []  # unreadable: treated as a different selection


def run(args) -> int:
    from tqdm import tqdm

    root, out = Path(args.root).expanduser(), Path(args.out).expanduser()
    progress = not args.no_progress
    if args.classes == "maskformer":
        if args.num_classes not in (None, len(MASKFORMER_FULL_INDICES)):
            raise DataError(
                f"--num-classes {args.num_classes}: MaskFormer's ADE20K-full list has {len(MASKFORMER_FULL_INDICES)} "
                "classes; use --classes ranked to keep another number of the most frequent classes"
            )
        args.num_classes = len(MASKFORMER_FULL_INDICES)
    elif args.num_classes is None:
        args.num_classes = len(MASKFORMER_FULL_INDICES)
    if args.num_classes < 1 or args.num_classes > IGNORE:
        raise DataError(f"--num-classes {args.num_classes}: must be between 1 and {IGNORE} (65535 is the ignore value)")
    if args.workers < 1:
        raise DataError(f"--workers {args.workers}: must be 1 or more")
    if args.max_short_side < 0:
        raise DataError(f"--max-short-side {args.max_short_side}: must be 0 (no resizing) or more")
    samples = find_samples(root)
    names, names_source = load_class_names(root)
    out.mkdir(parents=True, exist_ok=True)
    record = _record(args)
    _check_record(out, record, args.overwrite)
    train_segs = [seg for _, _, seg in samples["training"]]

    if args.classes == "maskformer":
        kept = np.array(MASKFORMER_FULL_INDICES, dtype=np.int64)
        counts = None
    else:
        # rank the full classes by the number of training images holding them (cached in --out)
        fingerprint = _fingerprint(root, train_segs)
        counts = None if args.overwrite else _load_counts(out, fingerprint)
        if counts is None:
            counts = count_class_images(train_segs, workers=args.workers, progress=progress)
            write_text_atomic(out / COUNTS_FILE, _counts_text(counts, names, fingerprint, len(train_segs)))
        else:
            print(f"ade20k-full: reusing the training class counts in {str(out / COUNTS_FILE)!r}")
        kept = select_classes(counts, args.num_classes)
        if len(kept) == 0:
            raise DataError(f"no labelled pixel in any training segmentation under {str(root)!r}; nothing to keep")

    # the class list; a different selection would make existing labels wrong
    classes_path = out / CLASSES_FILE
    previous = _existing_selection(classes_path)
    if previous is not None and previous != kept.tolist() and not args.overwrite:
        raise DataError(
            f"{str(classes_path)!r} holds another class selection ({len(previous)} classes) than this run "
            f"({len(kept)} classes): its labels would be wrong. Use another --out, or --overwrite to rewrite every file"
        )
    write_text_atomic(classes_path, _classes_text(kept, names))
    write_text_atomic(out / RECORD_FILE, json.dumps(record, indent=1) + "\n")

    # labels and images
    lut = class_lut(kept)
    done: dict[str, tuple[int, int]] = {}
    with _pool(args.workers, lut) as pool:
        for split in SPLITS:
            for folder in (out / "annotations" / split, out / "images" / split):
                folder.mkdir(parents=True, exist_ok=True)
                for stale in folder.glob(".*.tmp*"):  # left by an interrupted run
                    stale.unlink()
            jobs = [
                (image, seg, out / "annotations" / split / f"{name}.png", out / "images" / split / f"{name}.jpg",
                 args.copy_images, args.overwrite, args.max_short_side)
                for name, image, seg in samples[split]
            ]
            mapped = pool.imap(_convert, jobs, chunksize=4) if pool else map(_convert, jobs)
            written = sum(tqdm(mapped, total=len(jobs), desc=f"ade20k-full: {split}", unit="img",
                               disable=not progress, dynamic_ncols=True))
            done[split] = (len(jobs), written)

    if counts is None:
        print(f"ade20k-full: the {len(kept)} classes of MaskFormer's ADE20K-full benchmark (fixed list), images with "
              f"a shorter side above {args.max_short_side} resized to it; names from {names_source}"
              if args.max_short_side else
              f"ade20k-full: the {len(kept)} classes of MaskFormer's ADE20K-full benchmark (fixed list), sizes kept; "
              f"names from {names_source}")
    else:
        present = int(np.count_nonzero(counts[1:]))
        print(
            f"ade20k-full: kept {len(kept)} of the {present} classes seen in {len(train_segs)} training images "
            f"(asked for {args.num_classes}; the least frequent kept class is in {int(counts[kept[-1]])} images); "
            f"names from {names_source}"
        )
    for split, (total, written) in done.items():
        print(f"  {split}: {total} images ({written} written, {total - written} already complete)")
    print(f"  -> {out}  (train with data.dataset=ade20k_full data.root={out} data.num_classes={len(kept)})")
    if counts is not None and len(kept) < args.num_classes:
        print(f"warning: only {len(kept)} classes appear in the training images, fewer than --num-classes "
              f"{args.num_classes}", file=sys.stderr)
    return 0
