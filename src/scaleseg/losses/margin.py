"""Max-margin regulariser between class embeddings, ESS Eq. 7:

    L_r = 1/C sum_i max(0, m - d_i),   d_i = min_{j != i} ||mu_i - mu_j||

The nearest other class of each class is found by the bounded-memory search (no C x C matrix,
so C = 100,000 is fine); the distance to it is then computed with gradient. The value and the
gradient equal the min-over-j formula (whose gradient flows to the argmin), ties aside."""

from __future__ import annotations

import torch

from scaleseg.losses.distances import EPS
from scaleseg.search import DEFAULT_BUDGET_BYTES, nearest_classes


def margin_regularizer(
    class_embeddings: torch.Tensor, margin: float = 0.2, *, budget_bytes: int = DEFAULT_BUDGET_BYTES,
    backend: str = "torch",
) -> torch.Tensor:
    E = class_embeddings.float()
    C = E.shape[0]
    if C < 2:
        return class_embeddings.sum() * 0.0
    with torch.no_grad():
        two = nearest_classes(E, E, 2, budget_bytes=budget_bytes, backend=backend)  # (C, 2): itself, nearest other
        own = torch.arange(C, device=E.device)
        other = torch.where(two[:, 0] == own, two[:, 1], two[:, 0])  # a duplicate vector may sort before itself
    d = (E - E[other]).pow(2).sum(1).clamp_min(EPS).sqrt()  # (C,)
    return torch.relu(margin - d).mean()
