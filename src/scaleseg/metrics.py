"""Streaming segmentation metrics in O(C) memory.

Per class we accumulate three counts over the whole dataset: the intersection I_c (pixels labelled c
and predicted c), the prediction area P_c and the label area L_c, counted over non-ignored pixels
only. From them (conventions of mmsegmentation, see docs):

    IoU_c = I_c / (P_c + L_c - I_c)      NaN where the union is 0 (class absent from both)
    Acc_c = I_c / L_c                    NaN where the class is absent from the labels (= recall)
    Dice_c = 2 I_c / (P_c + L_c)         NaN where the class is absent from both
    Precision_c = I_c / P_c              NaN where the class is never predicted
    Recall_c = I_c / L_c                 (= Acc_c)
    Fscore_c = 2 Precision_c Recall_c / (Precision_c + Recall_c)   (beta = 1; NaN where either is NaN)
    mIoU  = nanmean_c IoU_c,   mAcc = nanmean_c Acc_c, and mDice, mPrecision, mRecall, mFscore alike
    aAcc  = sum_c I_c / sum_c L_c        (pixel accuracy)
    fwIoU = sum_c (L_c / sum L) IoU_c    (classes with L_c = 0 contribute 0)

These are mmsegmentation's `IoUMetric` definitions (its mDice / mFscore / mPrecision / mRecall): mFscore
equals mDice except that a class labelled but never predicted counts 0 in mDice and is left out of
mFscore (its precision is undefined).

No C x C confusion matrix is built, so 100,000 classes cost three int64 vectors.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from scaleseg.errors import DataError


class SegmentationMetrics:
    """Accumulate per-class intersection / prediction / label areas; compute mIoU, aAcc, mAcc, fwIoU.

    `update` accepts CPU or GPU tensors (or numpy arrays) of any matching shape; counts live on the
    device of the first update and are int64, so billions of pixels do not overflow.
    """

    def __init__(self, num_classes: int, ignore_index: int = 255) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self.reset()

    def reset(self) -> None:
        self.intersection: torch.Tensor | None = None  # (C,) int64
        self.pred_area: torch.Tensor | None = None  # (C,) int64
        self.label_area: torch.Tensor | None = None  # (C,) int64

    @torch.no_grad()
    def update(self, pred: torch.Tensor | np.ndarray, target: torch.Tensor | np.ndarray) -> None:
        """Add one batch: `pred` and `target` are integer label maps of the same shape."""
        pred = torch.as_tensor(pred)
        target = torch.as_tensor(target)
        if pred.shape != target.shape:
            raise ValueError(f"prediction shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
        if pred.is_floating_point() or target.is_floating_point():
            raise TypeError("SegmentationMetrics.update expects integer label maps, not scores")
        device = target.device if self.intersection is None else self.intersection.device
        pred = pred.to(device=device, dtype=torch.int64).reshape(-1)
        target = target.to(device=device, dtype=torch.int64).reshape(-1)
        C = self.num_classes

        valid = target != self.ignore_index
        pred, target = pred[valid], target[valid]
        bad = (target < 0) | (target >= C)
        if bool(bad.any()):
            value = int(target[bad][0])
            raise DataError(
                f"label value {value} is neither a class id (0..{C - 1}) nor the ignore index {self.ignore_index}"
            )
        bad = (pred < 0) | (pred >= C)
        if bool(bad.any()):
            raise ValueError(f"predicted class {int(pred[bad][0])} is outside 0..{C - 1}")

        hit = target[pred == target]
        intersection = torch.bincount(hit, minlength=C)
        pred_area = torch.bincount(pred, minlength=C)
        label_area = torch.bincount(target, minlength=C)
        if self.intersection is None:
            self.intersection, self.pred_area, self.label_area = intersection, pred_area, label_area
        else:
            self.intersection += intersection
            self.pred_area += pred_area
            self.label_area += label_area

    def merge_(self, other_counts: torch.Tensor) -> None:
        """Add counts stacked as (3, C) (intersection, prediction, label), e.g. summed across ranks."""
        counts = self.counts()
        counts += other_counts.to(counts.device)
        self.intersection, self.pred_area, self.label_area = counts[0], counts[1], counts[2]

    def counts(self) -> torch.Tensor:
        """(3, C) int64: intersection, prediction area, label area."""
        if self.intersection is None:
            return torch.zeros(3, self.num_classes, dtype=torch.int64)
        return torch.stack([self.intersection, self.pred_area, self.label_area])

    def compute(self) -> dict:
        """Return the scalar metrics (floats in [0, 1], NaN if undefined: mIoU, aAcc, mAcc, fwIoU, mDice,
        mPrecision, mRecall, mFscore) and the per-class arrays (IoU, Acc, Dice, Precision, Recall, Fscore,
        and the three counts)."""
        inter, pred, label = (c.double().cpu().numpy() for c in self.counts())
        iou = iou_from_areas(inter, pred, label)
        with np.errstate(divide="ignore", invalid="ignore"):
            acc = np.where(label > 0, inter / np.maximum(label, 1), np.nan)
            dice = np.where(pred + label > 0, 2 * inter / np.maximum(pred + label, 1), np.nan)
            precision = np.where(pred > 0, inter / np.maximum(pred, 1), np.nan)
            fscore = np.where(precision + acc > 0, 2 * precision * acc / (precision + acc), 0.0)
            fscore[np.isnan(precision) | np.isnan(acc)] = np.nan
        total = label.sum()
        return {
            "mIoU": _nanmean(iou),
            "aAcc": float(inter.sum() / total) if total > 0 else math.nan,
            "mAcc": _nanmean(acc),
            "fwIoU": float(np.sum(label / total * np.nan_to_num(iou))) if total > 0 else math.nan,
            "mDice": _nanmean(dice),
            "mPrecision": _nanmean(precision),
            "mRecall": _nanmean(acc),
            "mFscore": _nanmean(fscore),
            "IoU": iou,
            "Acc": acc,
            "Dice": dice,
            "Precision": precision,
            "Recall": acc,
            "Fscore": fscore,
            "intersection": inter.astype(np.int64),
            "pred_area": pred.astype(np.int64),
            "label_area": label.astype(np.int64),
        }


def iou_from_areas(inter: np.ndarray, pred: np.ndarray, label: np.ndarray) -> np.ndarray:
    """Per-class IoU from intersection, prediction and label areas; NaN where the union is empty."""
    union = pred + label - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(union > 0, inter / np.maximum(union, 1), np.nan)


def miou_from_areas(inter: np.ndarray, pred: np.ndarray, label: np.ndarray) -> float:
    """mIoU (in [0, 1]) as `compute` gives it: the mean IoU over the classes with a non-empty union;
    NaN if there are none."""
    return _nanmean(iou_from_areas(inter, pred, label))


def _nanmean(values: np.ndarray) -> float:
    """The mean over the defined (non-NaN) entries; NaN if there are none."""
    defined = ~np.isnan(values)
    return float(values[defined].mean()) if defined.any() else math.nan
