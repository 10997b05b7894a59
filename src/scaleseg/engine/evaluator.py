"""Evaluation over a dataset: predictions -> streaming metrics -> console table, JSON, per-class CSV."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from scaleseg.config import EvalConfig
from scaleseg.data import skipped_samples
from scaleseg.engine import distributed
from scaleseg.engine.inference import predict_labels_with_counts
from scaleseg.errors import ConfigError
from scaleseg.metrics import SegmentationMetrics

SUMMARY_KEYS = ("mIoU", "aAcc", "mAcc", "fwIoU", "mDice", "mFscore", "mPrecision", "mRecall")
PER_CLASS_KEYS = ("IoU", "Acc", "Dice", "Precision", "Recall", "Fscore")


@torch.no_grad()
def evaluate(
    model,
    loader,
    num_classes: int,
    ignore_index: int,
    cfg: EvalConfig,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    progress: bool = True,
) -> dict:
    """Run the model over `loader` (batches of one image at original size) and return metrics.

    Under torchrun each process evaluates its share of the images (see build_eval_loader) and the
    per-class counts are summed across processes, so every process returns the whole split's metrics."""
    readout = _pyramid_readout(model.head, cfg.pyramid_readout)  # before anything changes: it may refuse
    was_training = model.training
    model.eval()
    metrics = SegmentationMetrics(num_classes, ignore_index)
    counts = model.head.empty_counts()  # the head's own tallies (SegmentationHead.dense_with_counts), zero
    skipped: list[str] = []  # bad images (data.on_bad_sample=skip): counted, never scored
    try:
        for batch in tqdm(loader, desc="eval", unit="img", disable=not progress, leave=False, dynamic_ncols=True):
            if skipped_samples(batch):
                skipped += skipped_samples(batch)
                continue
            images = batch["image"].to(device, non_blocking=True)
            target = batch["label"].to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                labels = target if cfg.pyramid_diagnostics else None  # the head's label-based tallies (Table 9)
                pred, image_counts = predict_labels_with_counts(model, images, cfg, labels)
            metrics.update(pred, target)
            for name, value in image_counts.items():
                counts[name] += value.to(counts[name].device)
    finally:
        model.train(was_training)
        readout.close()
    if distributed.is_enabled():  # each process saw its share of the images: add up the counts
        summed = distributed.all_reduce_sum(metrics.counts().to(device))
        num_skipped = int(distributed.all_reduce_sum(torch.tensor([len(skipped)], device=device)))
        metrics.reset()
        metrics.merge_(summed)
        counts = {name: distributed.all_reduce_sum(counts[name].to(device)) for name in sorted(counts)}
    results = metrics.compute()
    results["head"] = model.head.summarize_counts({k: v.cpu() for k, v in counts.items()})
    results["head_lines"] = model.head.describe_counts(results["head"])
    results["skipped_samples"] = num_skipped if distributed.is_enabled() else len(skipped)
    results["skipped"] = skipped  # this process's, each naming its file
    return results


class _pyramid_readout:
    """eval.pyramid_readout for the evaluation's duration: "finest" fuses nothing (the pyramid's tau at 1,
    S&F Eq. 2's finest level everywhere: Table 8's "aux. supervision" reading); "fused" changes nothing."""

    def __init__(self, head, readout: str) -> None:
        self.head, self.saved = head, None
        if readout == "fused":
            return
        if not hasattr(head, "strides") or not hasattr(head, "tau"):
            raise ConfigError(f"eval.pyramid_readout = {readout!r} needs a pyramid head (model.head.structure: "
                              "pyramid); this model has a single-level head: use 'fused' (the default)")
        self.saved, head.tau = head.tau, 1.0

    def close(self) -> None:
        if self.saved is not None:
            self.head.tau, self.saved = self.saved, None


def summary(results: dict) -> dict[str, float]:
    """The scalar metrics, in percent (rounded to 0.01), for logs and JSON, then the head's own
    (`SegmentationHead.summarize_counts`; the pyramid: "level_stride_<s>", the percentage of pixels
    decided at the level of stride s)."""
    out = {k: (round(100 * results[k], 2) if not math.isnan(results[k]) else None) for k in SUMMARY_KEYS}
    out.update(results.get("head") or {})
    return out


def format_table(results: dict, class_names: list[str], show: int = 10) -> str:
    """A console summary: the four metrics, then the per-class IoU of the `show` most frequent classes."""
    s = summary(results)
    widths = [max(6, len(k)) for k in SUMMARY_KEYS]
    lines = ["  ".join(f"{k:>{w}}" for k, w in zip(SUMMARY_KEYS, widths)),
             "  ".join(f"{_pct(s[k]):>{w}}" for k, w in zip(SUMMARY_KEYS, widths))]
    label_area = results["label_area"]
    present = int((label_area > 0).sum())
    lines.append(f"classes present in the labels: {present} of {len(class_names)}")
    lines += results.get("head_lines") or []  # the head's own (e.g. the pyramid's pixels per level)
    if show and present:
        order = np.argsort(-label_area, kind="stable")[: min(show, present)]
        width = max(len(class_names[i]) for i in order)
        lines.append(f"{'class':<{width}}  {'IoU':>6}  {'Acc':>6}  {'pixels':>10}")
        for i in order:
            lines.append(
                f"{class_names[i]:<{width}}  {_pct(100 * results['IoU'][i]):>6}  {_pct(100 * results['Acc'][i]):>6}  "
                f"{int(label_area[i]):>10}"
            )
    return "\n".join(lines)


def write_results(results: dict, class_names: list[str], out_dir: Path, extra: dict | None = None) -> tuple[Path, Path]:
    """metrics.json (summary in percent + `extra`) and per_class.csv (every class; IoU, Acc, Dice, ... in
    percent, as the console and metrics.json) in `out_dir`, each written atomically."""
    from scaleseg.engine.checkpoint import write_text_atomic
    from scaleseg.engine.workdir import WriteFailed

    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise WriteFailed(out_dir, 0, exc) from None
    json_path = out_dir / "metrics.json"
    skipped = {"skipped_samples": int(results.get("skipped_samples", 0))}  # bad images not scored (on_bad_sample=skip)
    write_text_atomic(json_path, json.dumps({**summary(results), **skipped, **(extra or {})}, indent=2) + "\n")
    csv_path = out_dir / "per_class.csv"
    text = io.StringIO(newline="")
    writer = csv.writer(text)
    writer.writerow(["class_id", "name", *PER_CLASS_KEYS, "intersection", "pred_area", "label_area"])
    for i, name in enumerate(class_names):
        writer.writerow(
            [i, name, *(_csv_percent(results[k][i]) for k in PER_CLASS_KEYS)]
            + [int(results[k][i]) for k in ("intersection", "pred_area", "label_area")]
        )
    write_text_atomic(csv_path, text.getvalue())
    return json_path, csv_path


def _pct(value) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.2f}"


def _csv_percent(value: float) -> str:
    """A fraction as a percentage with 4 decimals ("" for a class with no union / no label)."""
    return "" if math.isnan(value) else f"{100 * value:.4f}"
