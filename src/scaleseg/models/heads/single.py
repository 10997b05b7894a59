"""The usual single-level output structure: one score map at the decoder's stride."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from scaleseg.models.heads.base import ClassScorer, SegmentationHead


def resize_scores(scores: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear (align_corners=False) resize of a (B, K, h, w) map; a no-op at the same size."""
    if tuple(scores.shape[-2:]) == tuple(size):
        return scores
    return F.interpolate(scores, size=size, mode="bilinear", align_corners=False)


def nearest_downsample(target: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Integer nearest resize of a (B, H, W) label map, matching F.interpolate(mode="nearest")
    without a float round-trip (label ids above 2**24 would not survive one)."""
    H, W = target.shape[-2:]
    h, w = size
    rows = torch.arange(h, device=target.device) * H // h
    cols = torch.arange(w, device=target.device) * W // w
    return target[:, rows][:, :, cols]


class SingleLevelHead(SegmentationHead):
    """features (B, D, H/4, W/4) -> {"scores": (B, K, H/4, W/4)} via a scorer.

    loss_resolution "full": scores are bilinearly upsampled to the label size (the paper);
    "decoder": labels are nearest-downsampled to the score grid instead (16x fewer pixels).
    """

    def __init__(self, scorer: ClassScorer, loss_resolution: str = "full") -> None:
        super().__init__()
        self.scorer = scorer
        self.loss_resolution = loss_resolution

    @property
    def scorers(self) -> list[ClassScorer]:
        return [self.scorer]

    def forward(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"scores": self.scorer(features)}

    def loss(self, outputs: dict[str, torch.Tensor], target: torch.Tensor) -> dict[str, torch.Tensor]:
        scores = outputs["scores"]
        if self.loss_resolution == "full":
            scores = resize_scores(scores, target.shape[-2:])
        else:
            target = nearest_downsample(target, scores.shape[-2:])
        return self.scorer.loss(scores, target)

    def dense_with_counts(self, outputs: dict[str, torch.Tensor], size: tuple[int, int]):
        return self.scorer.dense(resize_scores(outputs["scores"], size)), {}  # (B, K, H, W), no counts
