"""Training curves of a work dir: loss terms and validation metrics against iteration."""

from __future__ import annotations

import json
from pathlib import Path


def plot_training_curves(scalars_path: Path, out_path: Path) -> Path:
    """Read scalars.jsonl and write a two-panel PNG: train loss terms | val mIoU, aAcc, fwIoU."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in Path(scalars_path).read_text().splitlines() if line]
    train = [r for r in rows if r.get("split") == "train"]
    val = [r for r in rows if r.get("split") == "val"]
    fig, (ax_loss, ax_val) = plt.subplots(1, 2, figsize=(11, 4))
    skip = {"iter", "split", "lr", "time_per_iter", "data_time", "grad_norm", "skipped_steps"}
    terms = list(dict.fromkeys(k for r in train for k in r if k not in skip and not k.startswith("peak_mem")))
    for key in terms:  # a window whose steps were all skipped (non-finite loss) has no loss terms
        points = [(r["iter"], r[key]) for r in train if key in r]
        ax_loss.plot(*zip(*points), label=key)
    ax_loss.set(xlabel="iteration", ylabel="loss", title="training loss")
    ax_loss.grid(alpha=0.3)
    if terms:
        ax_loss.legend()
    for key in ("mIoU", "aAcc", "fwIoU", "mAcc"):
        points = [(r["iter"], r[key]) for r in val if r.get(key) is not None]
        if points:
            ax_val.plot(*zip(*points), marker="o", label=key)
    ax_val.set(xlabel="iteration", ylabel="%", title="validation")
    ax_val.grid(alpha=0.3)
    if val:
        ax_val.legend()
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return Path(out_path)
