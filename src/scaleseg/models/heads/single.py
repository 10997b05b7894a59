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


def majority_downsample(target: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, H, W) labels -> (B, h, w): the label most pixels of each cell hold (ties: the lowest id), every
    value a vote (ignore too: a cell mostly ignored stays ignored). Cells are ceil(H / h) x ceil(W / w) pixels
    from the top-left, as the backbone's strided convolutions tile the image; a cell past the border repeats
    the last row/column. Exact for any int64 id.

    The label of a cell is thereby the label around its centre, where bilinear upsampling (align_corners=False)
    puts the cell's score: the two agree, and a model trained on these labels predicts masks in place. (The
    top-left pixel of each cell, nearest downsampling, shifted predicted masks by about 1.5 px right and down.)"""
    B, H, W = target.shape
    h, w = size
    sh, sw = -(-H // h), -(-W // w)
    rows = (torch.arange(h, device=target.device)[:, None] * sh + torch.arange(sh, device=target.device)).clamp(max=H - 1)
    cols = (torch.arange(w, device=target.device)[:, None] * sw + torch.arange(sw, device=target.device)).clamp(max=W - 1)
    cells = target[:, rows.reshape(-1)][:, :, cols.reshape(-1)].reshape(B, h, sh, w, sw)
    cells = cells.permute(0, 1, 3, 2, 4).reshape(B, h, w, sh * sw)  # (B, h, w, k) the pixels of each cell
    votes = (cells[..., :, None] == cells[..., None, :]).sum(-1)  # (B, h, w, k) how many share each pixel's label
    most = votes == votes.amax(-1, keepdim=True)
    return torch.where(most, cells, torch.iinfo(cells.dtype).max).amin(-1)


class SingleLevelHead(SegmentationHead):
    """features (B, D, H/4, W/4) -> {"scores": (B, K, H/4, W/4)} via a scorer.

    loss_resolution "full": scores are bilinearly upsampled to the label size (the paper);
    "decoder": labels are downsampled to the score grid instead (16x fewer pixels), each cell taking its
    majority label (`majority_downsample`), so that training and the bilinear upsampling of inference agree.

    `semantic_head`: layers between the features and the scorer, a module returning a one-element list of
    (B, D_s, H/4, W/4) maps: the pyramid's SemanticHead with one level (S&F Table 6's single output with the
    same head as the pyramid); None: the scorer sees the features themselves.
    """

    def __init__(
        self, scorer: ClassScorer, loss_resolution: str = "full", semantic_head: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.scorer = scorer
        self.loss_resolution = loss_resolution
        self.semantic_head = semantic_head

    @property
    def scorers(self) -> list[ClassScorer]:
        return [self.scorer]

    def forward(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.semantic_head is not None:
            (features,) = self.semantic_head(features)
        return {"scores": self.scorer(features)}

    def loss(self, outputs: dict[str, torch.Tensor], target: torch.Tensor) -> dict[str, torch.Tensor]:
        scores = outputs["scores"]
        if self.loss_resolution == "full":
            scores = resize_scores(scores, target.shape[-2:])
        else:
            target = majority_downsample(target, scores.shape[-2:])
        return self.scorer.loss(scores, target)

    def dense_with_counts(self, outputs: dict[str, torch.Tensor], size: tuple[int, int], target=None):
        return self.scorer.dense(resize_scores(outputs["scores"], size)), {}  # (B, K, H, W), no counts
