"""How much each loss term pushes the shared features: the gradient of every term of the head's loss at
the head's input (the decoder's output, which the pyramid's unity and semantic heads share).

    loss_gradient_norms(model, images, labels) -> {"ce": 0.8, "unity": 4.1, ...}

The model is used as in training (train mode: BatchNorm on batch statistics, dropout on) on a copy, so
its running statistics are left as they were. Terms that do not reach the features (none, for the heads
of this project) are reported as 0.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch


def loss_gradient_norms(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """The L2 norm, over the whole (B, D, h, w) feature map, of d term / d features for every loss term
    of `model.head.loss` (the summed "loss" left out), on one batch."""
    return _term_norms(copy.deepcopy(model).train(), images, labels)


def _term_norms(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """loss_gradient_norms on a model already in train mode (the caller's copy)."""
    features = model.features(images).detach().requires_grad_(True)
    terms = model.head.loss(model.head(features), labels)
    norms = {}
    names = list(terms)
    for index, name in enumerate(names):
        value = terms[name]
        if not value.requires_grad:
            norms[name] = 0.0
            continue
        (grad,) = torch.autograd.grad(value, features, retain_graph=index < len(names) - 1, allow_unused=True)
        norms[name] = 0.0 if grad is None else float(grad.double().norm())
    return norms


def mean_gradient_norms(model: torch.nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> dict:
    """Per term: the mean over batches of its gradient norm at the features, and `unity_to_ce`, the ratio of
    the unity term's mean to the classification term's (present for a pyramid only)."""
    sums: dict[str, float] = {}
    count = 0
    model = copy.deepcopy(model).train()  # one copy for all batches
    for images, labels in batches:
        for name, value in _term_norms(model, images, labels).items():
            sums[name] = sums.get(name, 0.0) + value
        count += 1
    if count == 0:
        raise ValueError("no batches to measure the loss gradients on")
    means = {name: total / count for name, total in sums.items()}
    out = {"batches": count, "gradient_norm": means}
    if "unity" in means and means.get("ce"):
        out["unity_to_ce"] = means["unity"] / means["ce"]
    return out
