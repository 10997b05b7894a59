"""Samplers whose position in the stream is part of the training state, so resumes are exact.

* `ResumableSampler`: every image once per epoch, in a fresh random order each epoch.
* `RankShard`: one process's share of either stream when several processes train (torchrun).
* `RepeatFactorSampler`: LVIS repeat-factor sampling for long-tailed datasets: images holding rare
  classes appear several times per epoch. `repeat_factors` computes the factors from per-image
  class sets, which `image_class_sets` gets from the dataset (scanning its labels once, cached).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset, Sampler

from scaleseg.data.io import atomic_write


class ResumableSampler(Sampler):
    """Endless stream of (dataset index, position) pairs, starting at position `start`.

    Position p belongs to epoch p // n and takes slot p % n of that epoch's permutation, which is
    drawn from (seed, epoch) alone; so the stream from any position is the same whether the run
    started there or got there. The position also seeds the sample's augmentation.
    """

    def __init__(self, length: int, seed: int = 0, shuffle: bool = True, start: int = 0) -> None:
        if length <= 0:
            raise ValueError("ResumableSampler needs a non-empty dataset")
        self.length = length
        self.seed = seed
        self.shuffle = shuffle
        self.start = start

    def _order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.length)
        return np.random.default_rng([self.seed, epoch]).permutation(self.length)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        position = self.start
        epoch = position // self.length
        order = self._order(epoch)
        while True:
            if position // self.length != epoch:
                epoch = position // self.length
                order = self._order(epoch)
            yield int(order[position % self.length]), position
            position += 1

    def __len__(self) -> int:  # endless; DataLoader only uses this for warnings
        return 2**62


class RankShard(Sampler):
    """This process's share of an endless (index, position) stream when several processes train.

    The stream is cut into global batches of `batch_size x world_size` consecutive items; process
    `rank` takes items rank*batch_size .. (rank+1)*batch_size - 1 of each. So the processes together
    see exactly the batches one process with batch `batch_size x world_size` would see, in the same
    order with the same augmentations (positions seed them), and a resume at a stream position
    continues the same stream whatever the number of processes.
    """

    def __init__(self, stream: Sampler, batch_size: int, rank: int, world_size: int) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside 0..{world_size - 1}")
        self.stream, self.batch_size, self.rank, self.world_size = stream, batch_size, rank, world_size

    def __iter__(self) -> Iterator[tuple[int, int]]:
        lo, hi = self.rank * self.batch_size, (self.rank + 1) * self.batch_size
        span = self.batch_size * self.world_size
        for i, item in enumerate(self.stream):
            if lo <= i % span < hi:
                yield item

    def __len__(self) -> int:  # endless
        return 2**62


# ------------------------------------------------------------------------------------------------
# repeat-factor sampling (Gupta et al., LVIS, CVPR 2019, section 4.1)
# ------------------------------------------------------------------------------------------------


def repeat_factors(class_sets: Sequence[np.ndarray], threshold: float) -> np.ndarray:
    """Per-image repeat factors (float64, >= 1) by the LVIS rule.

    f_c = fraction of the images whose class set contains c; r_c = max(1, sqrt(t / f_c));
    r_i = max of r_c over the classes of image i, or 1 for an image with no class (all ignore).
    """
    if not 0 < threshold <= 1:
        raise ValueError(f"repeat-factor threshold must be in (0, 1], got {threshold}")
    n = len(class_sets)
    if n == 0:
        raise ValueError("repeat factors need at least one image")
    sizes = np.fromiter((len(s) for s in class_sets), dtype=np.int64, count=n)
    if sizes.sum() == 0:
        return np.ones(n)
    classes = np.concatenate([np.asarray(s, dtype=np.int64).ravel() for s in class_sets])
    if classes.min() < 0:
        raise ValueError(f"class sets hold a negative class id ({classes.min()}); they must hold class ids only")
    span = int(classes.max()) + 1
    pairs = np.unique(np.repeat(np.arange(n), sizes) * span + classes)  # a class counts once per image
    image, classes = pairs // span, pairs % span
    freq = np.bincount(classes) / n  # f_c
    class_factor = np.maximum(1.0, np.sqrt(threshold / np.where(freq > 0, freq, 1.0)))  # r_c
    factors = np.ones(n)
    np.maximum.at(factors, image, class_factor[classes])  # r_i = max_c r_c
    return factors


class RepeatFactorSampler(Sampler):
    """Endless stream of (dataset index, position) pairs where image i appears about r_i times per epoch.

    Epoch e holds floor(r_i) + Bernoulli(r_i - floor(r_i)) copies of each image i (stochastic
    rounding, drawn from (seed, e)), shuffled by a permutation also drawn from (seed, e), as in
    detectron2's RepeatFactorTrainingSampler. Epochs differ in length, so the epoch of position p is
    found by adding up the epoch lengths from epoch 0 (cheap: n uniform draws per epoch). The item
    at position p depends on (repeat factors, seed, p) alone, so a run resumed at position p sees
    exactly the stream an uninterrupted run sees from p; the position seeds the augmentation, so
    the copies of an image in one epoch are augmented differently.
    """

    def __init__(self, repeat_factors: Sequence[float] | np.ndarray, seed: int = 0, start: int = 0) -> None:
        factors = np.asarray(repeat_factors, dtype=np.float64)
        if factors.ndim != 1 or factors.size == 0:
            raise ValueError("RepeatFactorSampler needs a non-empty 1-D array of repeat factors")
        if not np.all(np.isfinite(factors)) or factors.min() < 1:
            raise ValueError("repeat factors must be finite and >= 1")
        if start < 0:
            raise ValueError(f"start position must be >= 0, got {start}")
        self.repeat_factors = factors
        self.seed = seed
        self.start = start
        self._whole = np.floor(factors).astype(np.int64)
        self._fraction = factors - self._whole
        self.expected_epoch_length = float(factors.sum())  # sum of r_i: the mean length of an epoch

    def epoch_counts(self, epoch: int) -> np.ndarray:
        """(n,) int64: copies of each image in `epoch` (stochastic rounding of the factors)."""
        rng = np.random.default_rng([self.seed, epoch, 0])
        return self._whole + (rng.random(len(self._fraction)) < self._fraction)

    def epoch_length(self, epoch: int) -> int:
        return int(self.epoch_counts(epoch).sum())

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The dataset indices of `epoch` in the order they are sampled."""
        indices = np.repeat(np.arange(len(self._whole)), self.epoch_counts(epoch))
        return np.random.default_rng([self.seed, epoch, 1]).permutation(indices)

    def locate(self, position: int) -> tuple[int, int]:
        """(epoch, offset within the epoch) of stream position `position`."""
        epoch = 0
        if not self._fraction.any():  # every factor an integer: all epochs have the same length
            length = int(self._whole.sum())
            return position // length, position % length
        while True:
            length = self.epoch_length(epoch)
            if position < length:
                return epoch, position
            position -= length
            epoch += 1

    def __iter__(self) -> Iterator[tuple[int, int]]:
        position = self.start
        epoch, offset = self.locate(position)
        while True:
            order = self.epoch_order(epoch)
            for index in order[offset:].tolist():
                yield index, position
                position += 1
            epoch, offset = epoch + 1, 0

    def __len__(self) -> int:  # endless; DataLoader only uses this for warnings
        return 2**62


# ------------------------------------------------------------------------------------------------
# per-image class sets
# ------------------------------------------------------------------------------------------------

CACHE_VERSION = 1


def class_sets_cache_path(work_dir: str | Path, dataset: Dataset) -> Path:
    """Where a run caches the class sets of `dataset`: <work_dir>/cache/class_sets_<name>_<split>_<len>.npz."""
    name = _dataset_name(dataset)
    split = str(getattr(dataset, "split", "data"))
    safe = "".join(ch if ch.isalnum() or ch in "-_" else "-" for ch in f"{name}_{split}")
    return Path(work_dir) / "cache" / f"class_sets_{safe}_{len(dataset)}.npz"


def image_class_sets(
    dataset: Dataset,
    progress: bool = True,
    cache_path: str | Path | None = None,
    num_workers: int = 0,
) -> list[np.ndarray]:
    """For each image of `dataset`, the sorted class ids (int64) present in its label (ignore excluded).

    A dataset with a method `image_classes()` answers directly: it returns one sequence of class
    ids per image, in the dataset's sample order, as training ids (after `decode_label`, ignore
    left out), e.g. from a file its converter wrote. Otherwise every label is read through the dataset once (a file dataset reads
    and decodes the label only, not the image), with a progress bar, in `num_workers` processes.
    With `cache_path` the result is stored there (NPZ, written atomically) with a key of the
    dataset's name, split, length, class count and root; a later call with the same key loads it.
    A label that cannot be read is an error, or, for a dataset with `on_bad_sample="skip"`, an
    empty class set (repeat factor 1) and a warning with the count.
    """
    own = getattr(dataset, "image_classes", None)
    if callable(own):
        sets = [np.unique(np.asarray(s, dtype=np.int64)) for s in own()]
        if len(sets) != len(dataset):
            raise ValueError(
                f"{_dataset_name(dataset)}.image_classes() gave {len(sets)} class sets for {len(dataset)} images"
            )
        return sets
    key = _cache_key(dataset)
    if cache_path is not None:
        cached = _load_class_sets(Path(cache_path), key)
        if cached is not None:
            return cached
    sets, failures = _scan_class_sets(dataset, progress, num_workers)
    if failures:
        shown = "; ".join(failures[:3]) + (" ..." if len(failures) > 3 else "")
        warnings.warn(f"{len(failures)} labels could not be read and count as having no class: {shown}", stacklevel=2)
    if cache_path is not None:
        _save_class_sets(Path(cache_path), key, sets)
    return sets


class _LabelClasses(Dataset):
    """Item i: (the class ids present in label i, None) or (empty, the DataError's message in skip mode)."""

    def __init__(self, dataset: Dataset) -> None:
        from scaleseg.data.datasets.base import FileSegmentation

        self.dataset = dataset
        self.is_file_dataset = isinstance(dataset, FileSegmentation)
        self.num_classes = int(dataset.num_classes)
        self.skip = getattr(dataset, "on_bad_sample", "error") == "skip"

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[np.ndarray, str | None]:
        from scaleseg.errors import DataError

        try:
            if self.is_file_dataset:
                sample = self.dataset.samples[index]
                label = self.dataset.decode_label(self.dataset.read_label(sample), sample)
            else:
                label = self.dataset[index]["label"]
        except DataError as exc:
            if not self.skip:
                raise
            return np.zeros(0, dtype=np.int64), str(exc)
        values = np.unique(np.asarray(label))
        values = values[(values >= 0) & (values < self.num_classes)]
        return values.astype(np.int64), None


def _first(batch):
    return batch


def _scan_class_sets(dataset: Dataset, progress: bool, num_workers: int) -> tuple[list[np.ndarray], list[str]]:
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    import torch

    # a private generator: the scan runs while a (resumed) training run is being set up, and must not
    # draw from the global torch RNG, or the run would diverge from an uninterrupted one
    loader = DataLoader(
        _LabelClasses(dataset), batch_size=None, num_workers=num_workers, collate_fn=_first, generator=torch.Generator()
    )
    sets, failures = [], []
    for classes, failure in tqdm(loader, total=len(dataset), desc="class sets", unit="img", disable=not progress):
        sets.append(classes)
        if failure is not None:
            failures.append(failure)
    return sets, failures


def _dataset_name(dataset: Dataset) -> str:
    return getattr(dataset, "NAME", "") or type(dataset).__name__


def _cache_key(dataset: Dataset) -> str:
    key = {
        "version": CACHE_VERSION,
        "name": _dataset_name(dataset),
        "split": str(getattr(dataset, "split", "")),
        "length": len(dataset),
        "num_classes": int(dataset.num_classes),
    }
    for attr in ("root", "seed", "image_size", "zipf_exponent", "stuff_fraction", "max_things", "boundary_ignore"):
        if hasattr(dataset, attr):
            key[attr] = str(getattr(dataset, attr))
    return json.dumps(key, sort_keys=True)


def _load_class_sets(path: Path, key: str) -> list[np.ndarray] | None:
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            if str(data["key"]) != key:
                return None  # another dataset (or version) wrote it: rebuilt and replaced
            classes, offsets = data["classes"].astype(np.int64), data["offsets"]
    except (OSError, KeyError, ValueError) as exc:
        warnings.warn(f"class-set cache {str(path)!r} is unreadable ({exc}); rebuilding it", stacklevel=3)
        return None
    return np.split(classes, offsets[1:-1])


def _save_class_sets(path: Path, key: str, sets: list[np.ndarray]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    offsets = np.concatenate([[0], np.cumsum([len(s) for s in sets], dtype=np.int64)])
    classes = np.concatenate(sets) if sets else np.zeros(0, dtype=np.int64)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez would append .npz to a path
            np.savez(f, key=np.array(key), classes=classes.astype(np.int64), offsets=offsets)

    atomic_write(path, write)
