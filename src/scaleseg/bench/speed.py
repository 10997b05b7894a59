"""Training-step and inference time versus the number of classes (ESS supplementary Table 1).

For each (head, C) a fresh Python process (`scaleseg.bench.harness`) builds the model and
optimizer with random inputs of the chosen batch and crop and times, after `warmup` untimed
repetitions, `repeats` repetitions of:

* inference per image: `model.eval()`, `torch.no_grad()`, batch 1 at the crop size, the model's
  dense map (`dense`) then the decision (`decide`: argmax for the linear scorer, nearest class
  embedding for ESS);
* a training step, in contiguous parts (so the parts add up to the step):
    forward      backbone + decoder + the head's 1x1 conv,
    search       ESS kNN only: the nearest-class search of ESS Eq. 6 (per pixel, per block of
                 pixels or through the approximate index), section "scaleseg.search",
    loss         the head's loss on the scores without the search and the regulariser
                 (upsampling, normalisation, cross-entropy),
    regularizer  the max-margin regulariser (ESS Eq. 7), section "scaleseg.regularizer", without
                 its refreshes,
    refresh      refreshes of the class index and the regulariser's cached pairs that fell in
                 the step (sections "scaleseg.index", "scaleseg.regularizer.refresh"),
    backward     `loss.backward()`,
    optimizer    `optimizer.step()`, the model's `after_optimizer_step()` and `zero_grad`.
  The sections are `torch.profiler.record_function` labels placed in the library code and timed by
  a `scaleseg.profiling.SectionTimer`; nothing is patched.
* the refreshes on their own: one class-index rebuild and one refresh of the regulariser's pairs,
  each timed once after the steps, and their cost per step amortised over their intervals
  (`index_refresh`, `margin_refresh`): `step + refreshes` is the median step without in-step
  refreshes plus those amortised costs.

On CUDA every part is bracketed by `torch.cuda.synchronize`; on CPU `time.perf_counter` alone.
Each part is reported as median, min, max and quartiles over the repeats.

Separately, per C, the nearest-class search itself: `knn_pixels` random unit queries against C
random unit class embeddings, k = num_neighbours + 1 (as the loss asks): a large `torch.mm` for
the machine's matmul floor (GFLOP/s), the distance tiles alone (the search's matmuls without any
selection), the previous search (tiled matmul + running top-k merge), ours (`nearest_classes`),
FAISS's exact flat index where `faiss` imports, and the approximate `ClassIndex` (torch and FAISS
IVF), with its recall of the exact k nearest.

A configuration that runs out of memory (CUDA OOM, a failed allocation under `--limit-gb` on
CPU, a process killed by the kernel) is recorded as such, as in `scaleseg bench memory`.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import platform
import statistics
import time
from pathlib import Path

from scaleseg.bench import harness
from scaleseg.bench.memory import HEADS, KNN_HEADS
from scaleseg.errors import ConfigError

DEFAULT_SPEED_CLASSES = (19, 1284, 20000)
DEFAULT_KNN_PIXELS = 2 * 256 * 256 // 16  # the stride-4 decoder grid of a batch of two 256x256 crops
TRAIN_PARTS = ("forward", "search", "loss", "regularizer", "refresh", "backward", "optimizer")
INFER_PARTS = ("dense", "decide")
SEARCH_METHODS = ("tiles only", "merge", "torch", "faiss", "ivf", "faiss ivf")


# ---------------------------------------------------------------------------------------------
# argument checks (in the parent, before any process starts)


def parse_classes(text: str) -> list[int]:
    """'19,1284,20000' -> [19, 1284, 20000]; anything else is a ConfigError naming the item."""
    items = [item.strip() for item in str(text).split(",")]
    if not any(items):
        raise ConfigError(f"--classes {text!r} is empty; give comma-separated class counts, e.g. 19,1284,20000")
    classes = []
    for item in items:
        if not item:
            raise ConfigError(f"--classes {text!r} has an empty item; give comma-separated class counts, e.g. 19,1284,20000")
        try:
            value = int(item)
        except ValueError:
            raise ConfigError(f"--classes {text!r}: {item!r} is not a whole number; give e.g. 19,1284,20000") from None
        if value < 2:
            raise ConfigError(f"--classes {text!r}: {value} classes is too few; each count must be >= 2")
        classes.append(value)
    return classes


def parse_head(spec: str) -> tuple[str, int | None]:
    """'ess-knn' -> ('ess-knn', None); 'ess-knn@20000' -> ('ess-knn', 20000): the head runs only at
    class counts up to 20,000 (its cells beyond are 'skipped': e.g. the exact search at 10^6 classes)."""
    head, _, limit = spec.partition("@")
    if not limit:
        return head, None
    try:
        return head, int(limit)
    except ValueError:
        raise ConfigError(f"--heads {spec!r}: {limit!r} after '@' is not a class count; e.g. ess-knn@20000") from None


def check_args(args) -> None:
    """Heads, class counts and counts of repetitions; a bad --set fails here, naming the key."""
    from scaleseg.config import load_config

    unknown = [h for h in (parse_head(spec)[0] for spec in args.heads) if h not in HEADS]
    if unknown or not args.heads:
        raise ConfigError(f"unknown head {(unknown or [''])[0]!r} for --heads; choose from {', '.join(HEADS)}")
    if args.repeats < 1:
        raise ConfigError(f"--repeats {args.repeats}: need at least 1 timed repetition")
    if args.warmup < 0:
        raise ConfigError(f"--warmup {args.warmup}: must be >= 0")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("--device cuda but no CUDA device is available here; use --device cpu or auto")
    if args.knn_pixels < 0:
        raise ConfigError(f"--knn-pixels {args.knn_pixels}: must be >= 0 (0 skips the search-backend comparison)")
    if getattr(args, "rounds", 1) < 1:
        raise ConfigError(f"--rounds {args.rounds}: need at least 1 round")
    # the settings every child will use, so a bad batch, backbone or --set fails once, here
    cfg = load_config(None, [f"model.backbone={args.backbone}", f"data.batch_size={args.batch}", *(args.set or [])])
    if args.crop < 16:
        raise ConfigError(f"--crop {args.crop}: too small for the backbone's stride-16 features; use 16 or more")
    k = cfg.model.head.embedding.num_neighbours
    if any(parse_head(h)[0] in KNN_HEADS for h in args.heads) and min(args.classes) <= k:
        raise ConfigError(
            f"--classes {','.join(map(str, args.classes))}: the kNN heads ({', '.join(KNN_HEADS)}) draw k = {k} "
            f"negatives per pixel, so every class count must be > {k}"
        )


# ---------------------------------------------------------------------------------------------
# measurement (in the child process)


def summarize(samples: list[float]) -> dict:
    """Median, min, max and quartiles (seconds) of timed repetitions, with the samples."""
    s = sorted(samples)
    q1, q3 = (statistics.quantiles(s, n=4, method="inclusive")[::2] if len(s) > 1 else (s[0], s[0]))
    return {"median": statistics.median(s), "min": s[0], "max": s[-1], "q1": q1, "q3": q3, "samples": list(samples)}


def _config(job: dict):
    from scaleseg.config import load_config

    return load_config(None, [*HEADS[job["head"]], f"data.num_classes={job['num_classes']}",
                              f"model.backbone={job['backbone']}", f"model.head.loss_resolution={job['loss_resolution']}",
                              f"data.batch_size={job['batch']}", *job["overrides"]])


def _build(job: dict):
    import torch

    from scaleseg.engine.optim import build_optimizer
    from scaleseg.engine.runtime import configure_determinism
    from scaleseg.models import build_model

    dev = torch.device(job["device"])
    cfg = _config(job)
    configure_determinism(False)  # as in training: cuDNN picks its fastest kernels during the warm-up
    torch.manual_seed(0)
    model = build_model(cfg.model, job["num_classes"], ignore_index=-1).to(dev)
    optimizer = build_optimizer(model, cfg.optim)
    return model, optimizer, dev, cfg


def _scorer(model):
    """The (first) class scorer of the head: the single-level head's, or the pyramid's level 0."""
    head = model.head
    return head.scorer if hasattr(head, "scorer") else head.scorers[0]


def search_queries(job: dict, cfg) -> int:
    """The queries one training step's nearest-class search makes: the loss grid's pixels (all
    labelled here), one per block of `search_block` x `search_block` of them."""
    side = job["crop"] if job["loss_resolution"] == "full" else -(-job["crop"] // 4)
    block = cfg.model.head.embedding.search_block
    return job["batch"] * (-(-side // block)) ** 2


def measure_inference(model, dev, crop: int, num_classes: int, warmup: int, repeats: int, sync) -> dict:
    """Seconds per image (batch 1): dense map, decision, and their sum."""
    import torch

    from scaleseg.models.heads.scorers import deciding_one_view

    image = torch.randn(1, 3, crop, crop, device=dev)
    model.eval()
    times = {part: [] for part in (*INFER_PARTS, "total")}
    with torch.no_grad(), deciding_one_view():  # one view, as `predict_labels` decides it
        for i in range(warmup + repeats):
            sync()
            t0 = time.perf_counter()
            dense = model.dense(image)  # (1, K, crop, crop)
            sync()
            t1 = time.perf_counter()
            labels = model.decide(dense)  # (1, crop, crop)
            sync()
            t2 = time.perf_counter()
            assert labels.shape == (1, crop, crop) and int(labels.max()) < num_classes
            del dense, labels
            if i >= warmup:
                for part, value in zip((*INFER_PARTS, "total"), (t1 - t0, t2 - t1, t2 - t0)):
                    times[part].append(value)
    return {"status": "ok", "parts": {part: summarize(v) for part, v in times.items()}}


def measure_training(model, optimizer, dev, batch: int, crop: int, num_classes: int, warmup: int, repeats: int,
                     sync, uses_search: bool) -> dict:
    """Seconds per training step and per part (see the module docstring); the parts are
    contiguous, so they add up to the step's total."""
    import torch

    from scaleseg.losses.margin import REFRESH
    from scaleseg.profiling import INDEX, REGULARIZER, SEARCH, SectionTimer

    images = torch.randn(batch, 3, crop, crop, device=dev)
    target = torch.randint(0, num_classes, (batch, crop, crop), device=dev)
    model.train()
    optimizer.zero_grad(set_to_none=True)
    cache = getattr(_scorer(model), "margin_cache", None)
    per_step_search = cache is not None and cache.refresh == 1  # the exact regulariser: its search is its cost
    times = {part: [] for part in (*TRAIN_PARTS, "total")}
    with SectionTimer(sync) as sections:
        for i in range(warmup + repeats):
            sections.reset()
            sync()
            t0 = time.perf_counter()
            outputs = model(images)
            sync()
            t1 = time.perf_counter()
            loss = model.loss(outputs, target)["loss"]
            sync()
            t2 = time.perf_counter()
            loss.backward()
            sync()
            t3 = time.perf_counter()
            optimizer.step()
            model.after_optimizer_step()
            optimizer.zero_grad(set_to_none=True)
            sync()
            t4 = time.perf_counter()
            del outputs, loss
            sec = sections.seconds
            if uses_search and not sections.calls.get(SEARCH):
                raise RuntimeError("the kNN loss entered no 'scaleseg.search' section: the labels in the library moved")
            margin_refresh = 0.0 if per_step_search else sec.get(REFRESH, 0.0)
            refresh = sec.get(INDEX, 0.0) + margin_refresh
            regularizer = sec.get(REGULARIZER, 0.0) - margin_refresh
            search = sec.get(SEARCH, 0.0)
            if i >= warmup:
                step = {"forward": t1 - t0, "search": search,
                        "loss": (t2 - t1) - search - regularizer - refresh, "regularizer": regularizer,
                        "refresh": refresh, "backward": t3 - t2, "optimizer": t4 - t3, "total": t4 - t0}
                for part, value in step.items():
                    times[part].append(value)
    parts = {part: summarize(v) for part, v in times.items()}
    if not uses_search:
        parts["search"] = None
    if cache is None:
        parts["regularizer"] = None
    return {"status": "ok", "parts": parts}


def measure_refreshes(model, sync) -> dict:
    """One rebuild of the class index and one refresh of the regulariser's pairs, timed on the
    current table, with their intervals and their cost per step amortised over them."""
    import torch

    scorer = _scorer(model)
    out = {}
    with torch.no_grad():
        classes = scorer.classes()
        index = scorer.class_index
        if index is not None:
            sync()
            t = time.perf_counter()
            index.rebuild(classes, scorer.search["budget_bytes"])
            sync()
            seconds = time.perf_counter() - t
            out["index"] = {"seconds": seconds, "every": index.refresh, "per_step": seconds / index.refresh,
                            "clusters": index.num_clusters, "probes": index.probes}
        cache = getattr(scorer, "margin_cache", None)
        if cache is not None:
            sync()
            t = time.perf_counter()
            cache.refresh_partners(classes, index=index, **scorer.search)
            sync()
            seconds = time.perf_counter() - t
            # refresh = 1: the exact regulariser, whose search is then part of every step's regulariser time
            out["margin"] = {"seconds": seconds, "every": cache.refresh,
                             "per_step": seconds / cache.refresh if cache.refresh > 1 else 0.0}
    return out


def measure_config(job: dict) -> dict:
    """One (head, C) in this process: inference, then training, each recorded (or its OOM)."""
    import gc

    import torch

    model, optimizer, dev, cfg = _build(job)
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    knn = job["head"] in KNN_HEADS
    record = {"threads": torch.get_num_threads(), "search_queries": search_queries(job, cfg) if knn else None}
    if not job.get("inference", True):
        record["inference"] = {"status": "skipped", "detail": "--no-inference"}
    phases = (
        ("inference", lambda: measure_inference(model, dev, job["crop"], job["num_classes"], job["warmup"],
                                                job["repeats"], sync)),
        ("train", lambda: measure_training(model, optimizer, dev, job["batch"], job["crop"], job["num_classes"],
                                           job["warmup"], job["repeats"], sync, knn)),
    )
    for name, run in phases:
        if name in record:
            continue
        try:
            record[name] = run()
        except (MemoryError, RuntimeError) as exc:  # torch.OutOfMemoryError is a RuntimeError
            if not harness.is_oom(exc):
                raise
            record[name] = harness.oom_record(exc)
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    if record["train"]["status"] == "ok" and hasattr(_scorer(model), "class_index"):
        record["refreshes"] = measure_refreshes(model, sync)
        train = record["train"]["parts"]
        steady = summarize([t - r for t, r in zip(train["total"]["samples"], train["refresh"]["samples"])])
        amortised = sum(r["per_step"] for r in record["refreshes"].values())
        record["train"]["step_with_refreshes"] = steady["median"] + amortised
    return record


def _merge_search(q, c, k: int, rows: int = 1024, cols: int = 4096):
    """The previous exact search, for comparison: tiled addmm with a running top-k merge."""
    import torch

    c_sq = c.pow(2).sum(1)
    out = torch.empty((q.shape[0], k), dtype=torch.int64)
    for r0 in range(0, q.shape[0], rows):
        best_val = best_idx = None
        for c0 in range(0, c.shape[0], cols):
            dist = torch.addmm(c_sq[c0 : c0 + cols], q[r0 : r0 + rows], c[c0 : c0 + cols].T, alpha=-2.0)
            if best_val is None:
                best_val, best_idx = dist.topk(min(k, dist.shape[1]), dim=1, largest=False, sorted=True)
                continue
            merged = torch.cat([best_val, dist], dim=1)
            best_val, pos = merged.topk(k, dim=1, largest=False, sorted=True)
            old = best_idx.gather(1, pos.clamp(max=best_idx.shape[1] - 1))
            best_idx = torch.where(pos < best_idx.shape[1], old, pos - best_idx.shape[1] + c0)
        out[r0 : r0 + rows] = best_idx
    return out


def _tiles_only(q, c, k: int, budget: int):
    """The search's distance tiles (the same tile shapes), with no selection: its matmul floor."""
    import torch

    from scaleseg.search import tile_shape

    rows, cols = tile_shape(q.shape[0], c.shape[0], k, budget)
    c_sq = c.pow(2).sum(1)
    for r0 in range(0, q.shape[0], rows):
        for c0 in range(0, c.shape[0], cols):
            torch.addmm(c_sq[c0 : c0 + cols], q[r0 : r0 + rows], c[c0 : c0 + cols].T, alpha=-2.0)


def matmul_floor(device, sync, size: int = 2048, repeats: int = 3) -> float:
    """GFLOP/s of a large square float32 `torch.mm` (best of `repeats`): this machine's matmul floor."""
    import torch

    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    torch.mm(a, b)
    best = math.inf
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        torch.mm(a, b)
        sync()
        best = min(best, time.perf_counter() - t)
    return 2 * size**3 / best / 1e9


def compare_backends(num_classes: int, pixels: int, device: str, warmup: int, repeats: int,
                     overrides: list[str] = (), seed: int = 0) -> dict:
    """The nearest-class search on random unit vectors, every method of SEARCH_METHODS: times,
    GFLOP/s (2 N C d / time) and agreement with our exact search.

    agree_sets: fraction of queries whose k neighbours are the same set as the exact search's (what
    the loss uses); agree_top1: fraction whose nearest class is the same (what inference uses);
    recall: fraction of the exact k nearest found (the approximate index)."""
    import torch
    import torch.nn.functional as F

    from scaleseg.config import load_config
    from scaleseg.search import ClassIndex, index_recall, nearest_classes

    emb = load_config(None, list(overrides)).model.head.embedding
    k = min(emb.num_neighbours + 1, num_classes)
    dev = torch.device(device)
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    gen = torch.Generator().manual_seed(seed)
    queries = F.normalize(torch.randn(pixels, emb.embed_dim, generator=gen), dim=1).to(dev)  # (N, d)
    classes = F.normalize(torch.rand(num_classes, emb.embed_dim, generator=gen) * 2 - 1, dim=1).to(dev)  # (C, d)
    budget = emb.search_budget_mb * 2**20
    flops = 2 * pixels * num_classes * emb.embed_dim
    record = {"num_classes": num_classes, "queries": pixels, "k": k, "embed_dim": emb.embed_dim,
              "budget_mb": emb.search_budget_mb, "matmul_gflops": matmul_floor(dev, sync)}
    try:
        import faiss
    except ImportError:
        faiss = None
    record["faiss_version"] = getattr(faiss, "__version__", None) if faiss else None
    index = ClassIndex(num_classes, emb.embed_dim, emb.index_clusters, emb.index_probes).to(dev)
    sync()
    t = time.perf_counter()
    index.rebuild(classes, budget)
    sync()
    record["index"] = {"clusters": index.num_clusters, "probes": index.probes, "build_seconds": time.perf_counter() - t}
    methods = {
        "tiles only": lambda: _tiles_only(queries, classes, k, budget),
        "merge": lambda: _merge_search(queries, classes, k),
        "torch": lambda: nearest_classes(queries, classes, k, budget_bytes=budget),
        "faiss": lambda: nearest_classes(queries, classes, k, backend="faiss"),
        "ivf": lambda: index.search(queries, classes, k, budget_bytes=budget),
        "faiss ivf": lambda: index.search(queries, classes, k, backend="faiss"),
    }
    found = {}
    for name, run in methods.items():
        if name.startswith("faiss") and faiss is None:
            record[name] = {"status": "not installed"}
            continue
        times = []
        try:
            for i in range(warmup + repeats):
                sync()
                t = time.perf_counter()
                result = run()
                sync()
                if i >= warmup:
                    times.append(time.perf_counter() - t)
        except (MemoryError, RuntimeError) as exc:
            if not harness.is_oom(exc):
                raise
            record[name] = harness.oom_record(exc)
            continue
        record[name] = {"status": "ok", **summarize(times), "gflops": flops / statistics.median(times) / 1e9}
        if result is not None:
            found[name] = result.cpu()
    exact = found["torch"]
    for name, result in found.items():
        record[name]["agree_sets"] = float((result.sort(dim=1).values == exact.sort(dim=1).values).all(dim=1).float().mean())
        record[name]["agree_top1"] = float((result[:, 0] == exact[:, 0]).float().mean())
        record[name]["recall"] = index_recall(result, exact)
    # the agreement of the exact backends, where both ran (the earlier report's fields)
    if "faiss" in found:
        record["agree_sets"], record["agree_top1"] = record["faiss"]["agree_sets"], record["faiss"]["agree_top1"]
    return record


def run_job(job: dict) -> dict:
    """One job (a (head, C) configuration, or one C of the backend comparison) in this process."""
    try:
        if job["kind"] == "knn":
            return compare_backends(job["num_classes"], job["pixels"], job["device"], job["warmup"], job["repeats"],
                                    job["overrides"])
        return measure_config(job)
    except (MemoryError, RuntimeError) as exc:
        if not harness.is_oom(exc):
            raise
        return harness.oom_record(exc)


# ---------------------------------------------------------------------------------------------
# orchestration (in the parent)


def run_child(job: dict) -> dict:
    """One job in a fresh interpreter, so that runs do not disturb each other."""
    return harness.run_child("scaleseg.bench.speed:run_job", job)


def _normalize_config_record(head: str, num_classes: int, raw: dict) -> dict:
    """Every (head, C) record has 'inference' and 'train' phases, each with a status."""
    record = {"head": head, "num_classes": num_classes, "threads": raw.get("threads")}
    for phase in ("inference", "train"):
        record[phase] = raw.get(phase) or {"status": raw.get("status", "error"), "detail": raw.get("detail", "")}
    if record["train"]["status"] == "ok":
        record["train"]["search_queries"] = raw.get("search_queries")
    if raw.get("refreshes") is not None:
        record["refreshes"] = raw["refreshes"]
    return record


def _load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (other work sharing the machine), where the OS says."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def machine_info(device) -> dict:
    import torch

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
        with contextlib.suppress(OSError):
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    try:
        import faiss

        faiss_version = getattr(faiss, "__version__", "unknown")
    except ImportError:
        faiss_version = None
    return {
        "device": str(device), "device_name": name, "cpu_count": os.cpu_count(), "torch": torch.__version__,
        "load_average": _load_average(),
        "cuda": torch.version.cuda, "faiss": faiss_version, "python": platform.python_version(),
        "platform": platform.platform(), "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }


def command_line(args) -> str:
    """The `scaleseg bench speed` command that reproduces this run (recorded in speed.json)."""
    parts = ["scaleseg bench speed", "--classes", ",".join(map(str, args.classes)), "--heads", ",".join(args.heads),
             "--backbone", args.backbone, "--batch", str(args.batch), "--crop", str(args.crop), "--device", args.device,
             "--loss-resolution", args.loss_resolution, "--warmup", str(args.warmup), "--repeats", str(args.repeats),
             "--knn-pixels", str(args.knn_pixels)]
    if getattr(args, "rounds", 1) != 1:
        parts += ["--rounds", str(args.rounds)]
    if getattr(args, "no_inference", False):
        parts.append("--no-inference")
    if args.limit_gb:
        parts += ["--limit-gb", f"{args.limit_gb:g}"]
    for override in args.set or []:
        parts += ["--set", override]
    return " ".join(parts + ["--out", str(args.out)])


def run_benchmark(args) -> dict:
    """Every (head, C) and every C of the backend comparison, one process each, with a progress
    bar; writes speed.json (also after every job, so a long run can be read while it goes),
    speed.md and speed.png into args.out and returns the report."""
    from tqdm import tqdm

    from scaleseg.engine.runtime import select_device

    device = select_device(args.device)
    specs = [parse_head(h) for h in args.heads]
    heads, limits = [h for h, _ in specs], {h: limit for h, limit in specs if limit is not None}
    common = {"device": str(device), "warmup": args.warmup, "repeats": args.repeats, "overrides": list(args.set or []),
              "limit_gb": args.limit_gb}
    inference = not getattr(args, "no_inference", False)
    jobs = [{"kind": "config", "head": h, "num_classes": c, "backbone": args.backbone, "batch": args.batch,
             "crop": args.crop, "loss_resolution": args.loss_resolution, "inference": inference, **common}
            for h in heads for c in args.classes]
    if args.knn_pixels:
        jobs += [{"kind": "knn", "num_classes": c, "pixels": args.knn_pixels, **common} for c in args.classes]
    settings = {
        "heads": heads, "head_limits": limits, "classes": list(args.classes), "backbone": args.backbone,
        "batch": args.batch, "crop": args.crop, "loss_resolution": args.loss_resolution, "warmup": args.warmup,
        "repeats": args.repeats, "knn_pixels": args.knn_pixels, "limit_gb": args.limit_gb,
        "overrides": list(args.set or []), "command": command_line(args),
    }
    rounds = getattr(args, "rounds", 1)
    settings["rounds"] = rounds
    report = {"settings": settings, "machine": machine_info(device), "results": [], "knn_backends": []}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    raws: dict[int, list[dict]] = {i: [] for i in range(len(jobs))}
    bar = tqdm(total=rounds * len(jobs), desc="bench speed", unit="config", disable=args.no_progress)
    for r in range(rounds):  # round by round, so that load drifting over the run hits every job alike
        for i, job in enumerate(jobs):
            bar.set_postfix_str(f"{job.get('head', 'search')} C={job['num_classes']} round {r + 1}/{rounds}")
            skipped = job["kind"] == "config" and job["num_classes"] > limits.get(job["head"], math.inf)
            raws[i].append({"status": "skipped", "detail": f"C > {limits.get(job.get('head'))}"} if skipped
                           else run_child(job))
            bar.update(1)
            _fill(report, jobs, raws)
            (out / "speed.json").write_text(json.dumps(report, indent=2) + "\n")
    bar.close()
    report["machine"]["load_average_end"] = _load_average()
    (out / "speed.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "speed.md").write_text(format_markdown(report))
    plot(report, out / "speed.png")
    return report


def _fill(report: dict, jobs: list[dict], raws: dict[int, list[dict]]) -> None:
    """report["results"] and ["knn_backends"] from the rounds run so far, merged per job."""
    report["results"], report["knn_backends"] = [], []
    for i, job in enumerate(jobs):
        if not raws[i]:
            continue
        raw = merge_rounds(raws[i])
        if job["kind"] == "knn":
            report["knn_backends"].append({"num_classes": job["num_classes"], "queries": job["pixels"], **raw})
        else:
            report["results"].append(_normalize_config_record(job["head"], job["num_classes"], raw))


def _merge_parts(phases: list[dict]) -> dict:
    """One phase record from several rounds: every part's samples pooled and summarised again."""
    merged = dict(phases[0])
    merged["parts"] = {}
    for part, stats in phases[0]["parts"].items():
        merged["parts"][part] = (None if stats is None else
                                 summarize([x for p in phases for x in p["parts"][part]["samples"]]))
    merged["round_medians"] = [p["parts"]["total"]["median"] for p in phases]
    return merged


def merge_rounds(raws: list[dict]) -> dict:
    """The record of one job run in several rounds (each its own process): timed samples pooled;
    a round that failed makes the whole record that failure."""
    if len(raws) == 1:
        return raws[0]
    bad = next((r for r in raws if r.get("status") not in (None, "ok")), None)
    if bad is not None:
        return bad
    merged = dict(raws[0])
    if "torch" in raws[0]:  # a search-method comparison
        for name, first in raws[0].items():
            if isinstance(first, dict) and first.get("status") == "ok" and "samples" in first:
                if all(r.get(name, {}).get("status") == "ok" for r in raws):
                    samples = [x for r in raws for x in r[name]["samples"]]
                    flops = first["gflops"] * first["median"]
                    merged[name] = {**first, **summarize(samples), "gflops": flops / statistics.median(samples)}
        return merged
    for phase in ("inference", "train"):
        phases = [r.get(phase) for r in raws]
        if all(p and p.get("status") == "ok" for p in phases):
            merged[phase] = _merge_parts(phases)
        else:
            merged[phase] = next(p for p in phases if not p or p.get("status") != "ok") or {"status": "error"}
    if merged["train"].get("status") == "ok" and raws[0].get("refreshes") is not None:
        refreshes = {}
        for kind in raws[0]["refreshes"]:
            seconds = statistics.median(r["refreshes"][kind]["seconds"] for r in raws)
            first = raws[0]["refreshes"][kind]
            refreshes[kind] = {**first, "seconds": seconds,
                               "per_step": seconds / first["every"] if first["per_step"] else 0.0}
        merged["refreshes"] = refreshes
        train = merged["train"]["parts"]
        steady = statistics.median(t - r for t, r in zip(train["total"]["samples"], train["refresh"]["samples"]))
        merged["train"]["step_with_refreshes"] = steady + sum(x["per_step"] for x in refreshes.values())
    return merged


# ---------------------------------------------------------------------------------------------
# Markdown and plot


def _unit(seconds: float) -> tuple[float, str]:
    if seconds >= 1:
        return 1.0, "s"
    if seconds >= 1e-3:
        return 1e3, "ms"
    return 1e6, "µs"


def _num(value: float) -> str:
    return f"{value:,.3g}" if value < 1000 else f"{value:,.0f}"


def fmt_time(seconds: float) -> str:
    """2.345 -> '2.35 s', 0.01234 -> '12.3 ms', 5e-5 -> '50 µs' (three significant digits)."""
    scale, unit = _unit(seconds)
    return f"{_num(seconds * scale)} {unit}"


def fmt_stats(stats: dict | None) -> str:
    """'median (min–max)' in the median's unit; '–' where the part does not apply."""
    if stats is None:
        return "–"
    scale, unit = _unit(stats["median"])
    return f"{_num(stats['median'] * scale)} {unit} ({_num(stats['min'] * scale)}–{_num(stats['max'] * scale)})"


def _status_cell(status: str) -> str:
    return "–" if status == "skipped" else status.upper()


def _phase_cell(phase: dict, part: str = "total") -> str:
    if phase["status"] != "ok":
        return _status_cell(phase["status"])
    return fmt_stats(phase["parts"][part])


def _by_c_table(records: list[dict], heads: list[str], classes: list[int], phase: str) -> str:
    """Rows = heads, columns = C; cells 'median (min–max)' of `phase`'s total, or OOM/KILLED/ERROR."""
    by = {(r["head"], r["num_classes"]): r for r in records}
    lines = ["| head | " + " | ".join(f"C = {c:,}" for c in classes) + " |", "| --- |" + " --- |" * len(classes)]
    for h in heads:
        lines.append(f"| {h} | " + " | ".join(_phase_cell(by[(h, c)][phase]) for c in classes) + " |")
    return "\n".join(lines)


def train_table(records: list[dict], heads: list[str], classes: list[int]) -> str:
    """Seconds per training step, per head and C."""
    return _by_c_table(records, heads, classes, "train")


def inference_table(records: list[dict], heads: list[str], classes: list[int]) -> str:
    """Seconds per image (dense + decide), per head and C."""
    return _by_c_table(records, heads, classes, "inference")


def breakdown_table(records: list[dict], heads: list[str], classes: list[int]) -> str:
    """Rows = (head, C), columns = the parts of a training step and the total."""
    by = {(r["head"], r["num_classes"]): r for r in records}
    lines = ["| head | C | " + " | ".join(TRAIN_PARTS) + " | total |", "| --- | ---: |" + " --- |" * (len(TRAIN_PARTS) + 1)]
    for h in heads:
        for c in classes:
            train = by[(h, c)]["train"]
            if train["status"] == "skipped":
                continue
            if train["status"] != "ok":
                cells = [_status_cell(train["status"])] * (len(TRAIN_PARTS) + 1)
            else:
                cells = [fmt_stats(train["parts"][p]) for p in (*TRAIN_PARTS, "total")]
            lines.append(f"| {h} | {c:,} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def refresh_table(records: list[dict]) -> str:
    """Rows = (head, C) with a class index or a cached regulariser: each refresh's time and interval,
    their cost per step amortised, and the step with it."""
    lines = ["| head | C | index rebuild | every | regulariser refresh | every | amortised per step | step + refreshes |",
             "| --- | ---: | --- | ---: | --- | ---: | --- | --- |"]
    for r in records:
        refreshes = r.get("refreshes")
        if not refreshes or r["train"]["status"] != "ok":
            continue
        index, margin = refreshes.get("index"), refreshes.get("margin")
        cells = [fmt_time(index["seconds"]) if index else "–", f"{index['every']:,}" if index else "–",
                 fmt_time(margin["seconds"]) if margin else "–",
                 (f"{margin['every']:,}" if margin["every"] > 1 else "1 (exact)") if margin else "–",
                 fmt_time(sum(x["per_step"] for x in refreshes.values())), fmt_time(r["train"]["step_with_refreshes"])]
        lines.append(f"| {r['head']} | {r['num_classes']:,} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _method_cell(r: dict, name: str) -> str:
    m = r.get(name) or {"status": "–"}
    if m["status"] != "ok":
        return m["status"].upper() if m["status"] != "–" else "–"
    text = f"{fmt_stats(m)}, {m['gflops']:,.1f} GFLOP/s"
    if name in ("ivf", "faiss ivf"):
        text += f", recall {100 * m['recall']:.1f}%"
    elif name not in ("tiles only", "torch"):
        same = "same sets" if m["agree_sets"] == 1.0 else f"{100 * m['agree_sets']:.2f}% same sets"
        text += f", {same}"
    return text


def knn_table(knn: list[dict]) -> str:
    """Rows = C: each search method's time, GFLOP/s (2 N C d / time) and agreement with the exact search."""
    lines = ["| C | queries | k | matmul floor | " + " | ".join(SEARCH_METHODS) + " |",
             "| ---: | ---: | ---: | ---: |" + " --- |" * len(SEARCH_METHODS)]
    for r in knn:
        if "torch" not in r:  # the whole job failed
            lines.append(f"| {r['num_classes']:,} | {r['queries']:,} | | | {_status_cell(r['status'])} |"
                         + " |" * (len(SEARCH_METHODS) - 1))
            continue
        cells = [_method_cell(r, name) for name in SEARCH_METHODS]
        lines.append(f"| {r['num_classes']:,} | {r['queries']:,} | {r['k']} | {r['matmul_gflops']:,.0f} GFLOP/s | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_markdown(report: dict) -> str:
    """A section ready to paste into docs/benchmarks.md: command, machine, settings, tables, plot."""
    s, m, records = report["settings"], report["machine"], report["results"]
    heads, classes = s["heads"], s["classes"]
    device_type = m["device"].split(":")[0]
    where = (f"{m['device_name']} ({m['device']})" if device_type == "cuda"
             else f"CPU: {m['device_name']}, {m['cpu_count']} cores")
    sync = "`torch.cuda.synchronize` around every timed part" if device_type == "cuda" else "`time.perf_counter`"
    resolution = ("loss at full input resolution (scores bilinearly upsampled to the crop, the paper's setting)"
                  if s["loss_resolution"] == "full" else "loss on the stride-4 decoder grid (labels nearest-downsampled)")
    threads = sorted({r["threads"] for r in records if r.get("threads")})
    load = m.get("load_average")
    load_text = (f" Load average (1/5/15 min, other work on the machine) at the start {'/'.join(map(str, load))}"
                 + (f", at the end {'/'.join(map(str, m['load_average_end']))}" if m.get("load_average_end") else "")
                 + "." if load else "")
    overrides = f" Overrides for every head: `{' '.join(s['overrides'])}`." if s.get("overrides") else ""
    out = [
        "## Training and inference time versus the number of classes",
        "",
        "```",
        s["command"],
        "```",
        "",
        f"Machine: {where}, PyTorch {m['torch']}" + (f", FAISS {m['faiss']}" if m["faiss"] else "")
        + f", {m['date'][:10]}" + (f"; {', '.join(map(str, threads))} PyTorch threads" if threads else "") + ".",
        f"Model: DeepLabV3+ {s['backbone']} (random weights), fp32, batch {s['batch']}, {s['crop']}x{s['crop']} crops, "
        f"{resolution}. Each (head, C) runs in its own process: {s['warmup']} untimed "
        f"repetition{'' if s['warmup'] == 1 else 's'}, then {s['repeats']} timed with {sync}"
        + (f"; the whole list {s['rounds']} times, round by round, the timed repetitions pooled"
           if s.get("rounds", 1) > 1 else "") + ". Cells: median (min–max) over the timed repetitions."
        + (f" OOM: over the {s['limit_gb']:g} GiB address-space limit." if s.get("limit_gb") else "")
        + (" –: not run (" + ", ".join(f"{h} above C = {c:,}" for h, c in s["head_limits"].items()) + ")."
           if s.get("head_limits") else "") + load_text + overrides,
        "",
        "### Training step",
        "",
        "Forward, loss, backward and SGD step (with momentum) of one batch.",
        "",
        train_table(records, heads, classes),
        "",
        "### Where a training step goes",
        "",
        "`forward`: backbone, decoder and the head's 1x1 conv. `search`: the nearest-class search of the kNN loss "
        "(ESS Eq. 6: k + 1 neighbours of every labelled pixel, or of every block of pixels, exact or through the "
        "class index; section `scaleseg.search`). `loss`: the rest of the loss (upsampling, normalisation, "
        "cross-entropy). `regularizer`: the max-margin regulariser (ESS Eq. 7; with `margin_refresh` 1 its C x C "
        "search every step, otherwise the hinge on the cached pairs). `refresh`: index or regulariser refreshes "
        "that fell in a timed step. `backward`: `loss.backward()`. `optimizer`: `optimizer.step()` and `zero_grad`. "
        "The parts are contiguous: per step they add up to the total.",
        "",
        breakdown_table(records, heads, classes),
        "",
        "### Inference per image",
        "",
        f"`model.eval()`, `torch.no_grad()`, one {s['crop']}x{s['crop']} image: the dense map and the decision "
        "(argmax for the baseline, nearest class embedding for ESS).",
        "",
        inference_table(records, heads, classes),
        "",
    ]
    refreshes = refresh_table(records)
    if len(refreshes.splitlines()) > 2:
        out += [
            "### Refreshes, amortised",
            "",
            "The class index (k-means of the table) and the regulariser's cached nearest-class pairs are refreshed "
            "every `index_refresh` / `margin_refresh` steps, so most steps have none: each refresh timed once on "
            "the trained table, its cost per step amortised over its interval, added to the median step.",
            "",
            refreshes,
            "",
        ]
    if report.get("knn_backends"):
        out += [
            "### Nearest-class search methods",
            "",
            f"{s['knn_pixels']:,} random unit queries against C random unit class embeddings, k neighbours each. "
            "GFLOP/s: 2 N C d over the time (the work of the exhaustive distance matrix); the matmul floor is a "
            "2048^3 `torch.mm`. `tiles only`: the exact search's distance tiles with no selection (its matmul "
            "floor); `merge`: the previous search (tiles + running top-k merge); `torch`: ours (group minima, then "
            "re-scoring); `faiss`: FAISS `IndexFlatIP` (exact); `ivf` / `faiss ivf`: the approximate class index "
            "(k-means clusters, probes per query) in torch and in FAISS `IndexIVFFlat`, with the recall of the exact "
            "k nearest. Same sets: queries whose k neighbours equal the exact search's.",
            "",
            knn_table(report["knn_backends"]),
            "",
        ]
    out += [f"![training step and inference time against C](img/speed_{s['backbone']}_{device_type}.png)", ""]
    return "\n".join(out)


def plot(report: dict, path: Path) -> None:
    """Training step and inference time against C (log x, min–max bars), and the step's parts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s, m, records = report["settings"], report["machine"], report["results"]
    heads, classes = s["heads"], s["classes"]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    for ax, phase, ylabel in ((axes[0], "train", "seconds per training step"),
                              (axes[1], "inference", "seconds per image (inference)")):
        for h in heads:
            ok = [r for r in records if r["head"] == h and r[phase]["status"] == "ok"]
            failed = [r for r in records if r["head"] == h and r[phase]["status"] not in ("ok", "skipped")]
            med = [r[phase]["parts"]["total"]["median"] for r in ok]
            lo = [mm - r[phase]["parts"]["total"]["min"] for mm, r in zip(med, ok)]
            hi = [r[phase]["parts"]["total"]["max"] - mm for mm, r in zip(med, ok)]
            line = ax.errorbar([r["num_classes"] for r in ok], med, yerr=[lo, hi], marker="o", capsize=3, label=h)
            if failed:
                top = max([r[phase]["parts"]["total"]["max"] for r in records if r[phase]["status"] == "ok"] or [1.0])
                ax.scatter([r["num_classes"] for r in failed], [top * 1.15] * len(failed), marker="x", s=80,
                           color=line.lines[0].get_color(), label=f"{h}: {failed[0][phase]['status']}")
        ax.set_xscale("log")
        ax.set(xlabel="number of classes C", ylabel=ylabel)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    # stacked parts: one group of bars per C, one bar per head
    ax = axes[2]
    width = 0.8 / max(len(heads), 1)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    labelled = set()
    for i, h in enumerate(heads):
        for j, c in enumerate(classes):
            rec = next(r for r in records if r["head"] == h and r["num_classes"] == c)
            x = j + (i - (len(heads) - 1) / 2) * width
            if rec["train"]["status"] == "skipped":
                continue
            if rec["train"]["status"] != "ok":
                ax.text(x, 0, rec["train"]["status"].upper(), rotation=90, ha="center", va="bottom", fontsize=7)
                continue
            bottom = 0.0
            for k, part in enumerate(TRAIN_PARTS):
                stats = rec["train"]["parts"][part]
                if stats is None:
                    continue
                ax.bar(x, stats["median"], width * 0.9, bottom=bottom, color=colors[k % len(colors)],
                       label=part if part not in labelled else None)
                labelled.add(part)
                bottom += stats["median"]
            ax.text(x, bottom, h, rotation=90, ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(classes)), [f"C = {c:,}" for c in classes])
    ax.set(ylabel="seconds per training step (medians)", title="parts of a training step")
    ax.margins(y=0.25)
    handles, labels = ax.get_legend_handles_labels()
    order = sorted(range(len(labels)), key=lambda i: TRAIN_PARTS.index(labels[i]))
    if handles:
        ax.legend([handles[i] for i in order], [labels[i] for i in order], fontsize=8)
    fig.suptitle(f"{s['backbone']}, batch {s['batch']}, crop {s['crop']}, loss {s['loss_resolution']}, "
                 f"{m['device_name']} ({m['device']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
