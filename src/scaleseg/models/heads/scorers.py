"""Class scorers: how a pixel's feature vector meets the classes (DESIGN.md, "the one idea").

A scorer is the last 1x1 conv of the network plus everything that depends on how classes are
represented: the per-pixel objective, the dense map that inference averages over windows, scales
and flips, and the decision from that map to class ids. Structures (single level, pyramid) call the
`ClassScorer` methods (`models/heads/base.py`) and never look inside.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from scaleseg.models.heads.base import ClassScorer
from scaleseg.search import nearest_class


class LinearScorer(ClassScorer):
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

    def loss(self, scores: torch.Tensor, target: torch.Tensor, regularize: bool = True) -> dict[str, torch.Tensor]:
        """Softmax cross-entropy averaged over non-ignored pixels; 0 (zero gradient) if there are none."""
        valid = target != self.ignore_index
        if not bool(valid.any()):
            return {"ce": scores.sum() * 0.0}
        return {"ce": F.cross_entropy(scores.float(), target, ignore_index=self.ignore_index)}

    def dense(self, scores: torch.Tensor) -> torch.Tensor:
        return scores.float().softmax(dim=1)  # (B, C, H, W) probabilities

    def decide(self, dense: torch.Tensor, chunk_classes: int | None = None) -> torch.Tensor:
        return dense.argmax(dim=1)  # (B, H, W); ties: the first maximum, the lower class id


class EmbeddingScorer(ClassScorer):
    """ESS: a d-channel pixel embedding against a learned C x d class-embedding table.

    Both are L2-normalised (unless `normalize=False`, the paper's ablation). Training loss: the
    kNN-approximated cross-entropy (ESS Eq. 6) or the exact one over all classes (both in bounded
    memory), plus `margin_weight` x the max-margin regulariser (ESS Eq. 7). Prediction: the nearest
    class embedding, searched in chunks. Memory is O(d) per pixel: nothing of size C x H x W.
    The table's optimizer settings are `optim.groups.class_embeddings` (its group name).
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        embed_dim: int = 12,
        num_neighbours: int = 7,
        temperature: float = 0.05,
        margin: float = 0.2,
        margin_weight: float = 1.0,
        negatives: str = "nearest",
        distance: str = "squared",
        loss: str = "knn",
        normalize: bool = True,
        ignore_index: int = 255,
        search_budget_bytes: int = 256 * 2**20,
        search_backend: str = "torch",
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.k, self.tau, self.margin, self.margin_weight = num_neighbours, temperature, margin, margin_weight
        self.negatives, self.distance, self.loss_kind, self.normalize = negatives, distance, loss, normalize
        self.search = {"budget_bytes": search_budget_bytes, "backend": search_backend}
        self.embed = nn.Conv2d(in_channels, embed_dim, kernel_size=1)  # pixel embeddings, with bias as published
        self.class_embeddings = nn.Parameter(torch.empty(num_classes, embed_dim).uniform_(-1.0, 1.0))  # (C, d)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.embed(features)  # (B, d, h, w), normalised where used (after any resize)

    def _unit(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        return F.normalize(x.float(), dim=dim) if self.normalize else x.float()

    def classes(self) -> torch.Tensor:
        return self._unit(self.class_embeddings, dim=1)  # (C, d)

    def class_table(self, raw: bool = False) -> torch.Tensor:
        return self.class_embeddings if raw else self.classes()

    def loss(self, scores: torch.Tensor, target: torch.Tensor, regularize: bool = True) -> dict[str, torch.Tensor]:
        from scaleseg.losses import full_cross_entropy, knn_cross_entropy, margin_regularizer

        d = scores.shape[1]
        x = self._unit(scores, dim=1).permute(0, 2, 3, 1).reshape(-1, d)  # (B*H*W, d)
        t = target.reshape(-1)
        E = self.classes()
        if self.loss_kind == "knn":
            ce = knn_cross_entropy(
                x, E, t, self.k, self.tau, self.ignore_index, self.negatives, self.distance,
                budget_bytes=self.search["budget_bytes"], backend=self.search["backend"],
            )
        else:
            ce = full_cross_entropy(x, E, t, self.tau, self.ignore_index, self.distance,
                                    budget_bytes=self.search["budget_bytes"])
        terms = {"ce": ce}
        if regularize and self.margin_weight > 0:
            terms["margin"] = self.margin_weight * margin_regularizer(E, self.margin, **self.search)
        return terms

    def dense(self, scores: torch.Tensor) -> torch.Tensor:
        return self._unit(scores, dim=1)  # (B, d, H, W) unit pixel embeddings, averaged by inference

    def decide(self, dense: torch.Tensor, chunk_classes: int | None = None) -> torch.Tensor:
        """The nearest class embedding of each pixel (ties: the lower class id), in bounded memory; the
        same function is traced into the ONNX export (with a fixed `chunk_classes`)."""
        B, d, H, W = dense.shape
        x = self._unit(dense, dim=1).permute(0, 2, 3, 1).reshape(-1, d)  # averages are re-normalised
        labels = nearest_class(x, self.classes(), budget_bytes=self.search["budget_bytes"], chunk_classes=chunk_classes)
        return labels.reshape(B, H, W)

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"head": list(self.embed.parameters()), "class_embeddings": [self.class_embeddings]}
