"""Peak training memory versus the number of classes, one configuration per process.

For each (head, C) a fresh Python process builds the model and optimizer with random inputs of the
chosen batch and crop, records its memory baseline, runs `steps` full training steps (forward,
loss, backward, optimizer; the first step allocates the momentum buffers) and reports:

* on CUDA: `torch.cuda.max_memory_allocated` (the peak, and the peak minus the baseline);
* on CPU: the process's peak resident set size (VmHWM) and that peak minus the resident size
  right after model creation (the training step's own memory).

A configuration that runs out of memory (CUDA OOM, a failed CPU allocation under the per-process
address-space limit, or a process killed by the kernel) is recorded as such, not as a crash
(`scaleseg.bench.harness`, the child-process harness shared with `bench speed`).

With `--max-batch BUDGET_GB` it also finds, for each (head, C), the largest batch whose training
step fits the budget (ESS paper Figure 1 / Table 6): batches 2, 4, 8, ... until one does not fit
(or `--max-batch-limit` is reached), then bisection between the last fit and the first failure,
each trial in its own process. A trial fits when it runs without running out of memory and its
peak (CUDA: `max_memory_allocated`; CPU: the process's peak RSS) is at most the budget. The
search assumes memory grows with the batch. Batch 1 is never tried: BatchNorm in the ASPP
image-pooling branch needs 2 images, so a configuration where batch 2 does not fit reports 0.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Callable

from scaleseg.bench.harness import run_child
from scaleseg.errors import ScalesegError

_ESS = ["model.head.scorer=embedding"]
# ESS as published: exact search for every pixel, the exact regulariser (ESS Eq. 7) at every step
_EXACT = ["model.head.embedding.search_block=1", "model.head.embedding.search_index=exact",
          "model.head.embedding.margin_refresh=1"]
_CACHED = ["model.head.embedding.margin_refresh=100"]  # the regulariser's nearest-class pairs refreshed every 100 steps
HEADS = {
    "baseline": ["model.head.scorer=linear"],
    "ess-knn": [*_ESS, "model.head.embedding.loss=knn", *_EXACT],
    "ess-full": [*_ESS, "model.head.embedding.loss=full", *_EXACT],
    # ESS supplementary C's remedies, added one by one: the cached regulariser (without it the exact
    # Eq. 7 is a C x C search every step), then the search per 2 x 2 or 4 x 4 block of pixels, or
    # through the class index, then both
    "ess-knn-cached": [*_ESS, "model.head.embedding.loss=knn", *_EXACT, *_CACHED],
    "ess-knn-cached-block2": [*_ESS, "model.head.embedding.loss=knn", *_EXACT, *_CACHED,
                              "model.head.embedding.search_block=2"],
    "ess-knn-cached-block4": [*_ESS, "model.head.embedding.loss=knn", *_EXACT, *_CACHED,
                              "model.head.embedding.search_block=4"],
    "ess-knn-cached-ivf": [*_ESS, "model.head.embedding.loss=knn", *_EXACT, *_CACHED,
                           "model.head.embedding.search_index=ivf"],
    "ess-knn-fast": [*_ESS, "model.head.embedding.loss=knn", *_EXACT, *_CACHED, "model.head.embedding.search_block=4",
                     "model.head.embedding.search_index=ivf"],
    # the exact loss with the cached regulariser
    "ess-full-cached": [*_ESS, "model.head.embedding.loss=full", *_EXACT, *_CACHED],
    # the library's defaults for the embedding scorer, whatever they are
    "ess-default": [*_ESS],
    # Specialize and Fuse's pyramid (strides 4-32, D_u 64, D_s 512, contextual module) on the same decoder
    "pyramid-linear": ["model.head.structure=pyramid", "model.head.scorer=linear"],
    "pyramid-ess": ["model.head.structure=pyramid", *_ESS, "model.head.embedding.loss=knn", *_EXACT],
}
# heads whose loss runs the nearest-class search (timed separately by bench speed)
KNN_HEADS = tuple(h for h, o in HEADS.items() if "model.head.scorer=embedding" in o
                  and "model.head.embedding.loss=full" not in o)
DEFAULT_CLASSES = (19, 150, 1284, 5000, 20000, 100000)


def _rss_mb(field: str) -> float:
    """VmRSS (current) or VmHWM (peak) of this process in MiB, from /proc."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure(head: str, num_classes: int, backbone: str, batch: int, crop: int, device: str, steps: int,
            loss_resolution: str, overrides: list[str] = ()) -> dict:
    """One configuration, in this process. Returns a JSON-able record. `overrides` are dotted
    config overrides applied last (e.g. model.head.embedding.search_budget_mb=64)."""
    from scaleseg.config import load_config

    cfg = load_config(None, [*HEADS[head], f"data.num_classes={num_classes}", f"model.backbone={backbone}",
                             f"model.head.loss_resolution={loss_resolution}", f"data.batch_size={batch}",
                             *overrides])
    return measure_model(cfg, num_classes, batch, crop, device, steps)


def run_config_job(job: dict) -> dict:
    """A training step's peak memory for a full config: job = {"overrides": dotted overrides of the
    defaults, "num_classes", "batch", "crop", "device", "steps"} (bench accuracy's --memory-budget-gb)."""
    from scaleseg.config import load_config

    cfg = load_config(None, [*job["overrides"], f"data.batch_size={job['batch']}"])
    return measure_model(cfg, job["num_classes"], job["batch"], job["crop"], job.get("device", "cpu"), job["steps"])


def measure_model(cfg, num_classes: int, batch: int, crop: int, device: str, steps: int) -> dict:
    """`steps` training steps of cfg's model on random (batch, 3, crop, crop) images, in this process."""
    import torch

    from scaleseg.engine.optim import build_optimizer
    from scaleseg.engine.runtime import select_device
    from scaleseg.models import build_model

    dev = select_device(device)
    torch.manual_seed(0)
    model = build_model(cfg.model, num_classes, ignore_index=-1).to(dev).train()
    optimizer = build_optimizer(model, cfg.optim)
    images = torch.randn(batch, 3, crop, crop, device=dev)
    target = torch.randint(0, num_classes, (batch, crop, crop), device=dev)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev) / 2**20
    else:
        base = _rss_mb("VmRSS")
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        loss = model.loss(model(images), target)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)  # as the trainer: no gradients held through the next forward
        model.after_optimizer_step()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        times.append(time.perf_counter() - t)
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated(dev) / 2**20
        kind = "cuda max_memory_allocated"
    else:
        peak = _rss_mb("VmHWM")
        kind = "cpu peak RSS"
    return {
        "status": "ok", "peak_mb": round(peak, 1), "step_mb": round(peak - base, 1), "baseline_mb": round(base, 1),
        "measure": kind, "step_seconds": round(min(times), 3),
    }


def run_job(job: dict) -> dict:
    """One configuration of `job` (a dict of measure's arguments), in this process (the harness's child)."""
    return measure(job["head"], job["num_classes"], job["backbone"], job["batch"], job["crop"], job["device"],
                   job["steps"], job["loss_resolution"], job["overrides"])


def run_one_subprocess(head: str, num_classes: int, args, limit_gb: float | None, batch: int | None = None) -> dict:
    """Measure one configuration in a fresh interpreter (so peaks do not mix); `batch` defaults to args.batch."""
    job = {"head": head, "num_classes": num_classes, "backbone": args.backbone,
           "batch": args.batch if batch is None else batch, "crop": args.crop, "device": args.device,
           "steps": args.steps, "loss_resolution": args.loss_resolution, "limit_gb": limit_gb or 0,
           "overrides": list(args.set or [])}
    return {"head": head, "num_classes": num_classes, **run_child("scaleseg.bench.memory:run_job", job)}


MIN_BATCH = 2  # BatchNorm in the ASPP image-pooling branch needs two images


def search_max_batch(fits: Callable[[int], bool], limit: int) -> tuple[int, list[int]]:
    """The largest batch b in [2, limit] with fits(b), assuming fits is monotone (true up to some
    batch, false above): doubling from 2, then bisection. Returns (max batch or 0 when batch 2
    does not fit, the batches tried in order)."""
    if limit < MIN_BATCH:
        raise ScalesegError(f"--max-batch-limit {limit}: must be >= {MIN_BATCH}")
    tried: list[int] = []

    def trial(batch: int) -> bool:
        tried.append(batch)
        return fits(batch)

    fit, fail, batch = 0, None, MIN_BATCH  # fit: largest known to fit; fail: smallest known not to
    while fail is None:
        if trial(batch):
            fit = batch
            if batch == limit:
                return fit, tried
            batch = min(2 * batch, limit)
        else:
            fail = batch
    while fail - fit > 1 and fit > 0:
        mid = (fit + fail) // 2
        if trial(mid):
            fit = mid
        else:
            fail = mid
    return fit, tried


def trial_fits(record: dict, budget_gb: float, batch: int, what: str) -> bool:
    """A trial fits when it ran (no OOM, not killed) and its peak is within the budget. A trial that
    failed for another reason (a config the model rejects, a bug) says nothing about memory: it stops
    the search with its cause rather than reading as "does not fit" (`what` names the run)."""
    if record["status"] not in ("ok", "oom", "killed"):
        raise ScalesegError(f"{what}: the memory trial at batch {batch} failed ({record['status']}), "
                            f"not for lack of memory: {record.get('detail', 'no detail')}")
    return record["status"] == "ok" and record["peak_mb"] <= budget_gb * 1024


def find_max_batch(head: str, num_classes: int, args, measure_trial: Callable[[int], dict] | None = None) -> dict:
    """The max-batch record of one (head, C). `measure_trial(batch) -> record` defaults to a fresh
    process per batch (run_one_subprocess, under --limit-gb when given)."""
    if measure_trial is None:
        def measure_trial(batch: int) -> dict:
            return run_one_subprocess(head, num_classes, args, args.limit_gb, batch=batch)

    trials = []

    def fits(batch: int) -> bool:
        record = measure_trial(batch)
        ok = trial_fits(record, args.max_batch, batch, f"max batch of {head} at C = {num_classes}")
        trials.append({"batch": batch, "status": record["status"], "peak_mb": record.get("peak_mb"), "fits": ok,
                       **({"detail": record["detail"]} if "detail" in record else {})})
        return ok

    best, _ = search_max_batch(fits, args.max_batch_limit)
    return {"head": head, "num_classes": num_classes, "max_batch": best,
            "at_limit": best == args.max_batch_limit, "trials": trials}


def _check_max_batch_args(args) -> None:
    budget, limit = getattr(args, "max_batch", None), getattr(args, "max_batch_limit", 256)
    if budget is not None and budget <= 0:
        raise ScalesegError(f"--max-batch {budget:g}: the memory budget must be > 0 GiB")
    if limit is not None and limit < MIN_BATCH:
        raise ScalesegError(f"--max-batch-limit {limit}: must be >= {MIN_BATCH} (BatchNorm needs two images)")


def run_benchmark(args) -> list[dict]:
    """All (head, C) pairs, one process each, with a progress bar; writes memory.json, memory.md
    and memory.png into args.out and returns the records. With args.max_batch (GiB) it also searches
    the largest batch that fits for each pair (see search_max_batch) and adds it to all three outputs."""
    from tqdm import tqdm

    _check_max_batch_args(args)
    budget = getattr(args, "max_batch", None)
    pairs = [(h, c) for h in args.heads for c in args.classes]
    records, max_batches = [], []
    for head, num_classes in tqdm(pairs, desc="bench memory", unit="config", disable=args.no_progress):
        records.append(run_one_subprocess(head, num_classes, args, args.limit_gb))
    if budget is not None:
        for head, num_classes in tqdm(pairs, desc=f"max batch in {budget:g} GiB", unit="config",
                                      disable=args.no_progress):
            try:
                max_batches.append(find_max_batch(head, num_classes, args))
            except ScalesegError as exc:  # a trial failed for a reason other than memory: say which, go on
                max_batches.append({"head": head, "num_classes": num_classes, "max_batch": None, "at_limit": False,
                                    "error": str(exc)})
                print(f"error: {exc}", file=sys.stderr)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from scaleseg.engine.runtime import select_device

    meta = {
        "backbone": args.backbone, "batch": args.batch, "crop": args.crop, "device": str(select_device(args.device)),
        "steps": args.steps, "loss_resolution": args.loss_resolution, "limit_gb": args.limit_gb,
        "overrides": list(args.set or []),
        "command": command_line(args),
    }
    report = {"settings": meta, "results": records}
    table = format_table(records, args.heads, args.classes)
    if budget is not None:
        meta.update(max_batch_budget_gb=budget, max_batch_limit=args.max_batch_limit)
        report["max_batch"] = max_batches
        max_table = format_max_batch_table(max_batches, args.heads, args.classes)
        table += (f"\n\nLargest batch whose training step fits {budget:g} GiB "
                  f"(search limit {args.max_batch_limit}; '>= N': the limit fits):\n\n" + max_table)
        print(max_table)
    (out / "memory.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "memory.md").write_text(table + "\n")
    plot(records, args.heads, out / "memory.png", meta, max_batches)
    return records


def command_line(args) -> str:
    """The `scaleseg bench memory` command that reproduces this run (recorded in memory.json)."""
    parts = ["scaleseg bench memory", "--classes", ",".join(map(str, args.classes)), "--heads", ",".join(args.heads),
             "--backbone", args.backbone, "--batch", str(args.batch), "--crop", str(args.crop), "--device", args.device,
             "--steps", str(args.steps), "--loss-resolution", args.loss_resolution]
    if args.limit_gb:
        parts += ["--limit-gb", f"{args.limit_gb:g}"]
    if getattr(args, "max_batch", None) is not None:
        parts += ["--max-batch", f"{args.max_batch:g}", "--max-batch-limit", str(args.max_batch_limit)]
    for override in args.set or []:
        parts += ["--set", override]
    return " ".join(parts + ["--out", str(args.out)])


def _cell(record: dict) -> str:
    if record["status"] == "ok":
        return f"{record['step_mb']:,.0f} ({record['peak_mb']:,.0f})"
    return record["status"].upper()


def format_table(records: list[dict], heads: list[str], classes: list[int]) -> str:
    """Markdown: rows = heads, columns = C; cells 'step MiB (peak MiB)' or OOM/KILLED/ERROR."""
    by = {(r["head"], r["num_classes"]): r for r in records}
    lines = ["| head | " + " | ".join(f"C = {c:,}" for c in classes) + " |", "| --- |" + " --- |" * len(classes)]
    for h in heads:
        lines.append(f"| {h} | " + " | ".join(_cell(by[(h, c)]) for c in classes) + " |")
    return "\n".join(lines)


def _max_batch_cell(record: dict) -> str:
    if record["max_batch"] is None:
        return "ERROR"
    if record["max_batch"] == 0:
        return "none"  # batch 2 does not fit
    return (">= " if record["at_limit"] else "") + str(record["max_batch"])


def format_max_batch_table(records: list[dict], heads: list[str], classes: list[int]) -> str:
    """Markdown: rows = heads, columns = C; cells the largest batch that fits ('>= N' at the search
    limit, 'none' when batch 2 does not fit)."""
    by = {(r["head"], r["num_classes"]): r for r in records}
    lines = ["| head | " + " | ".join(f"C = {c:,}" for c in classes) + " |", "| --- |" + " --- |" * len(classes)]
    for h in heads:
        lines.append(f"| {h} | " + " | ".join(_max_batch_cell(by[(h, c)]) for c in classes) + " |")
    return "\n".join(lines)


def plot(records: list[dict], heads: list[str], path: Path, meta: dict, max_batches: list[dict] | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if max_batches:
        fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 4.5))
        for h in heads:
            rows = sorted((r for r in max_batches if r["head"] == h and r["max_batch"] is not None),
                          key=lambda r: r["num_classes"])
            ax2.plot([r["num_classes"] for r in rows], [r["max_batch"] for r in rows], marker="o", label=h)
        ax2.axhline(meta["max_batch_limit"], color="grey", linestyle="--", linewidth=1, label="search limit")
        ax2.set_xscale("log")
        ax2.set(xlabel="number of classes C", ylabel="largest batch that fits (0: none)",
                title=f"max batch in {meta['max_batch_budget_gb']:g} GiB (search limit {meta['max_batch_limit']})")
        ax2.grid(alpha=0.3, which="both")
        ax2.legend()
    else:
        fig, ax = plt.subplots(figsize=(7, 4.5))
    for h in heads:
        ok = [r for r in records if r["head"] == h and r["status"] == "ok"]
        failed = [r for r in records if r["head"] == h and r["status"] != "ok"]
        line, = ax.plot([r["num_classes"] for r in ok], [r["step_mb"] for r in ok], marker="o", label=h)
        if failed and ok:
            top = max(r["step_mb"] for r in records if r["status"] == "ok")
            ax.scatter([r["num_classes"] for r in failed], [top * 1.15] * len(failed), marker="x", s=80,
                       color=line.get_color(), label=f"{h}: out of memory")
    ax.set_xscale("log")
    ax.set(xlabel="number of classes C", ylabel="training-step memory (MiB)",
           title=f"{meta['backbone']}, batch {meta['batch']}, crop {meta['crop']}, {meta['device']}"
                 + (f", {meta['limit_gb']:g} GiB limit" if meta.get("limit_gb") else ""))
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
