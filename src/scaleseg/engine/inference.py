"""Inference: whole image, sliding window, multi-scale + flip.

Every mode averages the model's *dense* map (softmax probabilities for the linear scorer,
unit pixel embeddings for the embedding scorer) and decides classes once at the end, so with an
embedding scorer nothing of size C x H x W is ever built. One view (whole image, one scale, no
flip) is decided directly: the linear scorer's argmax then runs on its logits, without a softmax
(`deciding_one_view`). Views are accumulated in place, in chunks of channels, so averaging holds
one C x H x W sum plus one view.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from scaleseg.config import EvalConfig
from scaleseg.models.heads.scorers import deciding_one_view

_CHANNEL_CHUNK = 64  # channels per step when a view is flipped or resized into the running sum


def _window_starts(size: int, crop: int, stride: int) -> list[int]:
    """Window offsets covering [0, size): every `stride`, the last one flush with the end."""
    if size <= crop:
        return [0]
    count = (size - crop + stride - 1) // stride + 1
    return [min(i * stride, size - crop) for i in range(count)]


def _view_dense_with_counts(model, view: torch.Tensor, target: torch.Tensor | None):
    """The model's dense map and counts of one view; `target` (the view's labels) only where given, so a
    model whose `dense_with_counts` takes images alone still serves every view without labels."""
    return model.dense_with_counts(view) if target is None else model.dense_with_counts(view, target)


def _add_counts(total: dict[str, torch.Tensor], counts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for name, value in counts.items():
        total[name] = total[name] + value if name in total else value
    return total


@torch.no_grad()
def slide_dense(model, images: torch.Tensor, crop_size: tuple[int, int], stride: tuple[int, int]) -> torch.Tensor:
    """Average of the dense maps of overlapping windows: (B, 3, H, W) -> (B, K, H, W)."""
    return slide_dense_with_counts(model, images, crop_size, stride)[0]


@torch.no_grad()
def slide_dense_with_counts(
    model, images: torch.Tensor, crop_size: tuple[int, int], stride: tuple[int, int],
    target: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """`slide_dense` and the head's counts summed over the windows (with `target`, the labels (B, H, W),
    each window's counts against its own crop of them)."""
    H, W = images.shape[-2:]
    ch, cw = min(crop_size[0], H), min(crop_size[1], W)
    total = None
    counts: dict[str, torch.Tensor] = {}
    count = images.new_zeros((1, 1, H, W))
    for y in _window_starts(H, ch, stride[0]):
        for x in _window_starts(W, cw, stride[1]):
            window = None if target is None else target[:, y : y + ch, x : x + cw]
            dense, view_counts = _view_dense_with_counts(model, images[:, :, y : y + ch, x : x + cw], window)  # (B, K, ch, cw)
            _add_counts(counts, view_counts)
            if total is None:
                total = dense.new_zeros((images.shape[0], dense.shape[1], H, W))
            total[:, :, y : y + ch, x : x + cw] += dense
            count[:, :, y : y + ch, x : x + cw] += 1
    return total / count, counts


def _add_view(total: torch.Tensor | None, dense: torch.Tensor, flip: bool, size: tuple[int, int]) -> torch.Tensor:
    """total += the view's dense map, un-flipped and resized to `size`, chunk of channels by chunk
    (a flipped or resized copy of one chunk at a time, never of the whole map)."""
    if total is None:
        total = dense.new_zeros((dense.shape[0], dense.shape[1], *size))
    for c0 in range(0, dense.shape[1], _CHANNEL_CHUNK):
        part = dense[:, c0 : c0 + _CHANNEL_CHUNK]
        if flip:
            part = part.flip(-1)
        if tuple(part.shape[-2:]) != tuple(size):
            part = F.interpolate(part, size=size, mode="bilinear", align_corners=False)
        total[:, c0 : c0 + _CHANNEL_CHUNK] += part
    return total


@torch.no_grad()
def infer_dense(model, images: torch.Tensor, cfg: EvalConfig) -> torch.Tensor:
    """The averaged dense map at the input size (B, K, H, W) for the configured mode, scales, flip."""
    return infer_dense_with_counts(model, images, cfg)[0]


@torch.no_grad()
def infer_dense_with_counts(
    model, images: torch.Tensor, cfg: EvalConfig, target: torch.Tensor | None = None
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """`infer_dense` and the head's counts summed over every view (`SegmentationHead.dense_with_counts`).
    `target`, the labels (B, H, W), goes with the scale-1 unflipped view only (the one the labels fit)."""
    H, W = images.shape[-2:]
    total = None
    counts: dict[str, torch.Tensor] = {}
    views = 0
    for scale in cfg.scales:
        scaled = images
        if scale != 1.0:
            size = (max(1, round(H * scale)), max(1, round(W * scale)))
            scaled = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
        for flip in (False, True) if cfg.flip else (False,):
            view = scaled.flip(-1) if flip else scaled
            labels = target if scale == 1.0 and not flip else None
            if cfg.mode == "slide":
                dense, view_counts = slide_dense_with_counts(model, view, cfg.crop_size, cfg.stride, labels)
            else:
                dense, view_counts = _view_dense_with_counts(model, view, labels)
            _add_counts(counts, view_counts)
            if total is None and not flip and dense.shape[-2:] == (H, W):
                total = dense  # the first view is the running sum (dense maps are fresh tensors)
            else:
                total = _add_view(total, dense, flip, (H, W))
            del dense
            views += 1
    return (total.div_(views) if views > 1 else total), counts


def is_one_view(cfg: EvalConfig) -> bool:
    """The whole image at scale 1, no flip: nothing is averaged or resized."""
    return cfg.mode == "whole" and tuple(cfg.scales) == (1.0,) and not cfg.flip


@torch.no_grad()
def predict_labels_with_counts(
    model, images: torch.Tensor, cfg: EvalConfig, target: torch.Tensor | None = None
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Class ids (B, H, W) for normalised images (B, 3, H, W), and the head's counts over the views
    (with `target`, the labels (B, H, W), also those that compare with them)."""
    if is_one_view(cfg):
        with deciding_one_view():  # decided as it is: the linear scorer's logits, no softmax
            dense, counts = _view_dense_with_counts(model, images, target)
            return model.decide(dense), counts
    dense, counts = infer_dense_with_counts(model, images, cfg, target)
    return model.decide(dense), counts


@torch.no_grad()
def predict_labels(model, images: torch.Tensor, cfg: EvalConfig) -> torch.Tensor:
    """Class ids (B, H, W) for normalised images (B, 3, H, W)."""
    return predict_labels_with_counts(model, images, cfg)[0]
