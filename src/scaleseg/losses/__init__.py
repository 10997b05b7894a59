"""Objectives on pixel embeddings (ESS): kNN-approximated and exact cross-entropy, max-margin regulariser.

All take flat inputs: pixel embeddings (N, d), class embeddings (C, d), targets (N,). Normalise
both beforehand if the model does (the functions use the vectors as given).
"""

from scaleseg.losses.full_ce import full_cross_entropy
from scaleseg.losses.knn_ce import knn_cross_entropy
from scaleseg.losses.margin import margin_regularizer

__all__ = ["full_cross_entropy", "knn_cross_entropy", "margin_regularizer"]
