"""kNN-approximated cross-entropy, ESS Eq. 6.

For pixel i with target y_i, the softmax runs over the target and k negative classes only:

    L = mean_i -log  exp(-||x_i - mu_{y_i}||^2 / tau) / sum_{m in {y_i} u eta_i} exp(-||x_i - mu_m||^2 / tau)

where eta_i are the k nearest class embeddings to x_i other than y_i (hard negatives), or k
distinct random classes other than y_i (the paper's ablation). Fixes over the published code: the
search asks for k + 1 neighbours and drops the target, so the k negatives are true negatives (the
published code replaced a target found among the neighbours by class t - 1: an arbitrary class,
possibly a duplicate, and for t = 0 the target itself twice); ignored pixels are removed before the
search, not searched and gathered.

Cheaper hard negatives (ESS supplementary C), chosen by the caller:
* `candidates`: per-pixel candidate lists searched elsewhere, e.g. `block_candidates`, one search
  per s x s block of pixels shared by the block ("0.25 or 0.125 fractions of total pixels");
* `index`: a built `scaleseg.search.ClassIndex`, the approximate search over clusters of classes.

Cost and memory: with few classes (n x C logits within a quarter of the budget) the logits of all
classes are computed by one matmul and the k + 1 of each pixel gathered from them (the search is
then a top-k of the same matrix); otherwise the candidates' embeddings (n, k + 1, d) are gathered.
The search is bounded by its byte budget.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from scaleseg.losses.distances import check_distance, logits_from_squared, paired_logits, squared_norms
from scaleseg.profiling import SEARCH, section
from scaleseg.search import DEFAULT_BUDGET_BYTES, _work_dtype, nearest_classes

DEFAULT_IGNORE_INDEX = -100  # as F.cross_entropy: never a class id


def negatives_from_candidates(candidates: torch.Tensor, target: torch.Tensor, k: int) -> torch.Tensor:
    """(N, k): the first k of each row's distinct candidates (N, m >= k + 1) that are not its target."""
    if candidates.shape[1] < k + 1:
        raise ValueError(f"{candidates.shape[1]} candidates per pixel; k = {k} negatives need at least k + 1")
    keep = candidates != target[:, None]
    keep &= keep.cumsum(dim=1) <= k  # exactly k per row: at most one candidate is the target
    return candidates[keep].view(-1, k)


def nearest_negatives(
    x: torch.Tensor, class_embeddings: torch.Tensor, target: torch.Tensor, k: int,
    budget_bytes: int = DEFAULT_BUDGET_BYTES, backend: str = "torch", index=None,
) -> torch.Tensor:
    """(N, k): the k nearest classes to each x that are not its target, nearest first (exact, or
    approximate through `index`)."""
    with section(SEARCH):
        found = nearest_classes(x, class_embeddings, k + 1, budget_bytes=budget_bytes, backend=backend,
                                index=index)  # (N, k+1)
    return negatives_from_candidates(found, target, k)


@torch.no_grad()
def block_candidates(
    pixel_embeddings: torch.Tensor, class_embeddings: torch.Tensor, m: int, block: int, *,
    valid: torch.Tensor | None = None, normalize: bool = True, budget_bytes: int = DEFAULT_BUDGET_BYTES,
    backend: str = "torch", index=None, expand: bool = True,
) -> torch.Tensor:
    """One nearest-class search per `block` x `block` block of pixels, shared by its pixels.

    pixel_embeddings (B, d, H, W); the query of a block is the mean of its pixels' embeddings
    (re-normalised when `normalize`); blocks without a valid pixel (`valid` (B, H, W)) are not
    searched (their rows are 0). Returns (B, H, W, m) int64, each pixel's block's m nearest classes,
    or with `expand=False` (B, ceil(H / block), ceil(W / block), m), one row per block."""
    B, d, H, W = pixel_embeddings.shape
    with section(SEARCH):
        means = F.avg_pool2d(pixel_embeddings.detach(), block, block, ceil_mode=True)  # (B, d, H', W')
        if normalize:
            means = F.normalize(means, dim=1)
        h, w = means.shape[-2:]
        queries = means.permute(0, 2, 3, 1).reshape(-1, d)  # (B H' W', d)
        out = torch.zeros((B * h * w, m), dtype=torch.int64, device=queries.device)
        if valid is None:
            searched = torch.ones(B * h * w, dtype=torch.bool, device=queries.device)
        else:
            searched = F.max_pool2d(valid[:, None].float(), block, block, ceil_mode=True).reshape(-1) > 0
        if bool(searched.any()):
            out[searched] = nearest_classes(queries[searched], class_embeddings, m, budget_bytes=budget_bytes,
                                            backend=backend, index=index)
        out = out.view(B, h, w, m)
        if not expand:
            return out
        return out.repeat_interleave(block, dim=1)[:, :H].repeat_interleave(block, dim=2)[:, :, :W]


def dense_logits_fit(pixels: int, num_classes: int, element_size: int, budget_bytes: int) -> bool:
    """Whether the logits of every pixel against every class (and their gradient) fit a quarter of
    the budget: then one matmul gives them all, cheaper than gathering k + 1 class vectors per pixel."""
    return pixels * num_classes * element_size * 4 <= budget_bytes


def block_knn_cross_entropy(
    pixel_embeddings: torch.Tensor, class_embeddings: torch.Tensor, target: torch.Tensor, k: int, block: int,
    tau: float = 0.05, ignore_index: int = DEFAULT_IGNORE_INDEX, distance: str = "squared", *,
    normalize: bool = True, budget_bytes: int = DEFAULT_BUDGET_BYTES, backend: str = "torch", index=None,
) -> torch.Tensor:
    """ESS Eq. 6 with one search per `block` x `block` block of pixels, shared by its pixels.

    pixel_embeddings (B, d, H, W), targets (B, H, W). Equal to `knn_cross_entropy` with
    `candidates=block_candidates(...)`, computed block by block: the block's k + 1 candidates are
    gathered once (not once per pixel), each pixel's logits against them come from one batched matmul,
    and the candidate equal to a pixel's target (else the last one) is masked out of its softmax.
    Gathers (blocks x (k + 1) + pixels) class vectors instead of pixels x (k + 1)."""
    check_distance(distance)
    B, d, H, W = pixel_embeddings.shape
    C = class_embeddings.shape[0]
    if not 1 <= k < C:
        raise ValueError(f"k = {k} negatives need 1 <= k <= C - 1 = {C - 1}")
    dtype = _work_dtype(pixel_embeddings, class_embeddings)
    valid = target != ignore_index
    if not bool(valid.any()):
        return pixel_embeddings.sum() * 0.0 + class_embeddings.sum() * 0.0
    bad = valid & ((target < 0) | (target >= C))
    if bool(bad.any()):
        raise ValueError(f"target value {int(target[bad][0])} is neither a class (0..{C - 1}) nor ignore_index {ignore_index}")
    s = block
    E = class_embeddings.to(dtype)
    with torch.no_grad():
        cand = block_candidates(pixel_embeddings, E, k + 1, s, valid=valid, normalize=normalize,
                                budget_bytes=budget_bytes, backend=backend, index=index, expand=False)  # (B, H', W', k+1)
    h, w = cand.shape[1:3]
    pad = (0, w * s - W, 0, h * s - H)
    x = F.pad(pixel_embeddings.to(dtype), pad)  # (B, d, H' s, W' s)
    x = x.view(B, d, h, s, w, s).permute(0, 2, 4, 3, 5, 1).reshape(B * h * w, s * s, d)  # (blocks, s^2, d)
    t = F.pad(torch.where(valid, target, -1), pad, value=-1).view(B, h, s, w, s).permute(0, 1, 3, 2, 4)
    t = t.reshape(B * h * w, s * s)  # (blocks, s^2), -1: ignored or padding
    used = (t >= 0).any(dim=1)
    x, t, cand = x[used], t[used], cand.reshape(B * h * w, k + 1)[used]
    keep = t >= 0
    x_sq = x.pow(2).sum(2, keepdim=True)  # (v, s^2, 1)
    safe_t = t.clamp(min=0)
    # the blocks' candidates (once per block) and each pixel's target in one gather: one (C, d) gradient
    rows = E.index_select(0, torch.cat([cand.reshape(-1), safe_t.reshape(-1)]))
    mu = rows[: cand.numel()].view(cand.shape[0], k + 1, d)  # (v, k+1, d)
    mu_t = rows[cand.numel():].view(*t.shape, d)  # (v, s^2, d)
    sq = torch.baddbmm(x_sq + mu.pow(2).sum(2).unsqueeze(1), x, mu.transpose(1, 2), alpha=-2.0)  # (v, s^2, k+1)
    sq_t = (x - mu_t).pow(2).sum(2, keepdim=True)  # (v, s^2, 1)
    logits = logits_from_squared(torch.cat([sq_t, sq.clamp_min(0.0)], dim=2), tau, distance)  # (v, s^2, k+2)
    with torch.no_grad():  # drop the candidate that is the pixel's target, else the last: k negatives remain
        drop = cand[:, None, :] == t[:, :, None]  # (v, s^2, k+1)
        drop[..., -1] |= ~drop.any(dim=2)
    logits = logits.masked_fill(F.pad(drop, (1, 0)), -float("inf"))
    picked = logits[keep]  # (n, k+2)
    return F.cross_entropy(picked, torch.zeros(picked.shape[0], dtype=torch.int64, device=picked.device))


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


def _candidate_logits(x: torch.Tensor, E: torch.Tensor, candidates: torch.Tensor, tau: float,
                      distance: str) -> torch.Tensor:
    """Logits (n, m) of each pixel x (n, d) against its candidate classes (n, m) of E (C, d).
    Squared distance through ||x||^2 + ||mu||^2 - 2 x.mu (one batched matmul, no (n, m, d)
    difference tensor); the euclidean one from the differences (its square root needs them exact)."""
    mu = E[candidates]  # (n, m, d)
    if distance != "squared":
        return paired_logits(x, mu, tau, distance)
    sq = torch.baddbmm((squared_norms(E)[candidates] + x.pow(2).sum(1, keepdim=True)).unsqueeze(2),
                       mu, x.unsqueeze(2), alpha=-2.0).squeeze(2)  # (n, m)
    return logits_from_squared(sq.clamp_min(0.0), tau, distance)


def knn_cross_entropy(
    pixel_embeddings: torch.Tensor,
    class_embeddings: torch.Tensor,
    target: torch.Tensor,
    k: int,
    tau: float = 0.05,
    ignore_index: int = DEFAULT_IGNORE_INDEX,
    negatives: str = "nearest",
    distance: str = "squared",
    *,
    budget_bytes: int = DEFAULT_BUDGET_BYTES,
    backend: str = "torch",
    generator: torch.Generator | None = None,
    candidates: torch.Tensor | None = None,
    index=None,
) -> torch.Tensor:
    """ESS Eq. 6 for pixel embeddings (N, d), class embeddings (C, d) and targets (N,).

    `candidates` (N, m >= k + 1), optional: each pixel's candidate classes (e.g. `block_candidates`),
    from which its negatives are the first k that are not its target, instead of its own search.
    `index`: a built `ClassIndex`, for an approximate search. Mean over the non-ignored pixels; 0 with
    zero gradient when there are none. float64 inputs are computed in float64, others in float32."""
    check_distance(distance)
    if negatives not in ("nearest", "random"):
        raise ValueError(f"negatives must be 'nearest' or 'random', got {negatives!r}")
    num_classes = class_embeddings.shape[0]
    if not 1 <= k < num_classes:
        raise ValueError(f"k = {k} negatives need 1 <= k <= C - 1 = {num_classes - 1}")
    dtype = _work_dtype(pixel_embeddings, class_embeddings)
    valid = target != ignore_index
    x = pixel_embeddings[valid].to(dtype)  # (n, d): ignored pixels never reach the search
    t = target[valid]
    if x.shape[0] == 0:
        return pixel_embeddings.sum() * 0.0 + class_embeddings.sum() * 0.0
    if bool(((t < 0) | (t >= num_classes)).any()):
        bad = int(t[(t < 0) | (t >= num_classes)][0])
        raise ValueError(f"target value {bad} is neither a class (0..{num_classes - 1}) nor ignore_index {ignore_index}")
    E = class_embeddings.to(dtype)
    n = x.shape[0]
    dense = dense_logits_fit(n, num_classes, x.element_size(), budget_bytes)
    if dense:  # few classes: every logit from one matmul, the search a top-k of the same matrix
        sq = torch.addmm(squared_norms(E)[None, :] + x.pow(2).sum(1, keepdim=True), x, E.T, alpha=-2.0)
        all_logits = logits_from_squared(sq.clamp_min(0.0), tau, distance)  # (n, C)
    with torch.no_grad():
        if candidates is not None:
            neg = negatives_from_candidates(candidates[valid], t, k)
        elif negatives == "random":
            neg = random_negatives(t, num_classes, k, generator)
        elif dense and index is None:
            with section(SEARCH):
                found = all_logits.detach().topk(k + 1, dim=1, sorted=True).indices  # largest logit = nearest
            neg = negatives_from_candidates(found, t, k)
        else:
            neg = nearest_negatives(x, E, t, k, budget_bytes, backend, index)
    chosen = torch.cat([t[:, None], neg], dim=1)  # (n, k+1), the target first
    logits = all_logits.gather(1, chosen) if dense else _candidate_logits(x, E, chosen, tau, distance)
    return F.cross_entropy(logits, torch.zeros_like(t))
