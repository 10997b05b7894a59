"""`scaleseg analyze`: the ESS supplementary's embedding analyses (section D) for a trained run.

    analyze(target, ...) -> summary dict; writes into `out`:
      dendrogram.png, clusters.txt                  class-embedding clusters        (Figures 8-9)
      pixel_embeddings_2d.png                       pixel + class embeddings in 2D  (Figure 6)
      embeddings_rgb_<image>.png                    pixel embeddings as RGB         (Figure 7)
      frequency_vs_length.png                       frequency vs embedding length   (Figure 4)
      per_class_iou.png, miou_vs_top_n.png/.csv     per-class IoU by frequency      (Figure 5, supp. Figure 5)
      summary.json                                  also, with loss_gradients > 0: each loss term's
                                                    gradient at the head's input (any head)
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from scaleseg.analysis import embeddings as E
from scaleseg.analysis import plots
from scaleseg.analysis.embeddings import AnalysisError

PIXELS_PER_IMAGE = 1500  # pixels sampled per image for the 2D plot and the PCA fit
DENDROGRAM_MAX_CLASSES = 5000  # average linkage keeps a C x C distance matrix: above, the most frequent only


def class_pixel_frequency(dataset, num_classes: int, max_images: int, progress: bool) -> tuple[np.ndarray, int]:
    """Labelled pixels per class over `max_images` images of `dataset` spread evenly (0: all)."""
    n = len(dataset)
    if max_images <= 0 or max_images >= n:
        indices = np.arange(n)
    else:
        indices = np.unique(np.linspace(0, n - 1, max_images).astype(int))
    counts = np.zeros(num_classes, dtype=np.int64)
    for i in tqdm(indices, desc="class frequency", unit="img", disable=not progress, leave=False, dynamic_ncols=True):
        label = np.asarray(dataset[int(i)]["label"]).reshape(-1)
        label = label[(label >= 0) & (label < num_classes)].astype(np.int64)  # drops the ignore value
        counts += np.bincount(label, minlength=num_classes)
    return counts, len(indices)


def _per_class_for(run_dir: Path, ckpt_path: Path | None, iteration: int | None) -> Path | None:
    return E.find_per_class_csv(run_dir, ckpt_path, iteration)


def analyze(
    target: str | Path,
    overrides: list[str] | None = None,
    out: str | Path | None = None,
    images: int = 4,
    clusters: int | None = None,
    compare: str | Path | None = None,
    leaves: int = 60,
    top_classes: int = 0,
    frequency_split: str = "train",
    frequency_images: int = 1000,
    progress: bool = True,
    command: str | None = None,
    loss_gradients: int = 0,
) -> dict:
    from scaleseg.data import build_dataset
    from scaleseg.engine.checkpoint import resolve_run
    from scaleseg.engine.runtime import select_device
    from scaleseg.engine.trainer import dataset_meta

    if top_classes < 0 or leaves < 2:
        raise AnalysisError(f"--top-classes {top_classes} / --leaves {leaves}: need top-classes >= 0 and leaves >= 2")
    if clusters is not None and clusters < 1:
        raise AnalysisError(f"--clusters {clusters}: must be >= 1")
    if images < 0 or loss_gradients < 0:
        raise AnalysisError(f"--images {images} / --loss-gradients {loss_gradients}: must be >= 0")
    if frequency_split not in ("train", "val"):
        raise AnalysisError(f"--frequency-split {frequency_split!r}: use train or val")
    if compare is not None and not Path(compare).exists():
        raise AnalysisError(f"--compare {str(compare)!r} does not exist; pass the other run's work dir "
                            "(or its eval folder / per_class.csv)")
    run = resolve_run(target, list(overrides or []))
    cfg, ckpt_path, ckpt, run_dir = run.cfg, run.checkpoint_path, run.checkpoint, run.run_dir
    embedding = cfg.model.head.scorer == "embedding"
    if not embedding and compare is None and not loss_gradients:
        raise AnalysisError(
            f"{ckpt_path} is a linear-head model (model.head.scorer = {cfg.model.head.scorer!r}): the embedding "
            "analyses need model.head.scorer=embedding; to compare its per-class IoU with another run, "
            "add --compare OTHER_WORK_DIR; for the loss terms' gradients, --loss-gradients N"
        )
    out = Path(out) if out is not None else run_dir / "analysis"
    out.mkdir(parents=True, exist_ok=True)
    summary: dict = {
        "command": command, "target": str(target), "checkpoint": str(ckpt_path), "iteration": ckpt.get("iteration"),
        "scorer": cfg.model.head.scorer, "dataset": cfg.data.dataset, "num_classes": cfg.data.num_classes,
        "files": [], "notes": [],
    }
    files = summary["files"]

    val_set = build_dataset(cfg.data, "val")
    meta = dataset_meta(val_set, cfg)
    C, names = meta["num_classes"], meta["class_names"]
    palette = meta["palette"].numpy()
    freq_set = build_dataset(cfg.data, frequency_split) if frequency_split == "train" else val_set
    frequency, counted = class_pixel_frequency(freq_set, C, frequency_images, progress)
    summary["frequency"] = {"split": frequency_split, "images": counted, "of": len(freq_set),
                            "classes_seen": int((frequency > 0).sum())}
    order = E.frequency_order(frequency)

    # ---- per-class IoU of this run (and the other): Figure 5, supplementary Figure 5
    runs = []
    own_csv = _per_class_for(run_dir, ckpt_path, ckpt.get("iteration"))
    if own_csv is not None:
        runs.append((run_dir.name or str(run_dir), E.read_per_class(own_csv)))
    else:
        summary["notes"].append(f"no per_class.csv for {ckpt_path} under {run_dir / 'eval'}: run `scaleseg eval "
                                f"{run_dir}` for the per-class IoU plots")
    if compare is not None:
        other_csv = _per_class_for(Path(compare), None, None)
        if other_csv is None:
            raise AnalysisError(f"--compare {compare}: no eval/*/per_class.csv there; "
                                f"run `scaleseg eval {compare}` first")
        other = E.read_per_class(other_csv)
        if len(other["names"]) != C or other["names"] != names:
            raise AnalysisError(f"--compare {compare}: its per_class.csv has {len(other['names'])} classes that do "
                                f"not match this run's {C}; compare runs on the same dataset")
        other_name = Path(compare).name if Path(compare).is_dir() else other_csv.parent.name
        if runs and other_name == runs[0][0]:
            other_name += " (compare)"
        runs.append((other_name, other))
    if runs:
        for name, pc in runs:
            if len(pc["names"]) != C:
                raise AnalysisError(f"{pc['path']} has {len(pc['names'])} classes, the run has {C}")
        curves = [(name, E.miou_top_n(pc["IoU"], order)) for name, pc in runs]
        summary["per_class"] = {
            name: {"csv": str(pc["path"]), "mIoU": round(100 * E.run_miou(pc), 4),
                   "mIoU_top_n": {str(n): _pct(curve[n - 1]) for n in _checkpoints(C)}}
            for (name, pc), (_, curve) in zip(runs, curves)
        }
        files.append(plots.plot_per_class_iou(order, [(n, pc["IoU"]) for n, pc in runs], names,
                                              out / "per_class_iou.png"))
        files.append(plots.plot_miou_top_n(curves, out / "miou_vs_top_n.png"))
        files.append(_write_top_n_csv(out / "miou_vs_top_n.csv", order, names, curves))

    device = select_device(cfg.train.device)
    model = run.model().to(device)
    if loss_gradients:
        summary["loss_gradients"] = _loss_gradients(cfg, model, meta["ignore_index"], loss_gradients, device)

    if not embedding:
        summary["notes"].append("linear-head model: the embedding analyses do not apply")
        return _finish(summary, out)

    # ---- the class table
    table = model.head.class_table(raw=True)  # (C, d) as trained; a pyramid's levels share one table
    if table is None:  # pragma: no cover - the config said embedding
        raise AnalysisError(f"{ckpt_path}: the model's head has no class-embedding table")
    raw = table.detach().double().cpu().numpy()
    used = model.head.class_table().detach().double().cpu().numpy()  # (C, d) as the model compares them
    normalized = bool(cfg.model.head.embedding.normalize)
    summary["embedding"] = {"dim": int(raw.shape[1]), "normalize": normalized}

    # Figures 8-9: dendrogram and k-means on the L2-normalised table
    unit = E.unit_rows(raw)
    files.append(_dendrogram(unit, names, frequency, order, leaves, top_classes, out, summary))
    k = clusters if clusters is not None else max(2, min(C, round(math.sqrt(C))))
    groups = E.kmeans_clusters(unit, k, seed=0)
    (out / "clusters.txt").write_text(E.format_clusters(groups, names))
    files.append(out / "clusters.txt")
    summary["clusters"] = {"k": k, "non_empty": len(groups)}

    # family recovery on the built-in dataset
    if cfg.data.dataset == "synthetic":
        family_of = np.asarray(val_set.family_of)
        summary["family_recovery"] = E.family_recovery(used, family_of)
        # families sharing a pattern type (stripes, dots, ...) look alike too: the coarser grouping
        summary["pattern_recovery"] = E.family_recovery(used, np.asarray(val_set.pattern_of))
        summary["clusters"]["family_purity"] = round(_purity(groups, family_of), 4)

    # Figure 4: frequency vs raw length
    length = np.linalg.norm(raw, axis=1)
    rho = _spearman(frequency, length)
    summary["frequency_vs_length"] = {"spearman": None if rho is None else round(rho, 4),
                                      "length_used_by_model": not normalized}
    source = f"{frequency_split} split, {counted} images"
    files.append(plots.plot_frequency_vs_length(frequency.astype(float), length, normalized, source,
                                                out / "frequency_vs_length.png", rho))

    # Figures 6-7: pixel embeddings of the first val images
    if images:
        files.extend(_pixel_figures(model, val_set, used, normalized, palette, meta["ignore_index"],
                                    min(images, len(val_set)), device, out, progress, summary))
    return _finish(summary, out)


def _dendrogram(unit, names, frequency, order, leaves, top_classes, out, summary) -> Path:
    from scipy.cluster.hierarchy import linkage

    C = len(names)
    n = min(C, top_classes or C, DENDROGRAM_MAX_CLASSES)
    keep = np.sort(order[:n])
    title = "agglomerative clustering of the class embeddings"
    if n < C:
        title += f" ({n} most frequent classes)"
        if not top_classes or top_classes > DENDROGRAM_MAX_CLASSES:
            summary["notes"].append(f"dendrogram: the {n} most frequent of {C} classes (linkage needs C^2 memory)")
    Z = linkage(unit[keep], method="average", metric="cosine")
    summary["dendrogram"] = {"classes": int(len(keep)), "leaves": int(min(leaves, len(keep))), "method": "average",
                             "metric": "cosine"}
    return plots.plot_dendrogram(Z, [names[i] for i in keep], out / "dendrogram.png", leaves, frequency[keep], title)


@torch.no_grad()
def _pixel_figures(model, dataset, classes, normalized, palette, ignore_index, n, device, out, progress,
                   summary) -> list[Path]:
    from scaleseg.data.transforms import EvalTransform

    rng = np.random.default_rng(0)
    panels, written = [], []
    ds_ignore = dataset.ignore_index
    for i in tqdm(range(n), desc="pixel embeddings", unit="img", disable=not progress, leave=False, dynamic_ncols=True):
        sample = dataset[i]
        image, label = np.asarray(sample["image"]), np.asarray(sample["label"]).astype(np.int64)
        x = EvalTransform()(sample)["image"][None].to(device)
        dense = model.dense(x)  # (1, d, H, W): what the model decides from (unit if normalised)
        pred = model.decide(dense)[0].cpu().numpy()
        d, H, W = dense.shape[1:]
        pix = dense[0].permute(1, 2, 0).reshape(-1, d).double().cpu().numpy()  # (H W, d)
        if normalized:
            pix = E.unit_rows(pix)  # decide() re-normalises too
        flat = label.reshape(-1)
        valid = np.flatnonzero((flat != ds_ignore) & (flat >= 0) & (flat < len(classes)))
        if valid.size == 0:
            continue
        pick = np.sort(rng.choice(valid, size=min(PIXELS_PER_IMAGE, valid.size), replace=False))
        mean, comps = E.pca(pix[pick], 3)
        present = np.unique(flat[pick])
        coords2 = E.project(pix[pick], mean, comps[:2])
        label_rgb = plots.colour_labels(label, palette, ds_ignore)
        panels.append({"name": sample["name"], "label_rgb": label_rgb, "points": coords2, "point_classes": flat[pick],
                       "stars": E.project(classes[present], mean, comps[:2]), "star_classes": present,
                       "palette": palette})
        emb_rgb = E.to_rgb(E.project(pix, mean, comps)).reshape(H, W, 3)
        pred_rgb = plots.colour_labels(pred, palette, ignore_index)
        acc = float((pred.reshape(-1)[valid] == flat[valid]).mean())
        written.append(plots.plot_embeddings_rgb(image, pred_rgb, label_rgb, emb_rgb,
                                                 out / f"embeddings_rgb_{_safe(sample['name'])}.png",
                                                 f"{sample['name']}: pixel accuracy {100 * acc:.1f}%"))
    if panels:
        written.insert(0, plots.plot_pixel_embeddings_2d(panels, out / "pixel_embeddings_2d.png"))
    summary["images"] = [p["name"] for p in panels]
    return written


def _loss_gradients(cfg, model, ignore_index: int, n: int, device) -> dict:
    """Each loss term's gradient norm at the head's input, the mean over the first `n` training batches
    (the run's crops, batch size and augmentations, from its seed: what the loss saw in training)."""
    import itertools

    from scaleseg.analysis.gradients import mean_gradient_norms
    from scaleseg.data import build_dataset, build_train_loader

    loader = build_train_loader(cfg.data, build_dataset(cfg.data, "train"), ignore_index, cfg.train.seed, progress=False)
    batches = ((b["image"].to(device), b["label"].to(device)) for b in itertools.islice(loader, n))
    result = mean_gradient_norms(model, batches)
    result["images"] = f"{n} training batches of {cfg.data.batch_size}"
    return result


def _write_top_n_csv(path: Path, order, names, curves) -> Path:
    lines = ["n,class_id,class," + ",".join(f"mIoU {name}" for name, _ in curves)]
    for n, c in enumerate(order, start=1):
        values = ",".join("" if math.isnan(curve[n - 1]) else f"{curve[n - 1]:.8f}" for _, curve in curves)
        lines.append(f"{n},{int(c)},{names[c]},{values}")
    path.write_text("\n".join(lines) + "\n")
    return path


def _checkpoints(C: int) -> list[int]:
    return sorted({n for n in (1, 10, 100, 1000, 10000, 100000) if n < C} | {C})


def _pct(value: float) -> float | None:
    return None if math.isnan(value) else round(100 * float(value), 4)


def _purity(groups: list[list[int]], family_of: np.ndarray) -> float:
    """Fraction of classes that share the family most common in their k-means cluster."""
    return sum(np.bincount(family_of[g]).max() for g in groups) / sum(map(len, groups))


def _spearman(a: np.ndarray, b: np.ndarray) -> float | None:
    from scipy.stats import spearmanr

    seen = a > 0
    if seen.sum() < 3:
        return None
    rho = spearmanr(a[seen], b[seen]).statistic
    return None if rho is None or math.isnan(rho) else float(rho)


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in str(name))


def _finish(summary: dict, out: Path) -> dict:
    summary["files"] = [Path(f).name for f in summary["files"]] + ["summary.json"]
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    summary["out"] = str(out)
    return summary


def format_summary(summary: dict) -> str:
    lines = [f"analysed {summary['checkpoint']} (iteration {summary['iteration']}, {summary['scorer']} scorer, "
             f"{summary['num_classes']} classes)"]
    f = summary["frequency"]
    lines.append(f"class frequency: {f['split']} split, {f['images']} of {f['of']} images, "
                 f"{f['classes_seen']} classes seen")
    fam = summary.get("family_recovery")
    if fam:
        lines.append(f"family recovery: {100 * fam['fraction']:.1f}% of classes have their nearest other class "
                     f"embedding in their own family (chance {100 * fam['chance']:.1f}%, {fam['families']} families)")
    pat = summary.get("pattern_recovery")
    if pat:
        lines.append(f"pattern recovery: {100 * pat['fraction']:.1f}% have it among the classes of the same "
                     f"pattern type (chance {100 * pat['chance']:.1f}%, {pat['families']} pattern types)")
    if "clusters" in summary:
        c = summary["clusters"]
        lines.append(f"k-means: {c['non_empty']} non-empty clusters of k = {c['k']}"
                     + (f", family purity {100 * c['family_purity']:.1f}%" if "family_purity" in c else ""))
    fl = summary.get("frequency_vs_length")
    if fl and fl["spearman"] is not None:
        lines.append(f"frequency vs raw class-embedding length: Spearman {fl['spearman']:+.3f}"
                     + ("" if fl["length_used_by_model"] else " (lengths unused: normalised model)"))
    grads = summary.get("loss_gradients")
    if grads:
        norms = ", ".join(f"{k} {v:.4g}" for k, v in grads["gradient_norm"].items())
        lines.append(f"loss gradients at the head's input (mean over {grads['images']}): {norms}"
                     + (f"; unity / ce = {grads['unity_to_ce']:.2f}" if "unity_to_ce" in grads else ""))
    for name, pc in summary.get("per_class", {}).items():
        top = ", ".join(f"top {n}: {v}" for n, v in pc["mIoU_top_n"].items())
        lines.append(f"{name}: mIoU {pc['mIoU']:.2f} ({top})")
    lines += [f"note: {n}" for n in summary["notes"]]
    lines.append(f"wrote {len(summary['files'])} files into {summary['out']}: {', '.join(summary['files'])}")
    return "\n".join(lines)
