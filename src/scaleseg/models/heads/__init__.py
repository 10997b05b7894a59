"""Heads = output structure x class scorer (DESIGN.md). Build one from a HeadConfig."""

from __future__ import annotations

from torch import nn

from scaleseg.config import HeadConfig
from scaleseg.models.heads.scorers import LinearScorer
from scaleseg.models.heads.single import SingleLevelHead


def build_scorer(cfg: HeadConfig, in_channels: int, num_classes: int, ignore_index: int) -> nn.Module:
    scorers = {"linear": lambda: LinearScorer(in_channels, num_classes, ignore_index)}
    return scorers[cfg.scorer]()


def build_head(cfg: HeadConfig, in_channels: int, num_classes: int, ignore_index: int) -> nn.Module:
    scorer = build_scorer(cfg, in_channels, num_classes, ignore_index)
    structures = {"single": lambda: SingleLevelHead(scorer, cfg.loss_resolution)}
    return structures[cfg.structure]()


__all__ = ["build_head", "build_scorer", "LinearScorer", "SingleLevelHead"]
