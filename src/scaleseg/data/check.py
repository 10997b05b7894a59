"""`scaleseg check-data`: read every sample of a dataset's splits through the dataset's own checks
and report every problem (not just the first), with label statistics.

A file dataset (`FileSegmentation`) is built leniently (`on_bad_sample="skip"`) so that unpaired
or missing files do not stop the check; every listed sample goes through `FileSegmentation.load`
(both files present, image decoding, label decoding and bit depth, size match, value range), so each
missing file is one problem naming it. Any other dataset (the built-in synthetic one) is iterated, and its samples
get the same size and value-range checks.

    reports = check_config(cfg.data, ["train", "val"])
    print(format_report(reports))
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from scaleseg.errors import DataError


@dataclass
class Problem:
    """One problem: the sample (None for the split as a whole), the files at fault and the message."""

    split: str
    sample: str | None
    files: tuple[str, ...]
    message: str


@dataclass
class SplitReport:
    """The outcome of checking one split."""

    dataset: str
    split: str
    num_samples: int  # samples the split lists (those with a missing file included)
    num_classes: int
    class_names: list[str]
    ignore_index: int
    problems: list[Problem] = field(default_factory=list)
    class_pixels: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # (C,) labelled pixels
    class_images: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # (C,) images with the class
    ignore_pixels: int = 0
    exif_rotated: list[str] = field(default_factory=list)  # images whose EXIF orientation tag is not applied
    total_pixels: int = 0  # all label pixels of the samples that loaded

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def num_loaded(self) -> int:
        """Samples read without a problem."""
        return self.num_samples - len({p.sample for p in self.problems if p.sample is not None})

    def to_dict(self) -> dict:
        return {
            "dataset": self.dataset,
            "split": self.split,
            "num_samples": self.num_samples,
            "num_loaded": self.num_loaded,
            "num_classes": self.num_classes,
            "ignore_index": self.ignore_index,
            "ignore_pixels": self.ignore_pixels,
            "total_pixels": self.total_pixels,
            "problems": [dataclasses.asdict(p) for p in self.problems],
            "exif_rotated": list(self.exif_rotated),
            "classes": [
                {
                    "id": c,
                    "name": self.class_names[c],
                    "pixels": int(self.class_pixels[c]),
                    "images": int(self.class_images[c]),
                }
                for c in range(self.num_classes)
            ],
        }


def check_dataset(
    dataset: Dataset, progress: bool = True, num_workers: int = 0, split: str | None = None
) -> SplitReport:
    """Read every sample of `dataset`; collect every problem and the label histogram."""
    from tqdm import tqdm

    split = split or str(getattr(dataset, "split", ""))
    name = getattr(dataset, "NAME", "") or type(dataset).__name__
    num_classes = int(dataset.num_classes)
    report = SplitReport(
        dataset=name,
        split=split,
        num_samples=len(dataset),
        num_classes=num_classes,
        class_names=[str(n) for n in dataset.class_names],
        ignore_index=int(dataset.ignore_index),
        class_pixels=np.zeros(num_classes, dtype=np.int64),
        class_images=np.zeros(num_classes, dtype=np.int64),
    )
    # samples a dataset could not even pair (the folder dataset: two files of one name)
    report.problems += [Problem(split, sample, files, message)
                        for sample, files, message in getattr(dataset, "listing_problems", ())]
    report.num_samples += len({p.sample for p in report.problems})
    loader = DataLoader(
        _Checked(dataset), batch_size=None, num_workers=num_workers, collate_fn=_identity, generator=torch.Generator()
    )
    bar = tqdm(loader, total=len(dataset), desc=f"check {split}", unit="img", disable=not progress, dynamic_ncols=True)
    for result in bar:
        if "error" in result:
            report.problems.append(Problem(split, result["name"], result["files"], result["error"]))
            bar.set_postfix(problems=len(report.problems), refresh=False)
            continue
        classes = result["classes"]
        report.class_pixels[classes] += result["counts"]  # classes are unique within a sample
        report.class_images[classes] += 1
        report.ignore_pixels += result["ignore"]
        report.total_pixels += result["total"]
        if result.get("exif"):
            report.exif_rotated.append(result["exif"])
    return report


def build_split(cfg, split: str) -> Dataset:
    """The dataset of `split` for checking: "train"/"val" as a run builds them (data.train_split and
    data.val_split apply), any other name as the dataset's own split; file datasets in skip mode."""
    from scaleseg.data import build_dataset, dataset_class

    lenient = dataclasses.replace(cfg, on_bad_sample="skip")
    if split in ("train", "val"):
        return build_dataset(lenient, split)
    if cfg.dataset == "synthetic":
        raise DataError(f"the synthetic dataset has the splits train and val, not {split!r}")
    return dataset_class(cfg.dataset).from_config(lenient, split)


def check_config(
    cfg, splits: Sequence[str], progress: bool = True, num_workers: int | None = None
) -> list[SplitReport]:
    """Check `splits` of the dataset a DataConfig names; a split that cannot even be listed (no
    split file, no root) gives a report with that one problem."""
    workers = cfg.num_workers if num_workers is None else num_workers
    reports = []
    for split in splits:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # missing files are reported below, one by one
                dataset = build_split(cfg, split)
        except DataError as exc:
            reports.append(SplitReport(cfg.dataset, split, 0, 0, [], 0, problems=[Problem(split, None, (), str(exc))]))
            continue
        report = check_dataset(dataset, progress=progress, num_workers=workers, split=split)
        report.dataset = cfg.dataset
        reports.append(report)
    return reports


def format_report(reports: Sequence[SplitReport], show: int = 8) -> str:
    """The human summary: per split the sample count, the label statistics and every problem."""
    lines = []
    for r in reports:
        lines.append(
            f"{r.dataset} {r.split}: {r.num_samples} samples, {r.num_loaded} read cleanly, {len(r.problems)} problems"
        )
        if r.total_pixels:
            present = np.flatnonzero(r.class_pixels)
            absent = np.flatnonzero(r.class_pixels == 0)
            text = f"  classes present: {len(present)} of {r.num_classes}"
            if len(absent):
                names = ", ".join(r.class_names[c] for c in absent[:show])
                text += f" (absent: {names}{' ...' if len(absent) > show else ''})"
            lines.append(text)
            lines.append(
                f"  ignore ({r.ignore_index}): {100 * r.ignore_pixels / r.total_pixels:.2f}% "
                f"of {r.total_pixels:,} pixels"
            )
            labelled = int(r.class_pixels.sum())
            if labelled:
                order = present[np.argsort(-r.class_pixels[present], kind="stable")]
                top = ", ".join(f"{r.class_names[c]} {100 * r.class_pixels[c] / labelled:.1f}%" for c in order[:show])
                lines.append(f"  most pixels: {top}")
                if len(order) > show:
                    rare = [
                        f"{r.class_names[c]} {100 * r.class_pixels[c] / labelled:.3g}% ({r.class_images[c]} img)"
                        for c in order[::-1][:show]
                    ]
                    lines.append("  fewest pixels: " + ", ".join(rare))
        if r.exif_rotated:
            lines.append(
                f"  note: {len(r.exif_rotated)} images carry an EXIF orientation tag (e.g. {r.exif_rotated[0]}); images "
                "and labels are read as stored, so a label drawn on the rotated (displayed) picture would not match"
            )
        for p in r.problems:
            where = f"{p.sample}: " if p.sample is not None else ""
            lines.append(f"  PROBLEM {where}{p.message}")
    total = sum(len(r.problems) for r in reports)
    lines.append("no problems found" if total == 0 else f"{total} problems found")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------


class _Checked(Dataset):
    """Item i: the label statistics of sample i, or its problem (so worker processes can check)."""

    def __init__(self, dataset: Dataset) -> None:
        from scaleseg.data.datasets.base import FileSegmentation

        self.dataset = dataset
        self.is_file_dataset = isinstance(dataset, FileSegmentation)
        self.num_classes = int(dataset.num_classes)
        self.ignore_index = int(dataset.ignore_index)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        name, files = str(index), ()
        if self.is_file_dataset:
            sample = self.dataset.samples[index]
            name, files = sample.name, (str(sample.image), str(sample.label))
        try:
            if self.is_file_dataset:
                item = self.dataset.load(index)
            else:
                item = self.dataset[index]
                name = str(item.get("name", name))
                self._check_plain(item)
            label = np.asarray(item["label"])
        except Exception as exc:  # noqa: BLE001 - every problem is reported, whatever raised it
            message = str(exc) if isinstance(exc, DataError) else f"{type(exc).__name__} while reading: {exc}"
            named = tuple(f for f in files if f in message) or files
            return {"name": name, "files": named, "error": message}
        valid = (label >= 0) & (label < self.num_classes)
        classes, counts = np.unique(label[valid], return_counts=True)
        return {
            "name": name,
            "classes": classes.astype(np.int64),
            "counts": counts.astype(np.int64),
            "ignore": int(np.count_nonzero(label == self.ignore_index)),
            "total": int(label.size),
            "exif": _exif_rotated(files[0]) if self.is_file_dataset else None,
        }

    def _check_plain(self, item: dict) -> None:
        image, label = np.asarray(item["image"]), np.asarray(item["label"])
        if image.ndim != 3 or image.shape[2] != 3 or image.shape[:2] != label.shape:
            raise DataError(
                f"sample {item.get('name')!r}: image shape {image.shape} does not match label shape {label.shape}"
            )
        bad = ((label < 0) | (label >= self.num_classes)) & (label != self.ignore_index)
        if bad.any():
            raise DataError(
                f"sample {item.get('name')!r}: {int(bad.sum())} label pixels are neither a class "
                f"(0..{self.num_classes - 1}) nor ignore ({self.ignore_index}): {np.unique(label[bad])[:10].tolist()}"
            )


def _identity(item):
    return item


def _exif_rotated(path: str) -> str | None:
    """`path` and its tag if the image has an EXIF orientation other than 1 (as stored), else None."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            orientation = im.getexif().get(0x0112)
    except (OSError, ValueError, SyntaxError):
        return None
    return f"{path} (orientation {orientation})" if orientation not in (None, 1) else None
