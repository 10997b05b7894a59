"""Class scorers: how a pixel's feature vector meets the classes (DESIGN.md, "the one idea").

A scorer is the last 1x1 conv of the network plus everything that depends on how classes are
represented: the per-pixel objective, the dense map that inference averages over windows, scales
and flips, and the decision from that map to class ids. Structures (single level, pyramid) call
these four methods and never look inside:

    forward(features (B, D, h, w)) -> scores (B, K, h, w)     K = C (linear) or d (embedding)
    loss(scores (B, K, H, W), target (B, H, W)) -> {term: scalar}
    dense(scores (B, K, H, W)) -> (B, K, H, W)                 what inference averages
    decide(dense (B, K, H, W)) -> labels (B, H, W) int64
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LinearScorer(nn.Module):
    """The baseline: a C-channel 1x1 conv (logits), softmax cross-entropy, argmax.

    Memory is O(C) per pixel: the scores, their upsampled copy and the softmax are C x H x W.
    """

    def __init__(self, in_channels: int, num_classes: int, ignore_index: int = 255) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.classifier = nn.Conv2d(in_channels, num_classes, kernel_size=1)  # with bias, as published
        nn.init.normal_(self.classifier.weight, std=0.01)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.classifier(features)  # (B, C, h, w) logits

    def loss(self, scores: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """Softmax cross-entropy averaged over non-ignored pixels; 0 (zero gradient) if there are none."""
        valid = target != self.ignore_index
        if not bool(valid.any()):
            return {"ce": scores.sum() * 0.0}
        return {"ce": F.cross_entropy(scores.float(), target, ignore_index=self.ignore_index)}

    def dense(self, scores: torch.Tensor) -> torch.Tensor:
        return scores.float().softmax(dim=1)  # (B, C, H, W) probabilities

    def decide(self, dense: torch.Tensor) -> torch.Tensor:
        return dense.argmax(dim=1)  # (B, H, W)

    def param_groups(self) -> list[dict]:
        return [{"name": "head", "params": list(self.parameters())}]
