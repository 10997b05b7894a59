"""Analyses of trained runs: `scaleseg analyze` (class- and pixel-embedding figures, per-class IoU)."""

from scaleseg.analysis.embeddings import AnalysisError
from scaleseg.analysis.run import analyze, format_summary

__all__ = ["AnalysisError", "analyze", "format_summary"]
