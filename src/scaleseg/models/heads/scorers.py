"""Class scorers: how a pixel's feature vector meets the classes (DESIGN.md, "the one idea").

A scorer is the last 1x1 conv of the network plus everything that depends on how classes are
represented: the per-pixel objective, the dense map that inference averages over windows, scales
and flips, and the decision from that map to class ids. Structures (single level, pyramid) call the
`ClassScorer` methods (`models/heads/base.py`) and never look inside.
"""

from __future__ import annotations

import contextlib
import contextvars

import torch
import torch.nn.functional as F
from torch import nn

from scaleseg.losses.distances import unit_rows
from scaleseg.models.heads.base import ClassScorer
from scaleseg.profiling import LOSS, REGULARIZER, section
from scaleseg.search import in_work_dtype, nearest_class

# Training steps between measurements of the class index's recall (the k + 1 nearest of up to
# RECALL_PIXELS of the step's loss pixels, exact against the index), logged as `index_recall`; measured
# at steps 49, 99, ... (0-based), the last before each default refresh, where the index is stalest.
RECALL_INTERVAL = 50
RECALL_PIXELS = 1024
# True while inference decides a single view (no averaging over windows, scales or flips): dense
# maps then need not be averageable, and the linear scorer skips its softmax (engine/inference.py)
_ONE_VIEW = contextvars.ContextVar("scaleseg_one_view", default=False)


@contextlib.contextmanager
def deciding_one_view():
    """Within this context `dense` maps are decided as they are, never averaged: the linear
    scorer returns its logits (their argmax is the probabilities' argmax) without a softmax."""
    token = _ONE_VIEW.set(True)
    try:
        yield
    finally:
        _ONE_VIEW.reset(token)


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
        return {"ce": F.cross_entropy(in_work_dtype(scores), target, ignore_index=self.ignore_index)}

    def dense(self, scores: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) class probabilities, the map inference averages over views, computed in
        float32 straight into its output (no float copy of the logits first). When one view is
        decided (`deciding_one_view`), the logits themselves: no softmax, no copy."""
        if _ONE_VIEW.get():
            return scores
        return scores.softmax(dim=1, dtype=torch.float32)

    def decide(self, dense: torch.Tensor, chunk_classes: int | None = None) -> torch.Tensor:
        # (B, H, W): of probabilities or, for one view, of logits; ties: the first maximum, the lower class id
        return dense.argmax(dim=1)


class EmbeddingScorer(ClassScorer):
    """ESS: a d-channel pixel embedding against a learned C x d class-embedding table.

    Both are L2-normalised (unless `normalize=False`, the paper's ablation). Training loss: the
    kNN-approximated cross-entropy (ESS Eq. 6) or the exact one over all classes (both in bounded
    memory), plus `margin_weight` x the max-margin regulariser (ESS Eq. 7). Prediction: the nearest
    class embedding, searched in chunks. Memory is O(d) per pixel: nothing of size C x H x W.

    Cheaper hard negatives (ESS supplementary C): `search_block` s > 1 searches once per s x s block
    of loss pixels (their mean embedding) and shares the candidates; `search_index` "ivf" (or
    "auto" from `index_min_classes` classes on) searches an approximate k-means index of the table.
    State derived from the class table, in buffers (so in checkpoints; resumes stay exact):
    `class_index` (a `scaleseg.search.ClassIndex`, or None) and `margin_cache` (a
    `scaleseg.losses.MarginCache`, or None without regulariser), each with its own step counter
    advanced by the training-mode regularising loss call (once per step of a single or pyramid head).
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
        search_block: int = 1,
        search_index: str = "exact",
        index_min_classes: int = 50_000,
        index_clusters: int = 0,
        index_probes: int = 8,
        index_refresh: int = 100,
        index_reassign: int = 1,
        margin_refresh: int = 100,
        margin_candidates: int = 1,
        full_implementation: str = "auto",
        table: str = "free",
    ) -> None:
        from scaleseg.losses.margin import MarginCache
        from scaleseg.search import ClassIndex

        super().__init__()
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.k, self.tau, self.margin, self.margin_weight = num_neighbours, temperature, margin, margin_weight
        self.negatives, self.distance, self.loss_kind, self.normalize = negatives, distance, loss, normalize
        self.search = {"budget_bytes": search_budget_bytes, "backend": search_backend}
        self.search_block, self.full_implementation = search_block, full_implementation
        self.embed = nn.Conv2d(in_channels, embed_dim, kernel_size=1)  # pixel embeddings, with bias as published
        if table not in ("free", "sphere"):
            raise ValueError(f"table = {table!r}: use 'free' (as published) or 'sphere'")
        if table == "sphere" and not normalize:
            raise ValueError("table = 'sphere' needs normalize = True (the rows are compared as unit vectors)")
        self.table = table
        rows = torch.empty(num_classes, embed_dim)
        # free: as published, uniform(-1, 1) (||row||^2 ~ d / 3); sphere: uniform on the unit sphere
        rows = F.normalize(rows.normal_(), dim=1) if table == "sphere" else rows.uniform_(-1.0, 1.0)
        self.class_embeddings = nn.Parameter(rows)  # (C, d)
        # State derived from the class table, kept in checkpoints (see their classes): the approximate
        # class index (search_index ivf, or auto from index_min_classes classes on), for the kNN loss's
        # nearest negatives and the regulariser's refreshes, and the margin cache
        use_index = search_index == "ivf" or (search_index == "auto" and num_classes >= index_min_classes)
        searches = (loss == "knn" and negatives == "nearest") or margin_weight > 0
        self.class_index = (ClassIndex(num_classes, embed_dim, index_clusters, index_probes, index_refresh,
                                       reassign=index_reassign) if use_index and searches else None)
        self.margin_cache = MarginCache(num_classes, margin_refresh, margin_candidates) if margin_weight > 0 else None

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.embed(features)  # (B, d, h, w), normalised where used (after any resize)

    def _unit(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        x = in_work_dtype(x)
        return F.normalize(x, dim=dim) if self.normalize else x

    def classes(self) -> torch.Tensor:
        table = in_work_dtype(self.class_embeddings)
        return unit_rows(table) if self.normalize else table  # (C, d)

    def class_table(self, raw: bool = False) -> torch.Tensor:
        return self.class_embeddings if raw else self.classes()

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        """table = sphere: every row back to unit norm (the retraction of Riemannian SGD on the sphere).
        The rows compared, u = e / ||e||, are unchanged by it; what it fixes is the next step's size: the
        gradient through the normalisation is (I - u u^T) dL/du / ||e||, so on unit rows a step of lr
        turns u by lr x the tangent gradient, where a free row turns by that over ||e||^2 (d / 3 at the
        published init, 10.7 at d = 32) and slower still as the raw norm grows. Weight decay, purely
        radial on a row, is undone by it. table = free: nothing."""
        if self.table == "sphere":
            self.class_embeddings.copy_(F.normalize(self.class_embeddings, dim=1))

    def loss(self, scores: torch.Tensor, target: torch.Tensor, regularize: bool = True) -> dict[str, torch.Tensor]:
        from scaleseg.losses import block_candidates, full_cross_entropy, knn_cross_entropy
        from scaleseg.losses.knn_ce import block_knn_cross_entropy, dense_logits_fit

        training = self.training and torch.is_grad_enabled()  # only training steps advance the cached state
        with section(LOSS):
            d = scores.shape[1]
            x_map = self._unit(scores, dim=1)  # (B, d, H, W)
            x = x_map.permute(0, 2, 3, 1).reshape(-1, d)  # (B*H*W, d)
            t = target.reshape(-1)
            E = self.classes()
            index = self._class_index(E, step=training and regularize)
            if index is not None and training and regularize and int(index.steps) % RECALL_INTERVAL == 0:
                self._measure_recall(x, t, E, index)
            blocks = self.loss_kind == "knn" and self.negatives == "nearest" and self.search_block > 1
            if blocks and not dense_logits_fit(x.shape[0], E.shape[0], 4, self.search["budget_bytes"]):
                # one search per block of pixels, its candidates gathered once per block
                ce = block_knn_cross_entropy(x_map, E, target, self.k, self.search_block, self.tau, self.ignore_index,
                                             self.distance, normalize=self.normalize, index=index, **self.search)
            elif self.loss_kind == "knn":
                candidates = None
                if blocks:  # few classes: every logit from one matmul, the blocks' candidates picked from them
                    candidates = block_candidates(
                        x_map, E, self.k + 1, self.search_block, valid=target != self.ignore_index,
                        normalize=self.normalize, index=index, **self.search,
                    ).reshape(-1, self.k + 1)
                ce = knn_cross_entropy(
                    x, E, t, self.k, self.tau, self.ignore_index, self.negatives, self.distance,
                    budget_bytes=self.search["budget_bytes"], backend=self.search["backend"],
                    candidates=candidates, index=index,
                )
            else:
                ce = full_cross_entropy(x, E, t, self.tau, self.ignore_index, self.distance,
                                        budget_bytes=self.search["budget_bytes"], implementation=self.full_implementation)
        terms = {"ce": ce}
        if regularize and self.margin_cache is not None:
            with section(REGULARIZER):  # ESS Eq. 7 on the cached nearest other classes
                terms["margin"] = self.margin_weight * self.margin_cache(
                    E, self.margin, training=training, index=index, **self.search)
        return terms

    @torch.no_grad()
    def _measure_recall(self, x: torch.Tensor, t: torch.Tensor, E: torch.Tensor, index) -> None:
        """The index's recall of the exact k + 1 nearest classes on (up to RECALL_PIXELS, evenly spaced)
        of this step's loss pixels, in percent (`training_stats`)."""
        from scaleseg.search import index_recall, nearest_classes

        x = x[t != self.ignore_index]
        if x.shape[0] == 0:
            return
        q = x[torch.linspace(0, x.shape[0] - 1, min(RECALL_PIXELS, x.shape[0]), device=x.device).long()].detach()
        k = min(self.k + 1, E.shape[0])
        exact = nearest_classes(q, E, k, budget_bytes=self.search["budget_bytes"])
        found = index.search(q, E, k, budget_bytes=self.search["budget_bytes"], backend=self.search["backend"])
        self.index_recall = 100 * index_recall(found, exact)

    def training_stats(self) -> dict[str, float]:
        recall = getattr(self, "index_recall", None)
        return {} if recall is None else {"index_recall": recall}

    def _class_index(self, classes: torch.Tensor, step: bool):
        """The approximate class index to search with (None: exact search). It is stepped (built,
        refreshed when due) by the regularising call of a training step, once per step; a call that
        finds it unbuilt builds it."""
        if self.class_index is None:
            return None
        if step:
            self.class_index.step(classes, self.search["budget_bytes"])
        elif not self.class_index.is_built():
            if not self.training:
                return None  # outside training the state is left alone: exact search
            self.class_index.rebuild(classes, self.search["budget_bytes"])
        return self.class_index

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
