"""Objectives on pixel embeddings (ESS): kNN-approximated (ESS Eq. 6) and exact cross-entropy, the
max-margin regulariser (ESS Eq. 7) and its O(C d) cached form.

All take flat inputs: pixel embeddings (N, d), class embeddings (C, d), targets (N,). Normalise
both beforehand if the model does (the functions use the vectors as given). Targets equal to
`ignore_index` (default -100, as `F.cross_entropy`: never a class id) are left out; float64 inputs
are computed in float64, any other float type in float32.
"""

from scaleseg.losses.full_ce import full_cross_entropy
from scaleseg.losses.knn_ce import block_candidates, knn_cross_entropy
from scaleseg.losses.margin import MarginCache, margin_regularizer

__all__ = ["MarginCache", "block_candidates", "full_cross_entropy", "knn_cross_entropy", "margin_regularizer"]
