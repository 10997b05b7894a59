"""The PNG figures of `scaleseg analyze` (matplotlib, Agg backend), after ESS supplementary section D
(seeds/001_34201d96439979ab.txt, Figures 4-9). Each function takes plain arrays and writes one file."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out: Path, dpi: int = 100) -> Path:
    fig.savefig(out, dpi=dpi)
    _plt().close(fig)
    return Path(out)


def colour_labels(label: np.ndarray, palette: np.ndarray, ignore_index: int) -> np.ndarray:
    """(H, W) class ids -> (H, W, 3) uint8 via the palette; ignored pixels black."""
    valid = (label != ignore_index) & (label >= 0) & (label < len(palette))
    out = np.zeros(label.shape + (3,), dtype=np.uint8)
    out[valid] = palette[label[valid]]
    return out


def plot_dendrogram(linkage: np.ndarray, class_names: list[str], out: Path, leaves: int,
                    frequency: np.ndarray | None = None, title: str = "") -> Path:
    """Agglomerative clustering of the class embeddings (Figures 8-9). Up to `leaves` classes: every
    class is a leaf named by its class name; more: the top of the tree cut to `leaves` clusters
    (scipy's truncate_mode="lastp"), each labelled "(n) most frequent member"."""
    from scipy.cluster.hierarchy import dendrogram, to_tree

    plt = _plt()
    C = len(class_names)
    truncate = C > leaves
    members_of = None
    if truncate:
        _, nodes = to_tree(linkage, rd=True)
        members_of = lambda i: nodes[i].pre_order()  # noqa: E731

    def label(i: int) -> str:
        if i < C:
            return class_names[i]
        members = members_of(i)
        top = max(members, key=lambda m: (frequency[m], -m)) if frequency is not None else min(members)
        return f"({len(members)}) {class_names[top]}"

    shown = min(C, leaves)
    fig, ax = plt.subplots(figsize=(8, max(4.0, 0.22 * shown + 1.5)))
    dendrogram(linkage, orientation="left", leaf_label_func=label, leaf_font_size=8, ax=ax,
               truncate_mode="lastp" if truncate else None, p=leaves, color_threshold=None)
    ax.set_xlabel("cosine distance between class embeddings (average linkage)")
    note = f"top {leaves} clusters of {C} classes; (n) = classes in the cluster, named by its most frequent" \
        if truncate else f"{C} classes"
    ax.set_title(f"{title}\n{note}" if title else note, fontsize=9)
    fig.tight_layout()
    return _save(fig, out)


def plot_pixel_embeddings_2d(panels: list[dict], out: Path) -> Path:
    """Figure 6: per image, the ground truth (left) and its sampled pixel embeddings projected to 2D
    by PCA, coloured by ground-truth class, with the class embeddings of the classes present as stars.

    Each panel: {"name", "label_rgb" (H, W, 3), "points" (n, 2), "point_classes" (n,),
    "stars" (m, 2), "star_classes" (m,), "palette" (C, 3) uint8}."""
    plt = _plt()
    rows = len(panels)
    fig, axes = plt.subplots(rows, 2, figsize=(9, 4.2 * rows), squeeze=False)
    for (ax_gt, ax_pts), p in zip(axes, panels):
        ax_gt.imshow(p["label_rgb"])
        ax_gt.set_title(f"{p['name']}: ground truth", fontsize=9)
        ax_gt.axis("off")
        colours = p["palette"][p["point_classes"]] / 255.0
        ax_pts.scatter(p["points"][:, 0], p["points"][:, 1], c=colours, s=6, alpha=0.6, linewidths=0)
        star_colours = p["palette"][p["star_classes"]] / 255.0
        ax_pts.scatter(p["stars"][:, 0], p["stars"][:, 1], c=star_colours, marker="*", s=260,
                       edgecolors="black", linewidths=0.8)
        ax_pts.set_title("PCA: pixel embeddings (dots, colour = true class),\n"
                         "class embeddings of the classes present (stars)", fontsize=8)
        ax_pts.set_xlabel("PC 1")
        ax_pts.set_ylabel("PC 2")
        ax_pts.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, out)


def plot_embeddings_rgb(image: np.ndarray, pred_rgb: np.ndarray, label_rgb: np.ndarray, emb_rgb: np.ndarray,
                        out: Path, title: str = "") -> Path:
    """Figure 7: the image, the predicted mask, the ground truth and the pixel embeddings' first three
    principal components as RGB."""
    plt = _plt()
    fig, axes = plt.subplots(1, 4, figsize=(13, 3.6))
    for ax, img, name in zip(axes, (image, pred_rgb, label_rgb, emb_rgb),
                             ("image", "prediction", "ground truth", "pixel embeddings (PCA -> RGB)")):
        ax.imshow(img, interpolation="nearest")
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, out)


def plot_frequency_vs_length(frequency: np.ndarray, length: np.ndarray, normalized: bool, source: str,
                             out: Path, rank_correlation: float | None = None) -> Path:
    """Figure 4: class pixel frequency (left, most frequent first) and the raw length of each class
    embedding in the same order (right), plus length against frequency."""
    plt = _plt()
    order = np.argsort(-frequency, kind="stable")
    rank = np.arange(1, len(order) + 1)
    fig, (ax_f, ax_l, ax_s) = plt.subplots(1, 3, figsize=(14, 4))
    share = frequency[order] / max(frequency.sum(), 1)
    ax_f.plot(rank, np.where(share > 0, share, np.nan), lw=1)
    ax_f.set(yscale="log", xlabel="class (most frequent first)", ylabel="fraction of labelled pixels",
             title=f"class frequency ({source})")
    ax_l.plot(rank, length[order], ".", ms=3, alpha=0.6)
    ax_l.set(xlabel="class (most frequent first)", ylabel="||class embedding||", title="class-embedding length")
    present = frequency > 0
    ax_s.scatter(frequency[present] / max(frequency.sum(), 1), length[present], s=5, alpha=0.5)
    rho = f" (Spearman {rank_correlation:+.2f})" if rank_correlation is not None else ""
    ax_s.set(xscale="log", xlabel="fraction of labelled pixels", ylabel="||class embedding||",
             title="length vs frequency" + rho)
    for ax in (ax_f, ax_l, ax_s):
        ax.grid(alpha=0.3)
    fig.suptitle("raw class-embedding length (model.head.embedding.normalize=false: used by the model)"
                 if not normalized else
                 "raw class-embedding length: NOT used by this model (normalize=true L2-normalises the table)",
                 fontsize=10)
    fig.tight_layout()
    return _save(fig, out)


def plot_per_class_iou(order: np.ndarray, runs: list[tuple[str, np.ndarray]], class_names: list[str], out: Path,
                       window: int = 25) -> Path:
    """Figure 5 (main paper style): per-class IoU of one or two runs, classes sorted by frequency.
    Up to 40 classes: grouped bars named by class; more: the IoU of each class as dots and a running
    mean over `window` classes as a line."""
    plt = _plt()
    C = len(order)
    if C <= 40:
        fig, ax = plt.subplots(figsize=(max(7, 0.35 * C + 2), 4.5))
        width = 0.8 / len(runs)
        x = np.arange(C)
        for j, (name, iou) in enumerate(runs):
            ax.bar(x + (j - (len(runs) - 1) / 2) * width, 100 * np.nan_to_num(iou[order]), width, label=name)
        ax.set_xticks(x, [class_names[i] for i in order], rotation=90, fontsize=7)
        ax.set_xlabel("class (most frequent first)")
    else:
        fig, ax = plt.subplots(figsize=(10, 4.5))
        rank = np.arange(1, C + 1)
        for name, iou in runs:
            values = 100 * iou[order]
            dots = ax.plot(rank, values, ".", ms=2, alpha=0.35)[0]
            ax.plot(rank, _running_nanmean(values, window), color=dots.get_color(), lw=1.8,
                    label=f"{name} (running mean over {window} classes)")
        ax.set_xscale("log")
        ax.set_xlabel("class frequency rank (1 = most frequent)")
    ax.set_ylabel("IoU (%)")
    ax.set_title("per-class IoU, classes sorted by pixel frequency", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, out)


def plot_miou_top_n(curves: list[tuple[str, np.ndarray]], out: Path) -> Path:
    """Supplementary Figure 5: mIoU over the n most frequent classes, for n = 1..C."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, curve in curves:
        n = np.arange(1, len(curve) + 1)
        ax.plot(n, 100 * curve, label=f"{name} (all: {100 * curve[-1]:.2f})")
    ax.set_xscale("log" if len(curves[0][1]) > 50 else "linear")
    ax.set(xlabel="n most frequent classes", ylabel="mIoU (%)", title="mIoU over the n most frequent classes")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, out)


def _running_nanmean(values: np.ndarray, window: int) -> np.ndarray:
    """Centred running mean over `window` entries, ignoring NaN."""
    defined = ~np.isnan(values)
    kernel = np.ones(window)
    sums = np.convolve(np.where(defined, values, 0.0), kernel, mode="same")
    counts = np.convolve(defined.astype(float), kernel, mode="same")
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
