"""The two contracts of a head (DESIGN.md): how a feature meets the classes (`ClassScorer`) and how the
output is structured (`SegmentationHead`). The engine, the analyses and the export talk to these
methods only; which scorer or structure a model has is never asked with `isinstance` or `hasattr`.

Shapes: B images, D feature channels, K dense channels (C class scores for the linear scorer, d
embedding channels for ESS), C classes; h, w the feature grid; H, W the image.

    ClassScorer
        forward(features (B, D, h, w)) -> scores (B, K, h, w)
        loss(scores (B, K, H', W'), target (B, H', W'), regularize=True) -> {term: scalar}
                 regularize=False leaves out terms on the classes alone (ESS Eq. 7), which a structure
                 with several scorers sharing one class table adds once
        dense(scores (B, K, H, W)) -> (B, K, H, W)      the map inference averages over views
        decide(dense (B, K, H, W), chunk_classes=None) -> labels (B, H, W) int64, ties to the lower id
                 chunk_classes: classes compared at a time by a scorer that searches a class table
                 (None: as its memory budget allows; the export fixes it); others ignore it
        class_table(raw=False) -> (C, d) or None        the class embeddings as compared (raw: as trained)
        param_groups() -> {group name: [parameters]}    names are keys of `optim.groups`
        after_optimizer_step()                          re-imposes a constraint on the scorer's parameters
                 (the sphere class table: rows back to unit norm); the trainer calls it after every
                 optimizer step, a hand-written loop after `optimizer.step()`; nothing by default

    SegmentationHead
        forward(features) -> outputs (a dict of tensors or lists of tensors)
        loss(outputs, target (B, H, W)) -> {term: scalar}
        dense_with_counts(outputs, size, target=None) -> (dense (B, K, *size), counts {name: int64 tensor})
                 counts: whatever the structure tallies per view (the pyramid: pixels decided per level;
                 given the view's labels `target` (B, *size), also S&F Table 9 and the unity head's
                 precision and recall); the evaluator sums them over views, images and processes like
                 the IoU counts
        empty_counts() -> {name: zeros}                 the counts' names and shapes, all zero
        dense(outputs, size) -> (B, K, *size)           dense_with_counts without the counts
        decide(dense, chunk_classes=None) -> labels (B, H, W)    the deciding scorer's
        summarize_counts(counts) -> {metric: percent}   for metrics.json / scalars / TensorBoard
        describe_counts(summary) -> [line]              for the console table
        size_divisor: int                               inputs are padded to a multiple of it
        scorers: [ClassScorer]                          every scorer, the one that decides last
        class_table(raw=False), param_groups()          as the scorers', a shared table listed once
        training_stats() -> {name: float}               the scorers' figures for the training log
        after_optimizer_step()                          the scorers', a shared table once

Nothing here keeps state between calls: evaluation is a pure function of the weights.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch
from torch import nn


class ClassScorer(nn.Module, ABC):
    """How a pixel's feature vector meets the classes: the network's last 1x1 conv plus the objective,
    the dense map inference averages and the decision from it. See the module docstring."""

    num_classes: int

    @abstractmethod
    def forward(self, features: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def loss(self, scores: torch.Tensor, target: torch.Tensor, regularize: bool = True) -> dict[str, torch.Tensor]: ...

    @abstractmethod
    def dense(self, scores: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def decide(self, dense: torch.Tensor, chunk_classes: int | None = None) -> torch.Tensor: ...

    def class_table(self, raw: bool = False) -> torch.Tensor | None:
        """The (C, d) class embeddings as the scorer compares them (raw=True: the parameter as trained);
        None for a scorer without a class table."""
        return None

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"head": list(self.parameters())}

    def training_stats(self) -> dict[str, float]:
        """Figures about the scorer's own training state for the training log (e.g. the class index's
        recall); {} by default."""
        return {}

    def after_optimizer_step(self) -> None:
        """Re-impose a constraint on the scorer's parameters after an optimizer step; nothing by default."""


class SegmentationHead(nn.Module, ABC):
    """An output structure over one or more class scorers. See the module docstring."""

    size_divisor: int = 1
    scorers: Sequence[ClassScorer]  # an attribute (nn.ModuleList) or a property of the structure

    @abstractmethod
    def forward(self, features: torch.Tensor) -> dict: ...

    @abstractmethod
    def loss(self, outputs: dict, target: torch.Tensor) -> dict[str, torch.Tensor]: ...

    @abstractmethod
    def dense_with_counts(
        self, outputs: dict, size: tuple[int, int], target: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...

    def dense(self, outputs: dict, size: tuple[int, int]) -> torch.Tensor:
        return self.dense_with_counts(outputs, size)[0]

    def decide(self, dense: torch.Tensor, chunk_classes: int | None = None) -> torch.Tensor:
        return self.scorers[-1].decide(dense, chunk_classes)

    def empty_counts(self) -> dict[str, torch.Tensor]:
        """Zero int64 tensors under the names and shapes `dense_with_counts` reports (the evaluator's start)."""
        return {}

    def summarize_counts(self, counts: dict[str, torch.Tensor]) -> dict[str, float]:
        return {}

    def describe_counts(self, summary: dict[str, float]) -> list[str]:
        return []

    def class_table(self, raw: bool = False) -> torch.Tensor | None:
        return self.scorers[-1].class_table(raw)

    def training_stats(self) -> dict[str, float]:
        """The scorers' `training_stats`, for the training log (a table shared by several scorers: once)."""
        stats: dict[str, float] = {}
        for scorer in self.scorers:
            stats.update(scorer.training_stats())
        return stats

    def after_optimizer_step(self) -> None:
        """Each scorer's `after_optimizer_step`, once per class table: the pyramid's levels share one, and
        re-imposing it per level would redo a C x d pass every step for nothing."""
        seen: set[int] = set()
        for scorer in self.scorers:
            table = scorer.class_table(raw=True)
            key = id(scorer) if table is None else id(table)
            if key not in seen:
                seen.add(key)
                scorer.after_optimizer_step()

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """The scorers' groups (a parameter shared by several scorers listed once) and every other
        parameter of the head in "head"."""
        groups: dict[str, list[nn.Parameter]] = {}
        seen: set[int] = set()
        for scorer in self.scorers:
            for name, params in scorer.param_groups().items():
                fresh = [p for p in params if id(p) not in seen]
                seen.update(id(p) for p in fresh)
                groups.setdefault(name, []).extend(fresh)
        groups.setdefault("head", []).extend(p for p in self.parameters() if id(p) not in seen)
        return groups
