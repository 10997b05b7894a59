"""The numbers behind `scaleseg analyze`: PCA of embeddings, nearest classes, clusters, per-class IoU curves.

Plain numpy (and scipy for k-means) on arrays small enough to hold: a class table (C, d), a few
thousand sampled pixel embeddings, and per-class vectors of length C. Plots live in `plots.py`.
"""

from __future__ import annotations

import csv
import math
import warnings
from pathlib import Path

import numpy as np

from scaleseg.errors import ScalesegError


class AnalysisError(ScalesegError):
    """A run that cannot be analysed as asked (linear head, no per-class results, mismatched runs)."""


# ----------------------------------------------------------------------------------- PCA
def pca(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean (d,) and the first `k` principal directions (k, d) of the rows of x (n, d), via SVD.

    Each direction's sign is fixed so that its largest-magnitude entry is positive, so the result
    does not depend on the SVD routine's sign choice. With fewer than k independent directions the
    missing ones are zero rows (their projection is 0)."""
    x = np.asarray(x, dtype=np.float64)
    mean = x.mean(axis=0)
    _, _, vt = np.linalg.svd(x - mean, full_matrices=False)  # rows of vt: directions by variance
    components = np.zeros((k, x.shape[1]))
    m = min(k, vt.shape[0])
    components[:m] = vt[:m]
    for row in components:
        i = int(np.argmax(np.abs(row)))
        if row[i] < 0:
            row *= -1
    return mean, components


def project(x: np.ndarray, mean: np.ndarray, components: np.ndarray) -> np.ndarray:
    """(n, d) -> (n, k) coordinates along the principal directions."""
    return (np.asarray(x, dtype=np.float64) - mean) @ components.T


def to_rgb(coords: np.ndarray) -> np.ndarray:
    """(..., 3) PCA coordinates -> uint8 colours: each component min-max scaled to 0..255."""
    lo = coords.reshape(-1, coords.shape[-1]).min(axis=0)
    hi = coords.reshape(-1, coords.shape[-1]).max(axis=0)
    scaled = (coords - lo) / np.where(hi > lo, hi - lo, 1.0)
    return np.clip(np.round(scaled * 255), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------------- class table
def unit_rows(table: np.ndarray) -> np.ndarray:
    """L2-normalised rows (a zero row stays zero)."""
    table = np.asarray(table, dtype=np.float64)
    norm = np.linalg.norm(table, axis=1, keepdims=True)
    return table / np.where(norm > 0, norm, 1.0)


def nearest_other_class(table: np.ndarray, budget_bytes: int = 64 * 2**20) -> np.ndarray:
    """For each row c of table (C, d), the index of the nearest *other* row (Euclidean), in chunks
    of rows so that the (chunk, C) distance tile stays within `budget_bytes`."""
    table = np.asarray(table, dtype=np.float64)
    C = table.shape[0]
    if C < 2:
        raise AnalysisError("the nearest other class needs at least 2 classes")
    sq = (table * table).sum(axis=1)
    rows = max(1, budget_bytes // (8 * C))
    out = np.empty(C, dtype=np.int64)
    for start in range(0, C, rows):
        stop = min(C, start + rows)
        dist = sq[start:stop, None] - 2 * table[start:stop] @ table.T + sq[None, :]  # (rows, C)
        dist[np.arange(stop - start), np.arange(start, stop)] = np.inf
        out[start:stop] = dist.argmin(axis=1)
    return out


def family_recovery(table: np.ndarray, family_of: np.ndarray) -> dict:
    """Fraction of classes whose nearest other class embedding is in the same family, and the
    chance level: the mean over classes of (members of its family - 1) / (C - 1)."""
    family_of = np.asarray(family_of)
    C = len(family_of)
    nearest = nearest_other_class(table)
    same = family_of[nearest] == family_of
    members = np.bincount(family_of)[family_of]
    return {
        "fraction": float(same.mean()),
        "chance": float(((members - 1) / (C - 1)).mean()),
        "classes": int(C),
        "families": int(len(np.unique(family_of))),
    }


def kmeans_clusters(table: np.ndarray, k: int, seed: int = 0) -> list[list[int]]:
    """k-means (scipy kmeans2, k-means++ start, fixed seed) of the rows; non-empty clusters, each a
    list of row indices, largest first. Every row is in exactly one cluster."""
    from scipy.cluster.vq import kmeans2

    table = np.asarray(table, dtype=np.float64)
    if not 1 <= k <= len(table):
        raise AnalysisError(f"--clusters {k}: must be between 1 and the number of classes ({len(table)})")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "One of the clusters is empty": empty clusters are dropped
        _, assignment = kmeans2(table, k, minit="++", seed=seed)
    clusters = [np.flatnonzero(assignment == j).tolist() for j in range(k)]
    return sorted((c for c in clusters if c), key=lambda c: (-len(c), c[0]))


def format_clusters(clusters: list[list[int]], class_names: list[str]) -> str:
    lines = [f"# {len(clusters)} k-means clusters of {sum(map(len, clusters))} class embeddings"]
    for j, members in enumerate(clusters):
        lines.append(f"cluster {j} ({len(members)}): " + ", ".join(class_names[i] for i in members))
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------- per-class IoU
def read_per_class(path: Path) -> dict:
    """per_class.csv (written by `scaleseg eval` and training) -> names, IoU (NaN where empty) and areas."""
    path = Path(path)
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        return {
            "path": path,
            "names": [r["name"] for r in rows],
            "intersection": np.array([int(r["intersection"]) for r in rows], dtype=np.int64),
            "pred_area": np.array([int(r["pred_area"]) for r in rows], dtype=np.int64),
            "label_area": np.array([int(r["label_area"]) for r in rows], dtype=np.int64),
        } | {"IoU": iou_from_counts(rows)}
    except (OSError, KeyError, ValueError) as exc:
        raise AnalysisError(f"cannot read {path} as a per_class.csv of `scaleseg eval` ({exc})") from None


def iou_from_counts(rows: list[dict]) -> np.ndarray:
    """Per-class IoU from the CSV's exact counts (its IoU column is rounded): NaN where the union is 0."""
    inter = np.array([int(r["intersection"]) for r in rows], dtype=np.float64)
    union = np.array([int(r["pred_area"]) + int(r["label_area"]) for r in rows], dtype=np.float64) - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, inter / np.maximum(union, 1), np.nan)


def run_miou(per_class: dict) -> float:
    """The run's mIoU as metrics.py defines it: the mean IoU over classes whose union is > 0."""
    inter, pred, label = per_class["intersection"], per_class["pred_area"], per_class["label_area"]
    union = pred + label - inter
    present = union > 0
    return float((inter[present] / union[present]).mean()) if present.any() else math.nan


def miou_top_n(iou: np.ndarray, order: np.ndarray) -> np.ndarray:
    """mIoU over the n first classes of `order` (most frequent first), for n = 1..C; classes with an
    undefined IoU (NaN: absent from labels and predictions) are left out of the mean, as in metrics.py."""
    values = np.asarray(iou, dtype=np.float64)[order]
    defined = ~np.isnan(values)
    counts = np.cumsum(defined)
    sums = np.cumsum(np.where(defined, values, 0.0))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def frequency_order(frequency: np.ndarray) -> np.ndarray:
    """Class ids, most frequent first (ties by id)."""
    return np.argsort(-np.asarray(frequency), kind="stable")


def find_per_class_csv(target: Path, checkpoint: Path | None = None, iteration: int | None = None) -> Path | None:
    """The per_class.csv of a run: `target` itself (a CSV or an eval folder), or in a work dir
    eval/<checkpoint name>/, eval/iter_<iteration>/ (training's own evaluation of that checkpoint),
    else the evaluation of the latest iteration. None when there is none."""
    target = Path(target)
    if target.is_file():
        return target
    if (target / "per_class.csv").is_file():
        return target / "per_class.csv"
    eval_dir = target / "eval"
    candidates = []
    if checkpoint is not None:
        candidates.append(eval_dir / Path(checkpoint).stem / "per_class.csv")
    if iteration is not None:
        candidates.append(eval_dir / f"iter_{int(iteration):06d}" / "per_class.csv")
    for path in candidates:
        if path.is_file():
            return path
    iters = sorted(eval_dir.glob("iter_*/per_class.csv"))
    return iters[-1] if iters else None
