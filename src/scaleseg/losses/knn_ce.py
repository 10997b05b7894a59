"""kNN-approximated cross-entropy, ESS Eq. 6.

For pixel i with target y_i, the softmax runs over the target and k negative classes only:

    L = mean_i -log  exp(-||x_i - mu_{y_i}||^2 / tau) / sum_{m in {y_i} u eta_i} exp(-||x_i - mu_m||^2 / tau)

where eta_i are the k nearest class embeddings to x_i other than y_i (hard negatives), or k
distinct random classes other than y_i (the paper's ablation). Fixes over the published code: the
search asks for k + 1 neighbours and drops the target, so the k negatives are true negatives (the
published code replaced a target found among the neighbours by class t - 1: an arbitrary class,
possibly a duplicate, and for t = 0 the target itself twice); ignored pixels are removed before the
search, not searched and gathered.

Memory: the search is bounded by its byte budget; the loss itself holds (N_valid, k + 1, d).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from scaleseg.losses.distances import check_distance, paired_logits
from scaleseg.search import DEFAULT_BUDGET_BYTES, nearest_classes


def nearest_negatives(
    x: torch.Tensor, class_embeddings: torch.Tensor, target: torch.Tensor, k: int,
    budget_bytes: int = DEFAULT_BUDGET_BYTES, backend: str = "torch",
) -> torch.Tensor:
    """(N, k): the k nearest classes to each x that are not its target, nearest first."""
    found = nearest_classes(x, class_embeddings, k + 1, budget_bytes=budget_bytes, backend=backend)  # (N, k+1)
    is_target = found == target[:, None]
    # drop the target where it was found, else the (k+1)-th neighbour: exactly k remain per row
    drop = is_target.clone()
    drop[:, -1] |= ~is_target.any(dim=1)
    return found[~drop].view(-1, k)


def random_negatives(target: torch.Tensor, num_classes: int, k: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """(N, k): k distinct classes per row drawn uniformly from the classes other than the target.

    Floyd's sampling of a k-subset of the C - 1 non-target ids, vectorised over rows: k steps of
    O(N k) work and memory, never O(N C)."""
    n, pool = target.shape[0], num_classes - 1
    chosen = torch.empty((n, 0), dtype=torch.int64, device=target.device)
    for j in range(pool - k, pool):
        r = (torch.rand(n, generator=generator, device=target.device) * (j + 1)).long().clamp_(max=j)
        taken = (chosen == r[:, None]).any(dim=1)
        chosen = torch.cat([chosen, torch.where(taken, torch.full_like(r, j), r)[:, None]], dim=1)
    return chosen + (chosen >= target[:, None]).long()  # skip over the target id


def knn_cross_entropy(
    pixel_embeddings: torch.Tensor,
    class_embeddings: torch.Tensor,
    target: torch.Tensor,
    k: int,
    tau: float = 0.05,
    ignore_index: int = 255,
    negatives: str = "nearest",
    distance: str = "squared",
    *,
    budget_bytes: int = DEFAULT_BUDGET_BYTES,
    backend: str = "torch",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Eq. 6 for pixel embeddings (N, d), class embeddings (C, d) and targets (N,).

    Mean over the non-ignored pixels; 0 with zero gradient when there are none."""
    check_distance(distance)
    if negatives not in ("nearest", "random"):
        raise ValueError(f"negatives must be 'nearest' or 'random', got {negatives!r}")
    num_classes = class_embeddings.shape[0]
    if not 1 <= k < num_classes:
        raise ValueError(f"k = {k} negatives need 1 <= k <= C - 1 = {num_classes - 1}")
    valid = target != ignore_index
    x = pixel_embeddings[valid].float()  # (n, d): ignored pixels never reach the search
    t = target[valid]
    if x.shape[0] == 0:
        return pixel_embeddings.sum() * 0.0 + class_embeddings.sum() * 0.0
    if bool(((t < 0) | (t >= num_classes)).any()):
        bad = int(t[(t < 0) | (t >= num_classes)][0])
        raise ValueError(f"target value {bad} is neither a class (0..{num_classes - 1}) nor ignore_index {ignore_index}")
    E = class_embeddings.float()
    with torch.no_grad():
        if negatives == "nearest":
            neg = nearest_negatives(x, E, t, k, budget_bytes, backend)
        else:
            neg = random_negatives(t, num_classes, k, generator)
    candidates = torch.cat([t[:, None], neg], dim=1)  # (n, k+1), the target first
    logits = paired_logits(x, E[candidates], tau, distance)  # (n, k+1)
    return F.cross_entropy(logits, torch.zeros_like(t))
