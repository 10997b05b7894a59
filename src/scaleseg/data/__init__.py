"""Datasets, transforms and loaders.

A dataset yields dicts {"image": uint8 (H, W, 3), "label": int (H, W), "name": str} and carries
`num_classes`, `class_names`, `ignore_index` and `palette` ((C, 3) uint8). The loaders turn them
into batches {"image": float (B, 3, h, w), "label": int64 (B, h, w), "name": list[str],
"skipped": list[str]}; "skipped" carries the problems of bad samples passed over with
data.on_bad_sample=skip (read them with `skipped_samples(batch)`), so that the engine counts and logs
them whichever process read the files.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from scaleseg.config import DataConfig
from scaleseg.data.samplers import ResumableSampler
from scaleseg.data.transforms import EvalTransform, TrainTransform


# data.dataset -> "module:class" of a FileSegmentation subclass under scaleseg.data.datasets
FILE_DATASETS = {
    "cityscapes": "cityscapes:Cityscapes",
    "voc": "voc:PascalVOC",
    "voc_aug": "voc:PascalVOCAug",
    "ade20k": "ade20k:ADE20K",
    "ade20k_full": "ade20k:ADE20KFull",
    "cocostuff10k": "cocostuff:COCOStuff10k",
    "cocostuff164k": "cocostuff:COCOStuff164k",
    "coco_lvis": "coco_lvis:COCOLVIS",
    "pascal_context": "pascal_context:PascalContext",
    "folder": "folder:FolderSegmentation",
}


def dataset_class(name: str):
    """The FileSegmentation subclass of `data.dataset` = name."""
    import importlib

    module, cls = FILE_DATASETS[name].split(":")
    return getattr(importlib.import_module(f"scaleseg.data.datasets.{module}"), cls)


def build_dataset(cfg: DataConfig, split: str) -> Dataset:
    """The raw dataset of `split` ("train" or "val") named by `cfg.dataset`."""
    if cfg.dataset == "synthetic":
        from scaleseg.data.datasets.synthetic import SyntheticSegmentation

        s = cfg.synthetic
        return SyntheticSegmentation(
            num_classes=cfg.num_classes,
            split=split,
            length=s.train_length if split == "train" else s.val_length,
            image_size=s.image_size,
            seed=s.seed,
            num_families=s.num_families,
            stuff_fraction=s.stuff_fraction,
            zipf_exponent=s.zipf_exponent,
            max_things=s.max_things,
            boundary_ignore=s.boundary_ignore,
        )
    if cfg.dataset not in FILE_DATASETS:
        raise AssertionError(f"unhandled dataset {cfg.dataset!r}")  # config validation lists the choices
    explicit = cfg.train_split if split == "train" else cfg.val_split
    return dataset_class(cfg.dataset).from_config(cfg, explicit or split)


class TransformedDataset(Dataset):
    """Applies a transform; with a training transform, items are (index, position) pairs and the
    position seeds the augmentation RNG (see ResumableSampler). Also remaps the dataset's ignore
    value to the run's ignore index when they differ.

    Bad samples of a file dataset with on_bad_sample="skip": with `substitute` (training) a bad sample
    is replaced by the next good one; without (evaluation) the item is a 1x1 placeholder, all ignore,
    that the evaluator leaves out. Either way its problems are in the item's "skipped" field."""

    def __init__(self, dataset: Dataset, transform, seed: int = 0, ignore_index: int | None = None,
                 substitute: bool = True) -> None:
        self.dataset = dataset
        self.transform = transform
        self.seed = seed
        self.substitute = substitute
        self.source_ignore = dataset.ignore_index
        self.ignore_index = dataset.ignore_index if ignore_index is None else ignore_index

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item):
        index, position = item if isinstance(item, tuple) else (item, item)
        load_or_skip = getattr(self.dataset, "load_or_skip", None)
        sample, skipped = load_or_skip(index, self.substitute) if load_or_skip else (self.dataset[index], [])
        if sample is None:  # evaluation: a placeholder, not scored
            sample = {"image": np.zeros((1, 1, 3), np.uint8), "label": np.full((1, 1), self.source_ignore, np.int64),
                      "name": self.dataset.samples[index].name}
        if self.source_ignore != self.ignore_index:
            label = sample["label"].astype(np.int64)
            label[label == self.source_ignore] = self.ignore_index
            sample = {**sample, "label": label}
        rng = np.random.default_rng([self.seed, position])
        return {**self.transform(sample, rng), "skipped": "\n".join(skipped)}


def skipped_samples(batch) -> list[str]:
    """The problems (each naming its file) of the bad samples passed over for `batch` with
    data.on_bad_sample=skip: for a training batch, samples replaced by the next good one; for an
    evaluation batch (one image), that image, which must not be scored."""
    field = batch.get("skipped") if isinstance(batch, dict) else None
    return [m for text in (field or []) for m in str(text).split("\n") if m]


def log_skipped(batch, log, what: str) -> int:
    """Log each bad sample passed over for `batch` as a warning on `log`; -> how many."""
    problems = skipped_samples(batch)
    for problem in problems:
        log.warning(f"skipped a bad {what} sample (data.on_bad_sample=skip): {problem}")
    return len(problems)


def build_train_loader(
    cfg: DataConfig,
    dataset: Dataset,
    ignore_index: int,
    seed: int,
    start: int = 0,
    work_dir: str | Path | None = None,
    progress: bool = True,
    rank: int = 0,
    world_size: int = 1,
) -> DataLoader:
    """Endless shuffled loader starting at sample position `start` (samples already consumed).

    With `cfg.repeat_factor_threshold` set, images are drawn by LVIS repeat-factor sampling; the
    per-image class sets it needs are scanned once (a progress bar unless `progress` is false) and
    cached under `work_dir` (no cache without one). With several processes (`world_size` > 1) each
    loads its `rank`'s share of every global batch of batch_size x world_size (see RankShard);
    `start` counts the samples of all processes."""
    from scaleseg.data.samplers import (
        RankShard, RepeatFactorSampler, class_sets_cache_path, image_class_sets, repeat_factors,
    )

    p = cfg.train_pipeline
    transform = TrainTransform(
        p.crop_size, p.scale_range, p.cat_max_ratio, p.flip, ignore_index, photometric=p.photometric
    )
    if cfg.repeat_factor_threshold is None:
        sampler = ResumableSampler(len(dataset), seed=seed, start=start)
    else:
        cache = class_sets_cache_path(work_dir, dataset) if work_dir is not None else None
        class_sets = image_class_sets(dataset, progress=progress, cache_path=cache, num_workers=cfg.num_workers)
        factors = repeat_factors(class_sets, cfg.repeat_factor_threshold)
        sampler = RepeatFactorSampler(factors, seed=seed, start=start)
    if world_size > 1:
        sampler = RankShard(sampler, cfg.batch_size, rank, world_size)
    return DataLoader(
        TransformedDataset(dataset, transform, seed=seed, ignore_index=ignore_index),
        batch_size=cfg.batch_size,
        sampler=sampler,
        num_workers=cfg.num_workers,
        drop_last=True,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=cfg.num_workers > 0,
        prefetch_factor=4 if cfg.num_workers > 0 else None,
        # a private generator: creating the loader must not consume the global torch RNG, or a
        # resumed run would diverge from an uninterrupted one
        generator=torch.Generator(),
    )


def build_eval_loader(
    cfg: DataConfig, dataset: Dataset, ignore_index: int, rank: int = 0, world_size: int = 1
) -> DataLoader:
    """One image per batch at its original size (images of a dataset may differ in size). With several
    processes, process `rank` takes images rank, rank + world_size, ... (their metrics are summed).
    With data.on_bad_sample=skip a bad image comes as a batch whose `skipped_samples` is not empty: the
    evaluator counts it and scores nothing of it."""
    from torch.utils.data import Subset

    data = TransformedDataset(dataset, EvalTransform(), ignore_index=ignore_index, substitute=False)
    if world_size > 1:
        data = Subset(data, range(rank, len(data), world_size))
    return DataLoader(
        data,
        batch_size=1,
        shuffle=False,
        num_workers=min(cfg.num_workers, 2),
        generator=torch.Generator(),
    )
