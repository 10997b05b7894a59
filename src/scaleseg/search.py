"""Nearest-class search: the k nearest class embeddings of each query, in bounded memory.

ESS needs, for every pixel embedding, its k nearest class embeddings (the hard negatives of ESS
Eq. 6), for every class its nearest other class (the max-margin regulariser, ESS Eq. 7) and, at
inference, each pixel's nearest class (the prediction). A full N x C distance matrix is exactly
what ESS avoids, so every search here works in tiles whose size is set by a byte budget:

    dist(q, c) ~ ||c||^2 - 2 q.c          (||q||^2 is the same for all c: it cannot change the order)

Exact search (`nearest_classes`, the torch backend), on distance tiles (one `addmm` each, sized
to stay in cache). The k nearest of a query lie in the k groups of `_GROUP` consecutive classes
with the smallest group minima (each minimum is a real distance, so the k-th smallest of them
bounds the k-th nearest from above), so the selection never sorts a whole row:
 * up to `_TWO_PASS_CLASSES` classes, per tile: the group minima (a vectorised `amin`), a top-k
   over the k best groups' entries, then one merge of the tiles' k nearest;
 * beyond, in two passes: the group minima of all classes first (one float per 64 classes and
   query), then the k best groups' classes re-scored, once per query.
The cost is the matmul plus one pass over its output, instead of a top-k over every tile and a
running merge (`scaleseg bench speed` measures both against a large `torch.mm`).
The FAISS backend (`pip install 'scaleseg[faiss]'`; GPU FAISS where installed) calls
`IndexFlatIP` on large query blocks (FAISS tiles 4096 queries at a time internally) with the
exact L2 order ([q, 1] . [c, -||c||^2 / 2]).

Approximate search (`ClassIndex`, ESS supplementary C's "clustering the class embeddings"): k-means
clusters (inverted lists) of the class table, refreshed as the table learns; a query scores only
the classes of its `probes` nearest clusters, with their current embeddings. `index_recall`
measures how many of the exact k nearest it returns.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from scaleseg.profiling import INDEX, section

DEFAULT_BUDGET_BYTES = 256 * 2**20
# bytes per cell of a (queries x classes) tile: the distance tile, its group minima, and the
# re-scored candidates (float32 each), with slack
_BYTES_PER_CELL = 12
_QUERY_TILE = 1024
_CLASS_TILE = 4096
_TILE_CELLS = 1024 * 4096  # cells of a distance tile: 16 MiB of float32, within this machine's L3
_GROUP = 64  # classes per group whose minimum decides whether its classes are looked at
_TWO_PASS_CLASSES = 16384  # from this many classes on: group minima of all classes first, then re-scoring
_FAISS_BLOCK = 65536  # queries per FAISS call (>= its internal 4096-query block)
_ROWS = 16384  # classes per chunk where a per-class distance to the anchors is computed


def _check(queries: torch.Tensor, class_embeddings: torch.Tensor, k: int) -> None:
    if queries.dim() != 2 or class_embeddings.dim() != 2 or queries.shape[1] != class_embeddings.shape[1]:
        raise ValueError(
            f"nearest_classes needs queries (N, d) and class_embeddings (C, d); got {tuple(queries.shape)} "
            f"and {tuple(class_embeddings.shape)}"
        )
    if not 1 <= k <= class_embeddings.shape[0]:
        raise ValueError(f"k = {k} must be between 1 and the number of classes ({class_embeddings.shape[0]})")


def _work_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 where any input is float64 (gradient checks), float32 otherwise (also for bf16/fp16)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def in_work_dtype(t: torch.Tensor) -> torch.Tensor:
    """t in float32, or kept in float64 (where .float() would round a float64 model's numbers)."""
    return t.to(_work_dtype(t))


def tile_shape(num_queries: int, num_classes: int, k: int, budget_bytes: int) -> tuple[int, int]:
    """(query rows, class columns) of one distance tile: about `_TILE_CELLS` cells (a tile that stays
    in cache), at most `_CLASS_TILE` classes wide, and rows x (cols + k) x 12 bytes <= budget_bytes."""
    cells = max(budget_bytes // _BYTES_PER_CELL, 1)
    cols = max(1, min(num_classes, _CLASS_TILE, cells // (2 * k + 2)))
    rows = max(1, min(num_queries, cells // (cols + k), max(1, _TILE_CELLS // cols)))
    return rows, cols


@torch.no_grad()
def nearest_classes(
    queries: torch.Tensor,
    class_embeddings: torch.Tensor,
    k: int,
    *,
    budget_bytes: int = DEFAULT_BUDGET_BYTES,
    backend: str = "torch",
    index: "ClassIndex | None" = None,
) -> torch.Tensor:
    """Indices (N, k) int64 of the k nearest rows of `class_embeddings` (C, d) to each row of
    `queries` (N, d) by L2 distance, nearest first. No gradient; memory bounded by `budget_bytes`
    (torch backend) whatever N and C. Exact, unless `index` (a built `ClassIndex` over these
    classes) is given: then approximate, searching its nearest clusters only."""
    _check(queries, class_embeddings, k)
    if index is not None and index.is_built():
        return index.search(queries, class_embeddings, k, budget_bytes=budget_bytes, backend=backend)
    if backend == "faiss":
        return _faiss_nearest(queries, class_embeddings, k)
    if backend != "torch":
        raise ValueError(f"unknown search backend {backend!r}; use 'torch' or 'faiss'")
    dtype = _work_dtype(queries, class_embeddings)
    return _exact_torch(queries.detach().to(dtype), class_embeddings.detach().to(dtype), k, budget_bytes)


def _exact_torch(q: torch.Tensor, c: torch.Tensor, k: int, budget_bytes: int) -> torch.Tensor:
    n, C = q.shape[0], c.shape[0]
    out = torch.empty((n, k), dtype=torch.int64, device=q.device)
    if n == 0:
        return out
    if C > _TWO_PASS_CLASSES:
        return _exact_two_pass(q, c, k, budget_bytes, out)
    c_sq = c.pow(2).sum(1)  # (C,)
    rows, cols = tile_shape(n, C, k, budget_bytes)
    tiles = -(-C // cols)
    for r0 in range(0, n, rows):
        qt = q[r0 : r0 + rows]  # (r, d)
        found_val, found_idx = [], []
        for c0 in range(0, C, cols):
            dist = torch.addmm(c_sq[c0 : c0 + cols], qt, c[c0 : c0 + cols].T, alpha=-2.0)  # (r, w)
            val, idx = _tile_topk(dist, k)
            found_val.append(val)
            found_idx.append(idx + c0 if c0 else idx)
        val = found_val[0] if tiles == 1 else torch.cat(found_val, dim=1)  # the tiles' k nearest
        idx = found_idx[0] if tiles == 1 else torch.cat(found_idx, dim=1)
        out[r0 : r0 + rows] = idx.gather(1, val.topk(k, dim=1, largest=False, sorted=True).indices)
    return out


def _tile_topk(dist: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k smallest entries (unsorted) of each row of a distance tile (r, w) and their columns.

    Wide tiles in two steps: the minimum of every group of `_GROUP` columns (a vectorised pass, no
    sorting), then a top-k over the k groups with the smallest minima only, which hold the row's k
    smallest entries (each group minimum is an entry, so the k-th smallest of them is an upper bound)."""
    r, w = dist.shape
    kk = min(k, w)
    if w <= 2 * k * _GROUP:
        return dist.topk(kk, dim=1, largest=False, sorted=False)
    if w % _GROUP:  # pad the last group with +inf
        dist = F.pad(dist, (0, _GROUP - w % _GROUP), value=math.inf)
    groups = dist.shape[1] // _GROUP
    best = dist.view(r, groups, _GROUP).amin(dim=2).topk(kk, dim=1, largest=False, sorted=False).indices  # (r, k)
    rows = (best + torch.arange(r, device=dist.device)[:, None] * groups).view(-1)  # the groups as rows of G
    vals = dist.view(r * groups, _GROUP).index_select(0, rows).view(r, kk * _GROUP)  # (r, k G)
    val, pos = vals.topk(kk, dim=1, largest=False, sorted=False)
    return val, best.gather(1, pos // _GROUP) * _GROUP + pos % _GROUP


def _exact_two_pass(q: torch.Tensor, c: torch.Tensor, k: int, budget_bytes: int, out: torch.Tensor) -> torch.Tensor:
    """Many classes: pass 1 keeps only the group minima of every tile, (r, C / G) per query tile;
    pass 2 re-scores the k groups with the smallest minima (k G classes per query), once."""
    n, C = q.shape[0], c.shape[0]
    c_sq = c.pow(2).sum(1)
    _, cols = tile_shape(n, C, k, budget_bytes)
    cols = max(_GROUP, cols - cols % _GROUP)  # whole groups per tile
    groups = -(-C // _GROUP)
    kg = min(k, groups)
    offsets = torch.arange(_GROUP, device=q.device)
    per_row = 4 * (2 * cols + groups + kg * _GROUP * (c.shape[1] + 3) + 3 * k)
    rows = max(1, min(n, _QUERY_TILE, budget_bytes // per_row))
    for r0 in range(0, n, rows):
        qt = q[r0 : r0 + rows]  # (r, d)
        r = qt.shape[0]
        minima = torch.empty((r, groups), dtype=q.dtype, device=q.device)  # (r, C / G)
        for c0 in range(0, C, cols):
            dist = torch.addmm(c_sq[c0 : c0 + cols], qt, c[c0 : c0 + cols].T, alpha=-2.0)  # (r, <= cols)
            width = dist.shape[1]
            if width % _GROUP:  # the last tile: pad its last group with +inf
                dist = F.pad(dist, (0, _GROUP - width % _GROUP), value=math.inf)
            g0 = c0 // _GROUP
            minima[:, g0 : g0 + dist.shape[1] // _GROUP] = dist.view(r, -1, _GROUP).amin(dim=2)
        best_groups = minima.topk(kg, dim=1, largest=False, sorted=False).indices  # (r, kg)
        ids = (best_groups[:, :, None] * _GROUP + offsets).view(r, -1)  # (r, kg * G)
        padding = ids >= C
        ids.clamp_(max=C - 1)
        flat = ids.view(-1)
        dist = torch.baddbmm(c_sq.index_select(0, flat).view(r, -1, 1), c.index_select(0, flat).view(r, -1, c.shape[1]),
                             qt.unsqueeze(2), alpha=-2.0).squeeze(2)  # (r, kg * G): pass 1's candidates re-scored
        dist.masked_fill_(padding, math.inf)
        pos = dist.topk(k, dim=1, largest=False, sorted=True).indices
        out[r0 : r0 + r] = ids.gather(1, pos)
    return out


def _faiss():
    try:
        import faiss
    except ImportError:
        raise ImportError("the FAISS search backend needs faiss: pip install 'scaleseg[faiss]' (or faiss-gpu)") from None
    return faiss


def _augmented(x, ones: bool):
    """Rows of x with one more column, so that FAISS's inner product gives the L2 order:
    queries [q, 1], classes [c, -||c||^2 / 2]  =>  [q, 1] . [c, -||c||^2/2] = q.c - ||c||^2 / 2."""
    import numpy as np

    x = x.detach().float().cpu()
    extra = torch.ones(x.shape[0], 1) if ones else -0.5 * x.pow(2).sum(1, keepdim=True)
    return np.ascontiguousarray(torch.cat([x, extra], dim=1).numpy())


def _faiss_nearest(queries: torch.Tensor, class_embeddings: torch.Tensor, k: int) -> torch.Tensor:
    """Exact search with FAISS's flat inner-product index, on query blocks of `_FAISS_BLOCK`."""
    faiss = _faiss()
    device = queries.device
    c = _augmented(class_embeddings, ones=False)
    index = faiss.IndexFlatIP(c.shape[1])
    if device.type == "cuda" and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
        index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), device.index or 0, index)
    index.add(c)
    n = queries.shape[0]
    out = torch.empty((n, k), dtype=torch.int64)
    for r0 in range(0, n, _FAISS_BLOCK):
        _, idx = index.search(_augmented(queries[r0 : r0 + _FAISS_BLOCK], ones=True), k)
        out[r0 : r0 + _FAISS_BLOCK] = torch.from_numpy(idx)
    return out.to(device)


# ------------------------------------------------------------------------------------------------
# k-means and the approximate class index


def auto_clusters(num_classes: int) -> int:
    """The default number of clusters of the class index: about sqrt(C) (FAISS's rule of thumb for
    an IVF index), so a query scores ~sqrt(C) centroids plus `probes` clusters of ~sqrt(C) classes."""
    return max(1, min(num_classes, round(math.sqrt(num_classes))))


@torch.no_grad()
def kmeans(
    points: torch.Tensor, num_clusters: int, iters: int, *, init: torch.Tensor | None = None,
    generator: torch.Generator | None = None, budget_bytes: int = DEFAULT_BUDGET_BYTES,
) -> torch.Tensor:
    """Lloyd's k-means of points (C, d): centroids (L, d). Starts from `init` (warm start) or from L
    distinct points drawn with `generator`; an empty cluster is re-seeded with a point drawn the
    same way. Each iteration is one exact nearest-centroid search (bounded memory)."""
    C, d = points.shape
    L = min(num_clusters, C)
    x = points.detach().to(_work_dtype(points))
    if init is None:
        centroids = x[torch.randperm(C, generator=generator, device="cpu")[:L].to(x.device)].clone()
    else:
        centroids = init.detach().to(x.dtype).clone()
    for _ in range(iters):
        assign = nearest_classes(x, centroids, 1, budget_bytes=budget_bytes)[:, 0]  # (C,)
        counts = torch.bincount(assign, minlength=L)
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        filled = counts > 0
        centroids[filled] = sums[filled] / counts[filled, None].to(x.dtype)
        empty = int((~filled).sum())
        if empty:
            centroids[~filled] = x[torch.randint(0, C, (empty,), generator=generator).to(x.device)]
    return centroids


class ClassIndex(nn.Module):
    """An approximate nearest-class index over the C x d class table (IVF: k-means clusters).

    State (buffers, so it is in every checkpoint and a resumed run searches exactly as an
    uninterrupted one would):
        centroids (L, d)     the cluster centres at the last refresh
        order (C,) int32     class ids sorted by cluster; cluster l holds order[offsets[l]:offsets[l+1]]
        offsets (L + 1,)     int64
        steps ()             training steps seen by `step` (0 = never built)
    `step(classes)` is called once per training step: it builds the index at the first step, refreshes
    the centroids every `refresh` steps (k-means warm-started from the current centroids, `refresh_iters`
    Lloyd iterations, then every class re-assigned) and in between keeps every class in the list of its
    nearest current centroid every `reassign` steps (`assign`: exact, searching only the classes that
    moved beyond their slack; no centroid update). The re-assignment is
    what keeps the index's recall: the classes that move are the ones the pixels are near (targets and
    hard negatives), and a class left in the cluster of an old position is missed by the queries that are
    now near it, which then never push it away (with `reassign` = `refresh` = 100 the recall of the k + 1
    nearest on the training pixels fell from 75% to under 5% within 50 steps and the built-in run lost
    nearly all its accuracy; docs/benchmarks.md). Scoring always uses the classes' current embeddings.
    `search` scores the classes of each query's `probes` nearest clusters and returns the k nearest
    among them; queries whose probed clusters hold fewer than k classes fall back to the exact search.
    """

    def __init__(self, num_classes: int, embed_dim: int, clusters: int = 0, probes: int = 8,
                 refresh: int = 100, build_iters: int = 10, refresh_iters: int = 1, seed: int = 0,
                 reassign: int = 1) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.num_clusters = clusters or auto_clusters(num_classes)
        self.probes = min(probes, self.num_clusters)
        self.refresh, self.build_iters, self.refresh_iters, self.seed = refresh, build_iters, refresh_iters, seed
        self.reassign = reassign
        self.register_buffer("centroids", torch.zeros(self.num_clusters, embed_dim))
        self.register_buffer("order", torch.zeros(num_classes, dtype=torch.int32))
        self.register_buffer("offsets", torch.zeros(self.num_clusters + 1, dtype=torch.int64))
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64))
        # Not in checkpoints (derived; rebuilt by the first re-assignment after a resume): each class's
        # cluster, its embedding when it was assigned (the anchor), and its slack, half the gap between its
        # distances to its nearest and second-nearest centroid. While a class stays within its slack of
        # its anchor its nearest centroid cannot change (triangle inequality), so only the classes that
        # moved further are searched again. A slack of -inf: never assigned. Fixed shapes, so a training
        # step's buffer restore (a skipped step) applies to them like to any buffer.
        self.register_buffer("assigned", torch.zeros(num_classes, dtype=torch.int64), persistent=False)
        self.register_buffer("anchors", torch.zeros(num_classes, embed_dim), persistent=False)
        self.register_buffer("slack", torch.full((num_classes,), -math.inf), persistent=False)

    def extra_repr(self) -> str:
        return (f"classes={self.num_classes}, clusters={self.num_clusters}, probes={self.probes}, "
                f"refresh={self.refresh}, reassign={self.reassign}")

    def is_built(self) -> bool:
        return int(self.offsets[-1]) == self.num_classes

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.reset_derived_state()  # loaded lists

    @torch.no_grad()
    def reset_derived_state(self) -> None:
        """The lists changed under the assignment state (a load, an undone training step): it is rebuilt
        from the table at the next re-assignment, which then searches every class."""
        self.slack.fill_(-math.inf)

    @torch.no_grad()
    def step(self, classes: torch.Tensor, budget_bytes: int = DEFAULT_BUDGET_BYTES) -> bool:
        """Count one training step; build or refresh the index when due, else re-assign the classes to
        the centroids when due. Returns whether it refreshed (k-means)."""
        due = not self.is_built() or int(self.steps) % self.refresh == 0
        if due:
            self.rebuild(classes, budget_bytes)
        elif int(self.steps) % self.reassign == 0:
            self.assign(classes, budget_bytes)
        self.steps += 1
        return due

    @torch.no_grad()
    def assign(self, classes: torch.Tensor, budget_bytes: int = DEFAULT_BUDGET_BYTES) -> int:
        """Every class to its nearest current centroid (the inverted lists; centroids unchanged). Exact,
        searching only the classes that moved beyond their slack since their last assignment (all of them
        the first time, e.g. after a resume). Returns how many classes were searched."""
        with section(INDEX):
            x = classes.detach().float()
            moved = torch.cat([(x[r0 : r0 + _ROWS] - self.anchors[r0 : r0 + _ROWS]).norm(dim=1)
                               for r0 in range(0, x.shape[0], _ROWS)])  # no (C, d) difference at once
            rows = torch.nonzero(moved >= self.slack)[:, 0]
            if rows.numel():
                self._assign_rows(x, rows, budget_bytes)
            return int(rows.numel())

    def _assign_rows(self, x: torch.Tensor, rows: torch.Tensor | None, budget_bytes: int) -> None:
        """Re-assign the classes `rows` (None: all) of the table x (C, d) to their nearest centroid."""
        part = x if rows is None else x.index_select(0, rows)
        two = min(2, self.num_clusters)
        near = nearest_classes(part, self.centroids, two, budget_bytes=budget_bytes)  # (n, 2), nearest first
        dist = (part[:, None, :] - self.centroids[near]).norm(dim=2)  # (n, 2)
        slack = (dist[:, 1] - dist[:, 0]) / 2 if two == 2 else torch.full_like(dist[:, 0], math.inf)
        if rows is None:
            before = None
            self.assigned.copy_(near[:, 0])
            self.anchors.copy_(part)
            self.slack.copy_(slack)
        else:  # never assigned (-inf slack, e.g. after a load) counts as changed
            before = torch.where(torch.isinf(self.slack.index_select(0, rows)), -1, self.assigned.index_select(0, rows))
            self.assigned.index_copy_(0, rows, near[:, 0])
            self.anchors.index_copy_(0, rows, part)
            self.slack.index_copy_(0, rows, slack)
        if before is None or bool((before != near[:, 0]).any()):
            self._fill_lists(self.assigned)

    def _fill_lists(self, assign: torch.Tensor) -> None:
        self.order.copy_(torch.argsort(assign, stable=True))
        self.offsets[1:] = torch.cumsum(torch.bincount(assign, minlength=self.num_clusters), 0)
        self.offsets[0] = 0

    @torch.no_grad()
    def rebuild(self, classes: torch.Tensor, budget_bytes: int = DEFAULT_BUDGET_BYTES) -> None:
        """k-means of the current class embeddings (C, d) and the inverted lists."""
        with section(INDEX):
            x = classes.detach().float()
            generator = torch.Generator().manual_seed(self.seed + int(self.steps))
            if self.is_built():
                centroids = kmeans(x, self.num_clusters, self.refresh_iters, init=self.centroids,
                                   generator=generator, budget_bytes=budget_bytes)
            else:  # first build: Lloyd on a sample of up to 64 points per cluster, then all points
                sample = x
                if x.shape[0] > 64 * self.num_clusters:
                    sample = x[torch.randperm(x.shape[0], generator=generator)[: 64 * self.num_clusters].to(x.device)]
                centroids = kmeans(sample, self.num_clusters, self.build_iters, generator=generator,
                                   budget_bytes=budget_bytes)
                centroids = kmeans(x, self.num_clusters, 1, init=centroids, generator=generator,
                                   budget_bytes=budget_bytes)
            self.centroids.copy_(centroids)
            self._assign_rows(x, None, budget_bytes)

    @torch.no_grad()
    def search(self, queries: torch.Tensor, classes: torch.Tensor, k: int, *,
               budget_bytes: int = DEFAULT_BUDGET_BYTES, backend: str = "torch", probes: int | None = None) -> torch.Tensor:
        """(N, k) int64: the k nearest classes of each query among its `probes` (default: the
        index's) nearest clusters, scored with the current `classes` (C, d), nearest first."""
        _check(queries, classes, k)
        if not self.is_built():
            raise RuntimeError("the class index is not built yet: call step() or rebuild() first")
        p = min(probes or self.probes, self.num_clusters)
        if backend == "faiss":
            return self._search_faiss(queries, classes, k, p)
        dtype = _work_dtype(queries, classes)
        q, c = queries.detach().to(dtype), classes.detach().to(dtype)
        n = q.shape[0]
        out = torch.empty((n, k), dtype=torch.int64, device=q.device)
        per_query = 4 * p * (6 * k + q.shape[1] + 2) + 4 * self.num_clusters  # pair results, grouped queries
        rows = max(1, min(n, budget_bytes // max(per_query, 1)))
        for r0 in range(0, n, rows):
            out[r0 : r0 + rows] = self._search_block(q[r0 : r0 + rows], c, k, p, budget_bytes)
        return out

    def _search_block(self, q: torch.Tensor, c: torch.Tensor, k: int, p: int, budget_bytes: int) -> torch.Tensor:
        n = q.shape[0]
        probe = nearest_classes(q, self.centroids.to(q.dtype), p, budget_bytes=budget_bytes)  # (n, p)
        flat = probe.reshape(-1)  # (n p,): the cluster of each (query, probe) pair
        pairs = torch.argsort(flat, stable=True)  # pair positions grouped by cluster
        grouped = q.index_select(0, pairs // p)  # (n p, d): the pairs' queries, cluster by cluster
        counts = torch.bincount(flat, minlength=self.num_clusters).tolist()
        offsets = self.offsets.tolist()
        order = self.order  # int32: positions in `order` -> class ids
        val = torch.full((n * p, k), math.inf, dtype=q.dtype, device=q.device)  # in grouped order
        pos = torch.zeros((n * p, k), dtype=torch.int64, device=q.device)  # positions in `order`
        start = 0
        for cluster, count in enumerate(counts):
            if not count:
                continue
            m0, m1 = offsets[cluster], offsets[cluster + 1]
            if m1 > m0:  # the cluster's classes gathered here, not the whole table in cluster order up front
                members = c.index_select(0, order[m0:m1])  # (m, d), current embeddings
                members_sq = members.pow(2).sum(1)
                dist = torch.addmm(members_sq, grouped[start : start + count], members.T, alpha=-2.0)
                kk = min(k, m1 - m0)
                v, i = _tile_topk(dist, k)  # (count, kk)
                val[start : start + count, :kk] = v
                pos[start : start + count, :kk] = i + m0
            start += count
        ungrouped_val = torch.empty_like(val)
        ungrouped_val[pairs] = val
        ungrouped_pos = torch.empty_like(pos)
        ungrouped_pos[pairs] = pos
        best, where = ungrouped_val.view(n, p * k).topk(k, dim=1, largest=False, sorted=True)
        ids = order[ungrouped_pos.view(n, p * k).gather(1, where)].long()
        short = torch.isinf(best[:, -1])  # fewer than k classes in the probed clusters
        if bool(short.any()):
            ids[short] = nearest_classes(q[short], c, k, budget_bytes=budget_bytes)
        return ids

    def _search_faiss(self, queries: torch.Tensor, classes: torch.Tensor, k: int, probes: int) -> torch.Tensor:
        """The same clusters in a FAISS `IndexIVFFlat` (L2) filled with the current embeddings."""
        faiss = _faiss()
        import numpy as np

        d = classes.shape[1]
        quantizer = faiss.IndexFlatL2(d)
        quantizer.add(np.ascontiguousarray(self.centroids.float().cpu().numpy()))
        index = faiss.IndexIVFFlat(quantizer, d, self.num_clusters, faiss.METRIC_L2)
        index.is_trained = True
        order = self.order.long().cpu()
        cluster_of = torch.repeat_interleave(torch.arange(self.num_clusters), torch.diff(self.offsets.cpu()))
        x = np.ascontiguousarray(classes.detach().float().cpu()[order].numpy())
        ids = np.ascontiguousarray(order.numpy().astype(np.int64))
        assign = np.ascontiguousarray(cluster_of.numpy().astype(np.int64))
        index.add_core(x.shape[0], faiss.swig_ptr(x), faiss.swig_ptr(ids), faiss.swig_ptr(assign))
        index.nprobe = probes
        n = queries.shape[0]
        out = torch.empty((n, k), dtype=torch.int64)
        for r0 in range(0, n, _FAISS_BLOCK):
            qb = np.ascontiguousarray(queries[r0 : r0 + _FAISS_BLOCK].detach().float().cpu().numpy())
            _, idx = index.search(qb, k)
            out[r0 : r0 + _FAISS_BLOCK] = torch.from_numpy(idx)
        short = (out < 0).any(dim=1)
        if bool(short.any()):
            out[short] = nearest_classes(queries[short].cpu(), classes.cpu(), k)
        return out.to(queries.device)


@torch.no_grad()
def index_recall(found: torch.Tensor, exact: torch.Tensor) -> float:
    """Recall of an approximate search: the fraction of the exact k nearest (N, k) that the
    approximate result (N, k) also holds, over all queries."""
    hits = (found.unsqueeze(2) == exact.unsqueeze(1)).any(dim=1)  # (N, k): exact neighbour j found?
    return float(hits.float().mean())


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
