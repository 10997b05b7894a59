"""Training-step and inference time versus the number of classes (ESS supplementary Table 1).

For each (head, C) a fresh Python process builds the model and optimizer with random inputs of
the chosen batch and crop and times, after `warmup` untimed repetitions, `repeats` repetitions of:

* inference per image: `model.eval()`, `torch.no_grad()`, batch 1 at the crop size, the model's
  dense map (`dense`) then the decision (`decide`: argmax for the linear scorer, nearest class
  embedding for ESS);
* a training step, in contiguous parts (so the parts add up to the step):
    forward    backbone + decoder + the head's 1x1 conv,
    search     ESS kNN only: the pixels' nearest-class search of Eq. 6, the very call the loss
               makes (`nearest_classes` as called by `scaleseg.losses.knn_ce`, timed in place),
    loss       the head's loss on the scores, without that search (it still holds the
               max-margin regulariser's C x C nearest-class search, reported as `margin_search`),
    backward   `loss.backward()`,
    optimizer  `optimizer.step()` and `zero_grad`.

On CUDA every part is bracketed by `torch.cuda.synchronize`; on CPU `time.perf_counter` alone.
Each part is reported as median, min, max and quartiles over the repeats.

Separately, per C, the nearest-class search itself: `knn_pixels` random unit queries against C
random unit class embeddings, k = num_neighbours + 1 (as the loss asks), with the torch backend
and, where `faiss` imports, the FAISS backend, and how often the two return the same neighbours.

A configuration that runs out of memory (CUDA OOM, a failed allocation under `--limit-gb` on
CPU, a process killed by the kernel) is recorded as such, as in `scaleseg bench memory`.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from scaleseg.bench.memory import HEADS, KNN_HEADS
from scaleseg.errors import ConfigError

DEFAULT_SPEED_CLASSES = (19, 1284, 20000)
DEFAULT_KNN_PIXELS = 2 * 256 * 256 // 16  # the stride-4 decoder grid of a batch of two 256x256 crops
TRAIN_PARTS = ("forward", "search", "loss", "backward", "optimizer")
INFER_PARTS = ("dense", "decide")


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


def check_args(args) -> None:
    """Heads, class counts and counts of repetitions; a bad --set fails here, naming the key."""
    from scaleseg.config import load_config

    unknown = [h for h in args.heads if h not in HEADS]
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
    # the settings every child will use, so a bad batch, backbone or --set fails once, here
    cfg = load_config(None, [f"model.backbone={args.backbone}", f"data.batch_size={args.batch}", *(args.set or [])])
    if args.crop < 16:
        raise ConfigError(f"--crop {args.crop}: too small for the backbone's stride-16 features; use 16 or more")
    k = cfg.model.head.embedding.num_neighbours
    if any(h in KNN_HEADS for h in args.heads) and min(args.classes) <= k:
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


class _CallTimer:
    """Wraps a function and sums the seconds spent in it (synchronising around each call)."""

    def __init__(self, fn, sync) -> None:
        self.fn, self.sync, self.seconds, self.calls, self.rows = fn, sync, 0.0, 0, None

    def __call__(self, *a, **kw):
        self.rows = int(a[0].shape[0])  # the queries (N, d)
        self.sync()
        t = time.perf_counter()
        out = self.fn(*a, **kw)
        self.sync()
        self.seconds += time.perf_counter() - t
        self.calls += 1
        return out

    def reset(self) -> None:
        self.seconds, self.calls = 0.0, 0


@contextlib.contextmanager
def _timed_searches(sync):
    """Times `nearest_classes` where the losses call it: the kNN loss's pixel search and the
    margin regulariser's class-to-class search (their module globals, restored on exit)."""
    from scaleseg.losses import knn_ce, margin

    timers = {"search": _CallTimer(knn_ce.nearest_classes, sync), "margin_search": _CallTimer(margin.nearest_classes, sync)}
    knn_ce.nearest_classes, margin.nearest_classes = timers["search"], timers["margin_search"]
    try:
        yield timers
    finally:
        knn_ce.nearest_classes, margin.nearest_classes = timers["search"].fn, timers["margin_search"].fn


def _is_oom(exc: BaseException) -> bool:
    text = str(exc).lower()
    return isinstance(exc, MemoryError) or "out of memory" in text or "can't allocate memory" in text


def _oom_record(exc: BaseException) -> dict:
    return {"status": "oom", "detail": (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]}


def _build(job: dict):
    import torch

    from scaleseg.config import load_config
    from scaleseg.engine.optim import build_optimizer
    from scaleseg.engine.runtime import configure_determinism
    from scaleseg.models import build_model

    dev = torch.device(job["device"])
    num_classes = job["num_classes"]
    cfg = load_config(None, [*HEADS[job["head"]], f"data.num_classes={num_classes}", f"model.backbone={job['backbone']}",
                             f"model.head.loss_resolution={job['loss_resolution']}", f"data.batch_size={job['batch']}",
                             *job["overrides"]])
    configure_determinism(False)  # as in training: cuDNN picks its fastest kernels during the warm-up
    torch.manual_seed(0)
    model = build_model(cfg.model, num_classes, ignore_index=-1).to(dev)
    optimizer = build_optimizer(model, cfg.optim)
    return model, optimizer, dev


def measure_inference(model, dev, crop: int, num_classes: int, warmup: int, repeats: int, sync) -> dict:
    """Seconds per image (batch 1): dense map, decision, and their sum."""
    import torch

    image = torch.randn(1, 3, crop, crop, device=dev)
    model.eval()
    times = {part: [] for part in (*INFER_PARTS, "total")}
    with torch.no_grad():
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

    images = torch.randn(batch, 3, crop, crop, device=dev)
    target = torch.randint(0, num_classes, (batch, crop, crop), device=dev)
    model.train()
    optimizer.zero_grad(set_to_none=True)
    names = (*TRAIN_PARTS, "margin_search", "total")
    times = {part: [] for part in names}
    with _timed_searches(sync) as timers:
        for i in range(warmup + repeats):
            timers["search"].reset()
            timers["margin_search"].reset()
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
            optimizer.zero_grad(set_to_none=True)
            sync()
            t4 = time.perf_counter()
            del outputs, loss
            search, margin_search = timers["search"].seconds, timers["margin_search"].seconds
            if uses_search and timers["search"].calls == 0:
                raise RuntimeError("the ess-knn loss made no nearest-class search call: the timing hook is stale")
            if i >= warmup:
                step = {"forward": t1 - t0, "search": search, "loss": (t2 - t1) - search, "backward": t3 - t2,
                        "optimizer": t4 - t3, "margin_search": margin_search, "total": t4 - t0}
                for part, value in step.items():
                    times[part].append(value)
        searched = timers["search"].rows if uses_search else None
    parts = {part: summarize(v) for part, v in times.items()}
    if not uses_search:
        parts["search"] = None
    if not any(times["margin_search"]):
        parts["margin_search"] = None
    return {"status": "ok", "parts": parts, "search_queries": searched}


def measure_config(job: dict) -> dict:
    """One (head, C) in this process: inference, then training, each recorded (or its OOM)."""
    import gc

    import torch

    model, optimizer, dev = _build(job)
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    record = {"threads": torch.get_num_threads()}
    phases = (
        ("inference", lambda: measure_inference(model, dev, job["crop"], job["num_classes"], job["warmup"],
                                                job["repeats"], sync)),
        ("train", lambda: measure_training(model, optimizer, dev, job["batch"], job["crop"], job["num_classes"],
                                           job["warmup"], job["repeats"], sync, job["head"] in KNN_HEADS)),
    )
    for name, run in phases:
        try:
            record[name] = run()
        except (MemoryError, RuntimeError) as exc:  # torch.OutOfMemoryError is a RuntimeError
            if not _is_oom(exc):
                raise
            record[name] = _oom_record(exc)
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return record


def compare_backends(num_classes: int, pixels: int, device: str, warmup: int, repeats: int,
                     overrides: list[str] = (), seed: int = 0) -> dict:
    """The nearest-class search on random unit vectors, torch vs FAISS: times and agreement.

    agree_sets: fraction of queries whose k neighbours are the same set (what the loss uses);
    agree_top1: fraction whose nearest class is the same (what inference uses)."""
    import torch
    import torch.nn.functional as F

    from scaleseg.config import load_config
    from scaleseg.search import nearest_classes

    emb = load_config(None, list(overrides)).model.head.embedding
    k = min(emb.num_neighbours + 1, num_classes)
    dev = torch.device(device)
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    gen = torch.Generator().manual_seed(seed)
    queries = F.normalize(torch.randn(pixels, emb.embed_dim, generator=gen), dim=1).to(dev)  # (N, d)
    classes = F.normalize(torch.rand(num_classes, emb.embed_dim, generator=gen) * 2 - 1, dim=1).to(dev)  # (C, d)
    budget = emb.search_budget_mb * 2**20
    record = {"num_classes": num_classes, "queries": pixels, "k": k, "embed_dim": emb.embed_dim,
              "budget_mb": emb.search_budget_mb}
    try:
        import faiss
    except ImportError:
        faiss = None
    record["faiss_version"] = getattr(faiss, "__version__", None) if faiss else None
    found = {}
    for backend in ("torch", "faiss"):
        if backend == "faiss" and faiss is None:
            record[backend] = {"status": "not installed"}
            continue
        times = []
        try:
            for i in range(warmup + repeats):
                sync()
                t = time.perf_counter()
                found[backend] = nearest_classes(queries, classes, k, budget_bytes=budget, backend=backend)  # (N, k)
                sync()
                if i >= warmup:
                    times.append(time.perf_counter() - t)
        except (MemoryError, RuntimeError) as exc:
            if not _is_oom(exc):
                raise
            record[backend] = _oom_record(exc)
            found.pop(backend, None)
            continue
        record[backend] = {"status": "ok", **summarize(times)}
    if len(found) == 2:
        a, b = found["torch"].cpu(), found["faiss"].cpu()
        record["agree_sets"] = float((a.sort(dim=1).values == b.sort(dim=1).values).all(dim=1).float().mean())
        record["agree_top1"] = float((a[:, 0] == b[:, 0]).float().mean())
    return record


def run_job(job: dict) -> dict:
    """One job (a (head, C) configuration, or one C of the backend comparison) in this process."""
    try:
        if job["kind"] == "knn":
            return compare_backends(job["num_classes"], job["pixels"], job["device"], job["warmup"], job["repeats"],
                                    job["overrides"])
        return measure_config(job)
    except (MemoryError, RuntimeError) as exc:
        if not _is_oom(exc):
            raise
        return _oom_record(exc)


def _child_main(job: dict) -> int:
    if job.get("limit_gb") and job["device"] == "cpu":  # a failed allocation (catchable) instead of the OOM killer
        limit = int(float(job["limit_gb"]) * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    print(json.dumps(run_job(job)), flush=True)
    return 0


# ---------------------------------------------------------------------------------------------
# orchestration (in the parent)


def run_child(job: dict) -> dict:
    """One job in a fresh interpreter, so that runs do not disturb each other."""
    proc = subprocess.run([sys.executable, "-m", "scaleseg.bench.speed", "--child", json.dumps(job)],
                          capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode == 0 and lines:
        return json.loads(lines[-1])
    if proc.returncode < 0:  # killed by a signal: the kernel's OOM killer sends SIGKILL
        return {"status": "killed", "detail": f"signal {-proc.returncode} (out of memory?)"}
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return {"status": "error", "detail": tail[:300]}


def _normalize_config_record(head: str, num_classes: int, raw: dict) -> dict:
    """Every (head, C) record has 'inference' and 'train' phases, each with a status."""
    record = {"head": head, "num_classes": num_classes, "threads": raw.get("threads")}
    for phase in ("inference", "train"):
        record[phase] = raw.get(phase) or {"status": raw.get("status", "error"), "detail": raw.get("detail", "")}
    return record


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
        "cuda": torch.version.cuda, "faiss": faiss_version, "python": platform.python_version(),
        "platform": platform.platform(), "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }


def command_line(args) -> str:
    """The `scaleseg bench speed` command that reproduces this run (recorded in speed.json)."""
    parts = ["scaleseg bench speed", "--classes", ",".join(map(str, args.classes)), "--heads", ",".join(args.heads),
             "--backbone", args.backbone, "--batch", str(args.batch), "--crop", str(args.crop), "--device", args.device,
             "--loss-resolution", args.loss_resolution, "--warmup", str(args.warmup), "--repeats", str(args.repeats),
             "--knn-pixels", str(args.knn_pixels)]
    if args.limit_gb:
        parts += ["--limit-gb", f"{args.limit_gb:g}"]
    for override in args.set or []:
        parts += ["--set", override]
    return " ".join(parts + ["--out", str(args.out)])


def run_benchmark(args) -> dict:
    """Every (head, C) and every C of the backend comparison, one process each, with a progress
    bar; writes speed.json, speed.md and speed.png into args.out and returns the report."""
    from tqdm import tqdm

    from scaleseg.engine.runtime import select_device

    device = select_device(args.device)
    common = {"device": str(device), "warmup": args.warmup, "repeats": args.repeats, "overrides": list(args.set or []),
              "limit_gb": args.limit_gb}
    jobs = [{"kind": "config", "head": h, "num_classes": c, "backbone": args.backbone, "batch": args.batch,
             "crop": args.crop, "loss_resolution": args.loss_resolution, **common}
            for h in args.heads for c in args.classes]
    if args.knn_pixels:
        jobs += [{"kind": "knn", "num_classes": c, "pixels": args.knn_pixels, **common} for c in args.classes]
    configs, knn = [], []
    bar = tqdm(jobs, desc="bench speed", unit="config", disable=args.no_progress)
    for job in bar:
        label = f"{job.get('head', 'search')} C={job['num_classes']}"
        bar.set_postfix_str(label)
        raw = run_child(job)
        if job["kind"] == "knn":
            knn.append({"num_classes": job["num_classes"], "queries": job["pixels"], **raw})
        else:
            configs.append(_normalize_config_record(job["head"], job["num_classes"], raw))
    settings = {
        "heads": list(args.heads), "classes": list(args.classes), "backbone": args.backbone, "batch": args.batch,
        "crop": args.crop, "loss_resolution": args.loss_resolution, "warmup": args.warmup, "repeats": args.repeats,
        "knn_pixels": args.knn_pixels, "limit_gb": args.limit_gb, "overrides": list(args.set or []),
        "command": command_line(args),
    }
    report = {"settings": settings, "machine": machine_info(device), "results": configs, "knn_backends": knn}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "speed.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "speed.md").write_text(format_markdown(report))
    plot(report, out / "speed.png")
    return report


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


def _phase_cell(phase: dict, part: str = "total") -> str:
    if phase["status"] != "ok":
        return phase["status"].upper()
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
            if train["status"] != "ok":
                cells = [train["status"].upper()] * (len(TRAIN_PARTS) + 1)
            else:
                cells = [fmt_stats(train["parts"][p]) for p in (*TRAIN_PARTS, "total")]
            lines.append(f"| {h} | {c:,} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def knn_table(knn: list[dict]) -> str:
    """Rows = C: the search's time with each backend and the agreement of their neighbours."""
    lines = ["| C | queries | k | torch | FAISS | FAISS speed-up | same k neighbours | same nearest |",
             "| ---: | ---: | ---: | --- | --- | ---: | ---: | ---: |"]
    for r in knn:
        if "torch" not in r:  # the whole job failed
            lines.append(f"| {r['num_classes']:,} | {r['queries']:,} | | {r['status'].upper()} | | | | |")
            continue
        cells = {}
        for backend in ("torch", "faiss"):
            b = r[backend]
            cells[backend] = fmt_stats(b) if b["status"] == "ok" else b["status"].upper()
        both = r["torch"]["status"] == "ok" and r["faiss"]["status"] == "ok"
        speedup = f"{r['torch']['median'] / r['faiss']['median']:.2g}x" if both else "–"
        sets = f"{100 * r['agree_sets']:.2f}%" if "agree_sets" in r else "–"
        top1 = f"{100 * r['agree_top1']:.2f}%" if "agree_top1" in r else "–"
        lines.append(f"| {r['num_classes']:,} | {r['queries']:,} | {r['k']} | {cells['torch']} | {cells['faiss']} | "
                     f"{speedup} | {sets} | {top1} |")
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
        f"repetition{'' if s['warmup'] == 1 else 's'}, then {s['repeats']} timed with {sync}. "
        "Cells: median (min–max) over the timed repetitions."
        + (f" OOM: over the {s['limit_gb']:g} GiB address-space limit." if s.get("limit_gb") else ""),
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
        "(ESS Eq. 6, k + 1 neighbours of every labelled pixel), timed where the loss calls it. `loss`: the rest of the "
        "loss (upsampling, cross-entropy, and for ESS the max-margin regulariser with its own C x C nearest-class "
        "search). `backward`: `loss.backward()`. `optimizer`: `optimizer.step()` and `zero_grad`. The parts are "
        "contiguous: per step they add up to the total.",
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
    if report.get("knn_backends"):
        out += [
            "### Nearest-class search backends",
            "",
            f"{s['knn_pixels']:,} random unit queries against C random unit class embeddings, k neighbours each, "
            "with the torch backend (exact, tiled under the search budget) and FAISS (`IndexFlatL2`, exact). "
            "Agreement: the fraction of queries for which both return the same set of k neighbours, and the same "
            "nearest class.",
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
            failed = [r for r in records if r["head"] == h and r[phase]["status"] != "ok"]
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


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "--child":
        sys.exit("usage: python -m scaleseg.bench.speed --child JOB_JSON (use `scaleseg bench speed`)")
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    sys.exit(_child_main(json.loads(sys.argv[2])))
