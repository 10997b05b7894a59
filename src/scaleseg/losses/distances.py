"""Distance logits shared by the ESS losses: -||x - mu||^2 / tau (paper) or -||x - mu|| / tau
(the published code's form: with tau = 0.05 it is its factor 20)."""

from __future__ import annotations

import torch

DISTANCES = ("squared", "euclidean")
EPS = 1e-12  # floor under squared distances before a square root (its gradient at 0 is infinite)


def check_distance(distance: str) -> None:
    if distance not in DISTANCES:
        raise ValueError(f"distance must be one of {DISTANCES}, got {distance!r}")


def logits_from_squared(sq: torch.Tensor, tau: float, distance: str) -> torch.Tensor:
    """Logits from squared distances."""
    if distance == "squared":
        return -sq / tau
    return -sq.clamp_min(EPS).sqrt() / tau


def paired_logits(x: torch.Tensor, mu: torch.Tensor, tau: float, distance: str) -> torch.Tensor:
    """Logit of each row of x (N, d) against its own class vector(s) mu (N, d) or (N, m, d)."""
    if mu.dim() == 3:
        x = x.unsqueeze(1)
    sq = (x - mu).pow(2).sum(-1)
    return logits_from_squared(sq, tau, distance)
