"""Nearest-class search: the exact k nearest class embeddings of each query, in bounded memory.

ESS needs, for every pixel embedding, its k nearest class embeddings (hard negatives, Eq. 6) and,
at inference, its nearest one (the prediction). A full N x C distance matrix is exactly what ESS
avoids, so the search walks the (queries x classes) grid in tiles whose size is set by a byte
budget, keeping a running top-k per query:

    dist(q, c) ~ ||c||^2 - 2 q.c          (||q||^2 is the same for all c: it cannot change the order)

Peak extra memory is about `budget_bytes` whatever N and C. The optional FAISS backend
(`pip install 'scaleseg[faiss]'`; GPU FAISS where installed) returns the same neighbours.
"""

from __future__ import annotations

import torch

DEFAULT_BUDGET_BYTES = 256 * 2**20
# bytes per cell of a (queries x classes) tile: the distance tile, the concatenation with the
# running best values for the merge, and top-k's working copy (float32 each)
_BYTES_PER_CELL = 12
_QUERY_TILE = 1024


def _check(queries: torch.Tensor, class_embeddings: torch.Tensor, k: int) -> None:
    if queries.dim() != 2 or class_embeddings.dim() != 2 or queries.shape[1] != class_embeddings.shape[1]:
        raise ValueError(
            f"nearest_classes needs queries (N, d) and class_embeddings (C, d); got {tuple(queries.shape)} "
            f"and {tuple(class_embeddings.shape)}"
        )
    if not 1 <= k <= class_embeddings.shape[0]:
        raise ValueError(f"k = {k} must be between 1 and the number of classes ({class_embeddings.shape[0]})")


def tile_shape(num_queries: int, num_classes: int, k: int, budget_bytes: int) -> tuple[int, int]:
    """(query rows, class columns) of one tile within the budget: all classes at once when that
    leaves room for a reasonable number of queries, otherwise query tiles of 1024 rows."""
    cells = max(budget_bytes // _BYTES_PER_CELL, 1)
    if num_classes * min(num_queries, _QUERY_TILE) <= cells:
        return max(1, min(num_queries, cells // num_classes)), num_classes
    rows = max(1, min(num_queries, _QUERY_TILE, cells // max(k + 1, 1)))
    return rows, max(1, min(num_classes, cells // rows - k))


@torch.no_grad()
def nearest_classes(
    queries: torch.Tensor,
    class_embeddings: torch.Tensor,
    k: int,
    *,
    budget_bytes: int = DEFAULT_BUDGET_BYTES,
    backend: str = "torch",
) -> torch.Tensor:
    """Indices (N, k) int64 of the k nearest rows of `class_embeddings` (C, d) to each row of
    `queries` (N, d) by L2 distance, nearest first. Exact; no gradient; memory bounded by
    `budget_bytes` (torch backend) whatever N and C."""
    _check(queries, class_embeddings, k)
    if backend == "faiss":
        return _faiss_nearest(queries, class_embeddings, k, budget_bytes)
    if backend != "torch":
        raise ValueError(f"unknown search backend {backend!r}; use 'torch' or 'faiss'")
    q = queries.detach().float()
    c = class_embeddings.detach().float()
    n, C = q.shape[0], c.shape[0]
    out = torch.empty((n, k), dtype=torch.int64, device=q.device)
    if n == 0:
        return out
    rows, cols = tile_shape(n, C, k, budget_bytes)
    c_sq = c.pow(2).sum(1)  # (C,)
    for r0 in range(0, n, rows):
        q_tile = q[r0 : r0 + rows]  # (r, d)
        best_val = best_idx = None
        for c0 in range(0, C, cols):
            dist = torch.addmm(c_sq[c0 : c0 + cols], q_tile, c[c0 : c0 + cols].T, alpha=-2.0)  # (r, cols)
            if best_val is None:
                kk = min(k, dist.shape[1])
                best_val, best_idx = dist.topk(kk, dim=1, largest=False, sorted=True)
                continue
            # merge the running best with this tile: positions < kk are old, the rest new
            merged = torch.cat([best_val, dist], dim=1)
            kk = min(k, merged.shape[1])
            best_val, pos = merged.topk(kk, dim=1, largest=False, sorted=True)
            old = best_idx.gather(1, pos.clamp(max=best_idx.shape[1] - 1))
            best_idx = torch.where(pos < best_idx.shape[1], old, pos - best_idx.shape[1] + c0)
        out[r0 : r0 + rows] = best_idx
    return out


def _faiss_nearest(queries: torch.Tensor, class_embeddings: torch.Tensor, k: int, budget_bytes: int) -> torch.Tensor:
    try:
        import faiss
    except ImportError:
        raise ImportError("the FAISS search backend needs faiss: pip install 'scaleseg[faiss]' (or faiss-gpu)") from None
    import numpy as np

    device = queries.device
    c = np.ascontiguousarray(class_embeddings.detach().float().cpu().numpy())
    index = faiss.IndexFlatL2(c.shape[1])
    if device.type == "cuda" and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
        index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), device.index or 0, index)
    index.add(c)
    n = queries.shape[0]
    out = torch.empty((n, k), dtype=torch.int64)
    rows = max(1, budget_bytes // (4 * (c.shape[0] + c.shape[1] + k)))  # FAISS tiles internally too
    for r0 in range(0, n, rows):
        q = np.ascontiguousarray(queries[r0 : r0 + rows].detach().float().cpu().numpy())
        _, idx = index.search(q, k)
        out[r0 : r0 + rows] = torch.from_numpy(idx)
    return out.to(device)


def nearest_class(
    queries: torch.Tensor,
    class_embeddings: torch.Tensor,
    *,
    budget_bytes: int = DEFAULT_BUDGET_BYTES,
    chunk_classes: int | None = None,
) -> torch.Tensor:
    """Index (N,) int64 of the nearest row of `class_embeddings` (C, d) to each row of `queries` (N, d)
    by L2 distance; exact ties go to the lower class id. No gradient.

    The prediction of the embedding scorer, in eval and in the ONNX export alike: the classes are walked
    in chunks of `chunk_classes` (default: as many as the budget allows for 1024 queries) with a running
    minimum, the queries in tiles of `budget_bytes`. Under `torch.export` the queries are one tile (their
    number is symbolic), so the graph's peak is N x chunk_classes x 4 bytes, whatever C."""
    _check(queries, class_embeddings, 1)
    with torch.no_grad():
        q = queries.detach().float()
        c = class_embeddings.detach().float()
        C = c.shape[0]
        cols = chunk_classes or max(1, min(C, budget_bytes // (_BYTES_PER_CELL * _QUERY_TILE)))
        c_sq = c.pow(2).sum(1)  # (C,); ||q||^2 is the same for every class: it cannot change the order
        if torch.compiler.is_exporting():
            return _nearest_class_tile(q, c, c_sq, cols)
        rows = max(1, budget_bytes // (_BYTES_PER_CELL * cols))
        out = torch.empty(q.shape[0], dtype=torch.int64, device=q.device)
        for r0 in range(0, q.shape[0], rows):
            out[r0 : r0 + rows] = _nearest_class_tile(q[r0 : r0 + rows], c, c_sq, cols)
        return out


def _nearest_class_tile(q: torch.Tensor, c: torch.Tensor, c_sq: torch.Tensor, cols: int) -> torch.Tensor:
    """(n,) nearest class of each query, class chunk by class chunk; a later chunk wins only if strictly
    nearer, and within a chunk argmin keeps the first minimum: ties go to the lower class id."""
    best_val = best_idx = None
    for c0 in range(0, c.shape[0], cols):
        dist = torch.addmm(c_sq[c0 : c0 + cols], q, c[c0 : c0 + cols].T, alpha=-2.0)  # (n, chunk)
        val, idx = dist.min(dim=1)
        if best_val is None:
            best_val, best_idx = val, idx
            continue
        better = val < best_val
        best_val = torch.where(better, val, best_val)
        best_idx = torch.where(better, idx + c0, best_idx)
    return best_idx
