"""Heads = output structure x class scorer (DESIGN.md). Build one from a HeadConfig."""

from __future__ import annotations

from scaleseg.config import HeadConfig
from scaleseg.models.heads.base import ClassScorer, SegmentationHead
from scaleseg.models.heads.scorers import EmbeddingScorer, LinearScorer
from scaleseg.models.heads.pyramid import PyramidHead, SemanticHead
from scaleseg.models.heads.single import SingleLevelHead
from scaleseg.models.norm import NormLayer


def build_scorer(cfg: HeadConfig, in_channels: int, num_classes: int, ignore_index: int) -> ClassScorer:
    if cfg.scorer == "linear":
        return LinearScorer(in_channels, num_classes, ignore_index)
    e = cfg.embedding
    return EmbeddingScorer(
        in_channels,
        num_classes,
        embed_dim=e.embed_dim,
        num_neighbours=e.num_neighbours,
        temperature=e.temperature,
        margin=e.margin,
        margin_weight=e.margin_weight,
        negatives=e.negatives,
        distance=e.distance,
        loss=e.loss,
        normalize=e.normalize,
        ignore_index=ignore_index,
        search_budget_bytes=e.search_budget_mb * 2**20,
        search_backend=e.search_backend,
        search_block=e.search_block,
        search_index=e.search_index,
        index_min_classes=e.index_min_classes,
        index_clusters=e.index_clusters,
        index_probes=e.index_probes,
        index_refresh=e.index_refresh,
        index_reassign=e.index_reassign,
        margin_refresh=e.margin_refresh,
        margin_candidates=e.margin_candidates,
        full_implementation=e.full_implementation,
        table=e.table,
    )


def build_pyramid(
    cfg: HeadConfig, in_channels: int, num_classes: int, ignore_index: int, norm_layer: NormLayer | None = None
) -> PyramidHead:
    """One scorer per level on D_s channels; embedding scorers share one class-embedding table.
    `norm_layer` builds the unity and semantic heads' norms (default BatchNorm; see PyramidHead)."""
    p = cfg.pyramid
    scorers = [build_scorer(cfg, p.semantic_channels, num_classes, ignore_index) for _ in p.strides]
    if cfg.scorer == "embedding":
        for scorer in scorers[1:]:
            scorer.class_embeddings = scorers[0].class_embeddings  # the same nn.Parameter
            # ... and the state derived from it (stepped by the regularising level 0)
            scorer.class_index, scorer.margin_cache = scorers[0].class_index, scorers[0].margin_cache
    return PyramidHead(
        scorers,
        in_channels,
        strides=p.strides,
        unity_channels=p.unity_channels,
        semantic_channels=p.semantic_channels,
        context=p.context,
        context_bins=p.context_bins,
        tau=p.tau,
        relabel=p.relabel,
        relabel_tau=p.relabel_tau,
        loss_resolution=cfg.loss_resolution,
        ignore_index=ignore_index,
        norm_layer=norm_layer,
    )


def build_head(
    cfg: HeadConfig, in_channels: int, num_classes: int, ignore_index: int, norm_layer: NormLayer | None = None
) -> SegmentationHead:
    """The configured structure x scorer. `norm_layer` builds the norms of the pyramid and of the single
    head's semantic layers (single_head=semantic); the plain single head is a scorer's 1x1 conv alone."""
    if cfg.structure == "pyramid":
        return build_pyramid(cfg, in_channels, num_classes, ignore_index, norm_layer)
    if cfg.single_head == "plain":
        return SingleLevelHead(build_scorer(cfg, in_channels, num_classes, ignore_index), cfg.loss_resolution)
    p = cfg.pyramid  # the pyramid's semantic head with its finest level alone
    semantic = SemanticHead(in_channels, p.semantic_channels, (1,), p.context, p.context_bins, norm_layer)
    scorer = build_scorer(cfg, p.semantic_channels, num_classes, ignore_index)
    return SingleLevelHead(scorer, cfg.loss_resolution, semantic_head=semantic)


__all__ = [
    "build_head", "build_pyramid", "build_scorer", "ClassScorer", "EmbeddingScorer", "LinearScorer", "PyramidHead",
    "SegmentationHead", "SemanticHead", "SingleLevelHead",
]
