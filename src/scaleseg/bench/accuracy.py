"""Accuracy of the head variants (ESS paper Table 3's ablations, and the cheaper hard negatives and
cached regulariser of ESS supplementary C) after the same short training.

Every (variant, C, seed) is one ordinary training run (`scaleseg.engine.trainer.Trainer`) on the
built-in `synthetic` dataset, in its own work dir under `--out`, one after another. A variant is
a list of dotted config overrides (VARIANTS below); all runs share SETTINGS, then the variant's
overrides, then `data.num_classes`, `train.seed`, `--iters` and `--set` (last wins).

The ESS variants use the ESS settings of configs/synthetic/ess.yaml (d 32, k 7, tau 0.02, class
table at 30x the base LR, 100 warm-up iterations, gradient clipping at 5; a test keeps the two in
step) and the baseline the same warm-up and clipping, so each comparison is at the same settings.

The supplementary-C variants (`ess-exact` ... `ess-fast`) differ from `ess-exact` (exact search
per pixel, exact regulariser every step, whatever the defaults) in one setting each, or all of them
together (`ess-fast`). They use the runs' loss resolution (the stride-4 decoder grid by default;
`--set model.head.loss_resolution=full` for the paper's, where a block of s x s pixels sharing one
search is the supplementary's "0.25 or 0.125 fractions of total pixels").

Outputs in `--out`: accuracy.json (every run's record with its wall-clock seconds, the settings, the reproducing command),
accuracy.md (mIoU table: rows variants, columns C, cells mean (min..max) over seeds; then every
metric) and accuracy.png (mIoU per variant grouped by C). A run that fails is recorded with its
error and the benchmark goes on.

`--resume` continues a benchmark that was stopped (a crash, a killed job, a session's end) in the same
`--out` with the same protocol (--iters, --set, --memory-budget-gb, --max-batch-limit; anything else is
refused): runs recorded `ok` in its accuracy.json are kept as they are, every other run continues from
the newest checkpoint in its work dir (the trainer's exact resume; `--set train.checkpoint_interval=N`
decides how much a stop can lose, since a bench run otherwise checkpoints only at its end) or starts,
and each (variant, C) keeps the batch its first search found (batch_search.json), so a resumed run
trains at the batch of its checkpoint. A resumed run's `seconds` are those of the process that
finished it; its record says `resumed`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from scaleseg.errors import ScalesegError

METRICS = ("mIoU", "aAcc", "mAcc", "fwIoU")
# The three metrics of the ESS paper's tables again under lower-case keys in every record (mIoU, fwIoU,
# pixel accuracy), so scripts need not know mmsegmentation's spelling; same values, same rounding.
RECORD_ALIASES = {"miou": "mIoU", "fwiou": "fwIoU", "aacc": "aAcc"}


def metric_fields(metrics: dict) -> dict:
    """A run's metric fields for its record: METRICS as evaluated, plus RECORD_ALIASES of them."""
    fields = {k: metrics.get(k) for k in METRICS}
    return {**fields, **{alias: fields[k] for alias, k in RECORD_ALIASES.items()}}

# The optimiser of configs/synthetic/ess.yaml (warm-up, clipping, class table LR x30), for every variant: the
# baseline included, which has no class table, so that group's setting changes nothing there.
_STABILISE = ["optim.warmup_iters=100", "optim.clip_grad_norm=5.0", "optim.groups.class_embeddings.lr_mult=30"]
# The rest of configs/synthetic/ess.yaml: the embedding scorer with d 32, k 7, tau 0.02.
_ESS = [
    "model.head.scorer=embedding",
    "model.head.embedding.embed_dim=32",
    "model.head.embedding.num_neighbours=7",
    "model.head.embedding.temperature=0.02",
]
_ESS_KNN = [*_STABILISE, *_ESS, "model.head.embedding.loss=knn"]

# name -> (what it is, config overrides)
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "baseline": ("linear scorer (C-channel 1x1 conv), softmax cross-entropy", [*_STABILISE, "model.head.scorer=linear"]),
    "ess-knn": ("ESS: embedding scorer, kNN cross-entropy over the k nearest negatives (Eq. 6) + margin (Eq. 7)",
                _ESS_KNN),
    "ess-full": ("ESS with the exact cross-entropy over all C classes instead of the kNN approximation",
                 [*_STABILISE, *_ESS, "model.head.embedding.loss=full"]),
    "ess-random": ("ESS kNN loss with k random negatives instead of the nearest ones",
                   [*_ESS_KNN, "model.head.embedding.negatives=random"]),
    "ess-nonorm": ("ESS kNN loss without L2-normalising pixel and class embeddings",
                   [*_ESS_KNN, "model.head.embedding.normalize=false"]),
    "ess-nomargin": ("ESS kNN loss without the max-margin regulariser (margin_weight 0)",
                     [*_ESS_KNN, "model.head.embedding.margin_weight=0"]),
}
# ESS supplementary C's remedies, each against the exact reference
_EXACT = [*_ESS_KNN, "model.head.embedding.search_block=1", "model.head.embedding.search_index=exact",
          "model.head.embedding.margin_refresh=1"]
VARIANTS.update({
    "ess-exact": ("ESS kNN: exact search for every loss pixel, exact regulariser every step", _EXACT),
    "ess-cached": ("ess-exact with the regulariser's nearest-class pairs cached, refreshed every 100 steps",
                   [*_EXACT, "model.head.embedding.margin_refresh=100"]),
    "ess-block2": ("ess-exact with one search per 2 x 2 block of pixels, shared by the block",
                   [*_EXACT, "model.head.embedding.search_block=2"]),
    "ess-block4": ("ess-exact with one search per 4 x 4 block of pixels, shared by the block",
                   [*_EXACT, "model.head.embedding.search_block=4"]),
    "ess-ivf": ("ess-exact with the approximate class index (k-means, sqrt(C) clusters, 8 probed)",
                [*_EXACT, "model.head.embedding.search_index=ivf"]),
    "ess-fast": ("ess-exact with all three: 4 x 4 blocks, the class index, the cached regulariser",
                 [*_EXACT, "model.head.embedding.search_block=4", "model.head.embedding.search_index=ivf",
                  "model.head.embedding.margin_refresh=100"]),
})
# ESS's learning-rate finding (docs/ess.md): the sphere class table (unit rows, put back on the sphere every step)
# instead of the free table's LR multiplier of 30
_SPHERE = [*_ESS_KNN, "model.head.embedding.table=sphere"]
VARIANTS.update({
    "ess-sphere": ("ESS kNN with the sphere class table at the base LR (no multiplier)",
                   [*_SPHERE, "optim.groups.class_embeddings.lr_mult=1"]),
    "ess-sphere-x3": ("ESS kNN with the sphere class table at 3x the base LR (30 / (d / 3) at d = 32: the "
                      "free table's turn rate at its init)", [*_SPHERE, "optim.groups.class_embeddings.lr_mult=3"]),
})
ABLATIONS = ("baseline", "ess-knn", "ess-full", "ess-random", "ess-nonorm", "ess-nomargin")
DEFAULT_VARIANTS = ABLATIONS
# S&F Table 6 on the built-in set: the pyramid against the single-level output with the same semantic head, with
# and without the contextual module, at the default run's settings (configs/synthetic/{single_semantic,pyramid}.yaml;
# no warm-up or clipping: the default run has none). Not in DEFAULT_VARIANTS: `--variants` names them.
_SEMANTIC = ["model.head.pyramid.semantic_channels=64"]
_PYRAMID = ["model.head.structure=pyramid", "model.head.pyramid.unity_channels=32", *_SEMANTIC]
PYRAMID_VARIANTS: dict[str, tuple[str, list[str]]] = {
    "single": ("single-level output, plain head: the scorer's 1x1 conv on the decoder features (the default run)", []),
    "single-semantic": ("single-level output behind the pyramid's semantic head with the contextual module "
                        "(Table 6 'Single (standard)', 'ours')", ["model.head.single_head=semantic", *_SEMANTIC]),
    "single-semantic-noctx": ("single-level output behind the pyramid's semantic head without the contextual "
                              "module (Table 6 'Single (standard)', '-')",
                              ["model.head.single_head=semantic", *_SEMANTIC, "model.head.pyramid.context=false"]),
    "pyramid": ("the pyramidal output (strides 4-32, unity head, done by coarser, tau 0.9) with the contextual "
                "module (Table 6 'Pyramid', 'ours')", _PYRAMID),
    "pyramid-noctx": ("the pyramidal output without the contextual module (Table 6 'Pyramid', '-')",
                      [*_PYRAMID, "model.head.pyramid.context=false"]),
    "single-semantic-anl": ("single-level output behind the semantic head with one ANL block on its input instead "
                            "of the contextual module (Table 6 'Single (standard)', 'ANL')",
                            ["model.head.single_head=semantic", *_SEMANTIC, "model.head.pyramid.context=anl"]),
    "pyramid-anl": ("the pyramidal output with one ANL block on the head's input, no contextual module "
                    "(Table 6 'Pyramid', 'ANL')", [*_PYRAMID, "model.head.pyramid.context=anl"]),
    "pyramid-anl-multi": ("the pyramidal output with one ANL block per level instead of the contextual module "
                          "(Table 6 'Pyramid', 'ANL-multi')", [*_PYRAMID, "model.head.pyramid.context=anl_multi"]),
}
VARIANTS.update(PYRAMID_VARIANTS)
DEFAULT_CLASSES = (150, 1000)
DEFAULT_SEEDS = (0,)
DEFAULT_ITERS = 300
# Shared by every run: the default run's data, model and optimiser (tiny ResNet from scratch, batch 8,
# 128x128 crops of 160x160 images, 100 val images), shortened to DEFAULT_ITERS with one evaluation at the
# end and one checkpoint; no per-run progress bar (the benchmark has its own).
SETTINGS = [
    "data.dataset=synthetic",
    f"train.iters={DEFAULT_ITERS}",
    "train.eval_interval=0",
    "train.checkpoint_interval=1000000",  # only the final checkpoint
    "train.keep_checkpoints=1",
    "train.log_interval=100",
    "train.progress=false",
]


def list_variants() -> str:
    """One line per variant: name, description, overrides (for --list-variants)."""
    width = max(map(len, VARIANTS))
    lines = []
    for name, (text, overrides) in VARIANTS.items():
        lines.append(f"{name:<{width}}  {text}")
        lines.append(f"{'':<{width}}    {' '.join(overrides)}")
    lines.append(f"every run also: {' '.join(SETTINGS)}")
    return "\n".join(lines)


def parse_names(text: str, option: str = "--variants") -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise ScalesegError(f"{option} {text!r} names no variant; e.g. {option} baseline,ess-knn")
    for n in names:
        if n not in VARIANTS:
            raise ScalesegError(f"unknown variant {n!r} for {option}; choose from {', '.join(VARIANTS)} "
                                "(--list-variants shows what each one sets)")
    return list(dict.fromkeys(names))


def parse_ints(text: str, option: str, minimum: int) -> list[int]:
    """'150,1000' -> [150, 1000], or a ScalesegError naming the option and the bad item."""
    values = []
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        try:
            value = int(item)
        except ValueError:
            raise ScalesegError(f"{option} {text!r}: {item!r} is not an integer; give a comma-separated list, "
                                f"e.g. {option} 150,1000") from None
        if value < minimum:
            raise ScalesegError(f"{option} {text!r}: {value} is below {minimum}")
        values.append(value)
    if not values:
        raise ScalesegError(f"{option} {text!r}: the list is empty")
    return list(dict.fromkeys(values))


def run_overrides(variant: str, num_classes: int, seed: int, iters: int | None = None,
                  extra: list[str] = ()) -> list[str]:
    """The dotted overrides of one run, in the order they apply."""
    overrides = [*SETTINGS, *VARIANTS[variant][1], f"data.num_classes={num_classes}", f"train.seed={seed}"]
    if iters is not None:
        overrides.append(f"train.iters={iters}")
    return overrides + list(extra)


def run_name(variant: str, num_classes: int, seed: int) -> str:
    return f"{variant}_C{num_classes}_seed{seed}"


def build_configs(variants, classes, seeds, iters, extra) -> list[tuple[str, int, int, object]]:
    """(variant, C, seed, Config) of every run, all validated before any training starts."""
    from scaleseg.config import load_config

    runs = []
    for variant in variants:
        for c in classes:
            for seed in seeds:
                try:
                    cfg = load_config(None, run_overrides(variant, c, seed, iters, extra))
                except ScalesegError as exc:
                    raise type(exc)(f"variant {variant}, C = {c}: {exc}") from None
                runs.append((variant, c, seed, cfg))
    return runs


def train_one(cfg, work_dir: Path, resume: bool = False) -> dict:
    """One training run (continued from the newest checkpoint in `work_dir` when `resume`); returns its
    final evaluation summary (percent). Replaceable in tests."""
    from scaleseg.engine.trainer import Trainer

    return Trainer(cfg, work_dir=work_dir, resume=resume).run()


def measure_batch(overrides: list[str], num_classes: int, batch: int, crop: int) -> dict:
    """Peak memory of two training steps of the run's config at `batch`, in a fresh process (bench
    memory's measurement: CPU peak RSS or CUDA max_memory_allocated). Replaceable in tests."""
    from scaleseg.bench.harness import run_child

    job = {"overrides": list(overrides), "num_classes": num_classes, "batch": batch, "crop": crop, "steps": 2,
           "device": "cpu"}
    return run_child("scaleseg.bench.memory:run_config_job", job)


def budget_batch(overrides: list[str], num_classes: int, crop: int, budget_gb: float, limit: int,
                 measure=measure_batch) -> dict:
    """The largest batch (2..limit, doubling then bisection: bench memory --max-batch's search) whose
    training step of this run's config stays within `budget_gb` GiB; 0 when batch 2 does not."""
    from scaleseg.bench.memory import search_max_batch, trial_fits

    trials = []

    def fits(batch: int) -> bool:
        record = measure(overrides, num_classes, batch, crop)
        ok = trial_fits(record, budget_gb, batch, f"the {budget_gb:g} GiB batch search at C = {num_classes}")
        trials.append({"batch": batch, "status": record["status"], "peak_mb": record.get("peak_mb"), "fits": ok})
        return ok

    best, _ = search_max_batch(fits, limit)
    return {"batch": best, "at_limit": best == limit, "trials": trials}


def equal_images_iters(iters: int, reference_batch: int, batch: int, grad_accum: int = 1) -> int:
    """Optimizer steps of `grad_accum` batches of `batch` that see as many training images as `iters`
    steps of `reference_batch` (the same epochs, as ESS compares its batch sizes), rounded to the
    nearest step (at least 1). Accumulation (ESS Table 5's GA row) trades steps for a larger effective
    batch; it does not add images."""
    return max(1, round(iters * reference_batch / (batch * grad_accum)))


READOUT = "@finest"  # suffix of the records of a pyramid run read at its finest level alone (Table 8)


def evaluate_finest(work_dir: Path, iters: int) -> tuple[dict, Path]:
    """The trained pyramid run in `work_dir` evaluated with eval.pyramid_readout=finest (S&F Table 8's
    "aux. supervision": the same weights, the finest level alone); (metrics in percent, metrics.json)."""
    from scaleseg.cli import main

    out = work_dir / "eval" / f"iter_{iters:06d}_finest"
    if main(["eval", str(work_dir), "eval.pyramid_readout=finest", "--out", str(out), "--no-progress", "--show", "0"]):
        raise ScalesegError(f"the finest-level evaluation of {work_dir} failed (see the messages above)")
    return json.loads((out / "metrics.json").read_text()), out / "metrics.json"


def _at_budget_batch(variant: str, c: int, seed: int, cfg, args, batches: dict, measure):
    """(the run's config at its budget batch and equal-images iterations, the batch search's record)."""
    from scaleseg.config import load_config

    overrides = run_overrides(variant, c, seed, args.iters, list(args.set or []))
    if (variant, c) not in batches:
        crop = cfg.data.train_pipeline.crop_size
        batches[(variant, c)] = budget_batch(overrides, c, max(crop), args.memory_budget_gb,
                                             args.max_batch_limit, measure)
    found = batches[(variant, c)]
    if not found["batch"]:
        return cfg, found
    iters = equal_images_iters(cfg.train.iters, cfg.data.batch_size, found["batch"], cfg.train.grad_accum)
    return load_config(None, [*overrides, f"data.batch_size={found['batch']}", f"train.iters={iters}"]), found


# --set keys that decide how a run is checkpointed and logged, not what it learns: outputs that differ
# only in these are one protocol (--collect, --resume), e.g. a long run given train.checkpoint_interval
BOOKKEEPING_KEYS = ("train.checkpoint_interval", "train.keep_checkpoints", "train.log_interval", "train.progress")


def protocol_overrides(extra) -> list[str]:
    """The --set overrides that can change a run's result (all but BOOKKEEPING_KEYS), in order."""
    return [o for o in extra or [] if o.split("=", 1)[0].strip() not in BOOKKEEPING_KEYS]


BATCH_SEARCH = "batch_search.json"  # in --out: each (variant, C)'s batch search, kept for --resume
# what a resumed benchmark must share with the one it continues: every run's config depends on them
PROTOCOL_KEYS = ("iters", "shared_overrides", "extra_overrides", "memory_budget_gb", "max_batch_limit")


def _read_output(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or not isinstance(data.get("settings"), dict):
            raise ValueError("no settings")
        return data
    except (OSError, ValueError) as exc:
        raise ScalesegError(f"--resume: {path} is not a readable `scaleseg bench accuracy` file ({exc}); "
                            "delete it to redo what it recorded, or choose another --out") from None


def _check_protocol(path: Path, old: dict, args) -> None:
    """--resume refuses an output written under another protocol, naming the first difference."""
    new = _settings(args)
    old = {**old, "extra_overrides": protocol_overrides(old.get("extra_overrides"))}
    new["extra_overrides"] = protocol_overrides(new["extra_overrides"])
    for key in PROTOCOL_KEYS:
        if old.get(key) != new.get(key):
            raise ScalesegError(f"--resume: {path} was written with {key} = {old.get(key)!r}, this command has "
                                f"{new.get(key)!r}; resume with the options it records ({old.get('command', '?')}) "
                                "or choose another --out")
    for variant, overrides in (old.get("variants") or {}).items():
        if variant in new["variants"] and overrides is not None and overrides != new["variants"][variant]:
            raise ScalesegError(f"--resume: variant {variant} ran with the overrides {overrides} in {path}; it "
                                f"has {new['variants'][variant]} now; choose another --out")


def load_previous(out: Path, args) -> tuple[dict, dict]:
    """--resume: (the `ok` records of the benchmark stopped in `out`, by (variant, C, seed), a pyramid's
    finest-level reading under its own variant name; its batch searches, by (variant, C)). Both empty
    when `out` holds neither file."""
    done, batches = {}, {}
    if (out / "accuracy.json").exists():
        data = _read_output(out / "accuracy.json")
        _check_protocol(out / "accuracy.json", data["settings"], args)
        done = {(r["variant"], r["num_classes"], r["seed"]): r for r in data.get("records", [])
                if r.get("status") == "ok"}
    if (out / BATCH_SEARCH).exists():
        data = _read_output(out / BATCH_SEARCH)
        _check_protocol(out / BATCH_SEARCH, data["settings"], args)
        batches = {(b["variant"], b["num_classes"]): {k: b[k] for k in ("batch", "at_limit", "trials")}
                   for b in data.get("batches", [])}
    return done, batches


def _write_batches(out: Path, batches: dict, args) -> None:
    from scaleseg.data.io import atomic_write

    text = json.dumps({"settings": _settings(args), "batches": [
        {"variant": v, "num_classes": c, **found} for (v, c), found in batches.items()]}, indent=2) + "\n"
    atomic_write(out / BATCH_SEARCH, lambda tmp: tmp.write_text(text))


def _refuse_earlier_runs(runs, out: Path) -> None:
    """Without --resume, an --out holding runs of an earlier benchmark is refused before anything is
    written (its accuracy.json would be overwritten and every run refused by its work dir)."""
    from scaleseg.engine.trainer import own_checkpoints

    held = [run_name(v, c, s) for v, c, s, _ in runs if (out / run_name(v, c, s)).is_dir()
            and own_checkpoints(out / run_name(v, c, s))]
    if held:
        raise ScalesegError(f"--out {out} holds runs of an earlier benchmark ({', '.join(held[:3])}"
                            f"{', ...' if len(held) > 3 else ''}); continue it with --resume (same options), "
                            "or choose another --out")


def _finest_record(record: dict, variant: str, work_dir: Path) -> dict:
    """A trained pyramid run also read at its finest level alone (S&F Table 8), as its own record."""
    finest = {**record, "variant": variant + READOUT, "seconds": 0.0}
    finest.pop("resumed", None)
    try:
        metrics, path = evaluate_finest(work_dir, record["iters"])
        finest.update(metric_fields(metrics), metrics_file=str(path))
    except Exception as exc:  # noqa: BLE001 - recorded like a failed run
        finest = {k: v for k, v in finest.items() if k not in (*METRICS, *RECORD_ALIASES)}
        finest.update(status="error", error=f"{type(exc).__name__}: {exc}"[:500])
    return finest


def run_benchmark(args, train=train_one, measure=measure_batch) -> list[dict]:
    """All runs in sequence under one progress bar; writes accuracy.json/.md/.png into args.out."""
    from tqdm import tqdm

    from scaleseg.engine.trainer import own_checkpoints

    out = Path(args.out)
    resume = bool(getattr(args, "resume", False))
    runs = build_configs(args.variants, args.classes, args.seeds, args.iters, list(args.set or []))
    if resume:
        previous, batches = load_previous(out, args)  # batches: (variant, C) -> its budget_batch record
    else:
        _refuse_earlier_runs(runs, out)
        previous, batches = {}, {}
    out.mkdir(parents=True, exist_ok=True)
    budget_gb = getattr(args, "memory_budget_gb", None)
    records = []
    bar = tqdm(runs, desc="bench accuracy", unit="run", disable=args.no_progress, dynamic_ncols=True)
    for variant, c, seed, cfg in bar:
        name = run_name(variant, c, seed)
        bar.set_postfix_str(name)
        work_dir = out / name
        is_pyramid = cfg.model.head.structure == "pyramid"
        if (variant, c, seed) in previous:  # --resume: finished before the stop, kept as recorded
            records.append(previous[(variant, c, seed)])
            if is_pyramid:
                finest = previous.get((variant + READOUT, c, seed))
                records.append(finest or _finest_record(records[-1], variant, work_dir))
            _write(out, records, args, summary=None)
            continue
        cfg.work_dir = str(work_dir)
        record = {"variant": variant, "num_classes": c, "seed": seed, "work_dir": str(work_dir)}
        if budget_gb is not None:  # each (variant, C) at the largest batch within the budget, equal images seen
            searched = len(batches)
            try:
                cfg, found = _at_budget_batch(variant, c, seed, cfg, args, batches, measure)
            except ScalesegError as exc:  # a failed trial (not a lack of memory) is this run's error
                record.update(status="error", error=f"{variant}: {exc}"[:500], seconds=0.0)
            else:
                if len(batches) > searched:
                    _write_batches(out, batches, args)
                record.update(batch=cfg.data.batch_size if found["batch"] else 0, iters=cfg.train.iters,
                              images_seen=(cfg.data.batch_size * cfg.train.grad_accum * cfg.train.iters
                                           if found["batch"] else 0),
                              batch_at_limit=found["at_limit"], batch_trials=found["trials"])
                if not found["batch"]:
                    record.update(status="does not fit", error=f"batch 2 needs more than {budget_gb:g} GiB",
                                  seconds=0.0)
            if "status" in record:  # not trained: recorded as it stands
                records.append(record)
                _write(out, records, args, summary=None)
                continue
            cfg.work_dir = str(work_dir)
        else:
            record.update(batch=cfg.data.batch_size, iters=cfg.train.iters)
        if resume and work_dir.is_dir() and own_checkpoints(work_dir):
            record["resumed"] = True
        start = time.perf_counter()
        try:
            metrics = train(cfg, work_dir, resume=resume)
            final = work_dir / "eval" / f"iter_{cfg.train.iters:06d}" / "metrics.json"
            record.update(status="ok", **metric_fields(metrics), metrics_file=str(final))
        except Exception as exc:  # noqa: BLE001 - a failed run is a result, not the end of the benchmark
            record.update(status="error", error=f"{type(exc).__name__}: {exc}"[:500])
        record["seconds"] = round(time.perf_counter() - start, 1)
        records.append(record)
        if record["status"] == "ok" and is_pyramid:  # also Table 8's finest reading
            records.append(_finest_record(record, variant, work_dir))
        _write(out, records, args, summary=None)  # partial results, readable while a long benchmark runs
    write_report(out, records, _settings(args))
    return records


def _settings(args) -> dict:
    settings = {
        "variants": {v: VARIANTS[v][1] for v in args.variants}, "classes": list(args.classes),
        "seeds": list(args.seeds), "iters": args.iters or DEFAULT_ITERS, "shared_overrides": SETTINGS,
        "extra_overrides": list(args.set or []), "command": command_line(args),
    }
    if getattr(args, "memory_budget_gb", None) is not None:
        settings.update(memory_budget_gb=args.memory_budget_gb, max_batch_limit=args.max_batch_limit)
    return settings


def _write(out: Path, records: list[dict], args, summary: list[dict] | None) -> None:
    report = {"settings": _settings(args), "records": records}
    if summary is not None:
        report["summary"] = summary
    (out / "accuracy.json").write_text(json.dumps(report, indent=2) + "\n")


def write_report(out: Path, records: list[dict], settings: dict) -> list[dict]:
    """accuracy.json (settings, summary, records), accuracy.md and accuracy.png in `out`; the summary."""
    variants, classes = list(settings["variants"]), list(settings["classes"])
    for v in [r["variant"] for r in records if r["variant"].endswith(READOUT)]:  # after their runs' variant
        if v not in variants:
            variants.insert(variants.index(v.removesuffix(READOUT)) + 1 if v.removesuffix(READOUT) in variants
                            else len(variants), v)
    summary = aggregate(records, variants, classes)
    (out / "accuracy.json").write_text(
        json.dumps({"settings": settings, "summary": summary, "records": records}, indent=2) + "\n")
    (out / "accuracy.md").write_text(format_report(summary, variants, classes, settings) + "\n")
    plot(summary, variants, classes, out / "accuracy.png", settings)
    return summary


def collect(sources: list[str | Path], out: str | Path) -> tuple[list[dict], dict]:
    """One report from several `bench accuracy` outputs (e.g. one per variant and seed, run in parallel):
    their records side by side, as one run of all of them would give. The outputs must share --iters and
    --set (bar the checkpointing and logging keys, BOOKKEEPING_KEYS); a (variant, C, seed) found twice is
    refused. Returns (records, settings)."""
    records: list[dict] = []
    commands, iters, extras, budgets, found = [], set(), set(), set(), {}
    for source in sources:
        path = Path(source)
        path = path / "accuracy.json" if path.is_dir() else path
        try:
            data = json.loads(path.read_text())
            settings, runs = data["settings"], data["records"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ScalesegError(f"--collect {str(source)!r}: not a `scaleseg bench accuracy` output ({path}: {exc}); "
                                "pass its --out folder or its accuracy.json") from None
        iters.add(settings["iters"])
        extras.add(tuple(protocol_overrides(settings.get("extra_overrides"))))
        budgets.add((settings.get("memory_budget_gb"), settings.get("max_batch_limit")))
        commands.append(settings["command"])
        for r in runs:
            key = (r["variant"], r["num_classes"], r["seed"])
            if key in found:
                raise ScalesegError(f"--collect: {r['variant']} C = {r['num_classes']} seed {r['seed']} is in both "
                                    f"{found[key]} and {path}; collect each run once")
            found[key] = path
            if r.get("status") == "ok":  # outputs written before the aliases existed get them here
                r = {**r, **{alias: r.get(k) for alias, k in RECORD_ALIASES.items() if alias not in r}}
            records.append(r)
    if len(iters) > 1 or len(extras) > 1:
        raise ScalesegError(f"--collect: the outputs were trained with different settings (--iters {sorted(iters)}, "
                            f"--set {[list(e) for e in sorted(extras)]}); collect runs of one protocol")
    if len(budgets) > 1:
        raise ScalesegError("--collect: the outputs were trained under different memory budgets (--memory-budget-gb, "
                            f"--max-batch-limit: {sorted(budgets, key=str)}; None: the protocol's batch); "
                            "collect runs of one protocol")
    if not records:
        raise ScalesegError("--collect: the outputs hold no runs")
    variants = list(dict.fromkeys(r["variant"] for r in records))
    settings = {
        "variants": {v: VARIANTS[v][1] if v in VARIANTS else None for v in variants},
        "classes": sorted({r["num_classes"] for r in records}), "seeds": sorted({r["seed"] for r in records}),
        "iters": iters.pop(), "shared_overrides": SETTINGS, "extra_overrides": list(extras.pop()),
        "command": " ; ".join(commands), "collected_from": [str(s) for s in sources],
    }
    budget_gb, limit = budgets.pop()
    if budget_gb is not None:
        settings.update(memory_budget_gb=budget_gb, max_batch_limit=limit)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_report(out, records, settings)
    return records, settings


def aggregate(records: list[dict], variants, classes) -> list[dict]:
    """Per (variant, C): mean, min and max over the seeds that finished, for every metric."""
    rows = []
    for v in variants:
        for c in classes:
            runs = [r for r in records if r["variant"] == v and r["num_classes"] == c]
            ok = [r for r in runs if r["status"] == "ok"]
            row = {"variant": v, "num_classes": c, "runs": len(runs), "ok": len(ok),
                   "batch": sorted({r["batch"] for r in runs if "batch" in r}),
                   "seconds": round(sum(r["seconds"] for r in ok) / len(ok), 1) if ok and "seconds" in ok[0] else None}
            for k in METRICS:
                values = [r[k] for r in ok if r.get(k) is not None]
                row[k] = ({"mean": round(sum(values) / len(values), 2), "min": min(values), "max": max(values)}
                          if values else None)
            rows.append(row)
    return rows


def _cell(row: dict, metric: str = "mIoU") -> str:
    stats = row[metric]
    if stats is None:
        return "ERROR" if row["runs"] else "-"
    text = f"{stats['mean']:.2f}"
    if row["ok"] > 1:
        text += f" ({stats['min']:.2f}..{stats['max']:.2f})"
    if row["ok"] < row["runs"]:
        text += f" [{row['runs'] - row['ok']} failed]"
    return text


def format_table(summary: list[dict], variants, classes) -> str:
    """Markdown: rows = variants, columns = C; cells mIoU mean (min..max over seeds), ERROR if no run finished."""
    by = {(r["variant"], r["num_classes"]): r for r in summary}
    lines = ["| variant | " + " | ".join(f"C = {c:,}" for c in classes) + " |", "| --- |" + " --- |" * len(classes)]
    for v in variants:
        lines.append(f"| {v} | " + " | ".join(_cell(by[(v, c)]) for c in classes) + " |")
    return "\n".join(lines)


def format_report(summary: list[dict], variants, classes, settings: dict) -> str:
    seeds = settings["seeds"]
    lines = [format_table(summary, variants, classes), "",
             f"mIoU (%) after {settings['iters']} iterations, mean over seeds {','.join(map(str, seeds))}"
             + (" (min..max)" if len(seeds) > 1 else "") + ". All metrics:", "",
             "| variant | C | " + " | ".join(METRICS) + " | runs ok | seconds per run |",
             "| --- | --- |" + " --- |" * (len(METRICS) + 2)]
    for row in summary:
        seconds = f"{row['seconds']:,.0f}" if row.get("seconds") is not None else "-"
        lines.append(f"| {row['variant']} | {row['num_classes']:,} | "
                     + " | ".join(_cell(row, k) for k in METRICS) + f" | {row['ok']}/{row['runs']} | {seconds} |")
    if settings.get("memory_budget_gb") is not None:
        lines += ["", f"Batch of each run: the largest within {settings['memory_budget_gb']:g} GiB (search limit "
                  f"{settings['max_batch_limit']}; 0: batch 2 does not fit), trained for as many images as "
                  f"{settings['iters']} iterations of the protocol's batch:", "",
                  "| variant | " + " | ".join(f"C = {c:,}" for c in classes) + " |",
                  "| --- |" + " --- |" * len(classes)]
        by = {(row["variant"], row["num_classes"]): row for row in summary}
        for v in variants:
            lines.append(f"| {v} | " + " | ".join(
                ", ".join(map(str, by[(v, c)]["batch"])) or "-" for c in classes) + " |")
    lines += ["", f"Command: `{settings['command']}`"]
    return "\n".join(lines)


def command_line(args) -> str:
    """The `scaleseg bench accuracy` command that reproduces this run (recorded in accuracy.json)."""
    parts = ["scaleseg bench accuracy", "--variants", ",".join(args.variants), "--classes",
             ",".join(map(str, args.classes)), "--seeds", ",".join(map(str, args.seeds))]
    if args.iters is not None:
        parts += ["--iters", str(args.iters)]
    for override in args.set or []:
        parts += ["--set", override]
    if getattr(args, "memory_budget_gb", None) is not None:
        parts += ["--memory-budget-gb", f"{args.memory_budget_gb:g}", "--max-batch-limit", str(args.max_batch_limit)]
    return " ".join(parts + ["--out", str(args.out)])


def plot(summary: list[dict], variants, classes, path: Path, settings: dict) -> None:
    """Grouped bars: one group per C, one bar per variant (mean mIoU, whiskers min..max over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by = {(r["variant"], r["num_classes"]): r for r in summary}
    budget = settings.get("memory_budget_gb")
    width = 0.8 / len(variants)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 + 0.5 * len(variants) * len(classes)), 4.5))
    for i, v in enumerate(variants):
        xs, means, low, high, batches = [], [], [], [], []
        for j, c in enumerate(classes):
            stats = by[(v, c)]["mIoU"]
            if stats is None:
                continue
            xs.append(j - 0.4 + width * (i + 0.5))
            means.append(stats["mean"])
            low.append(stats["mean"] - stats["min"])
            high.append(stats["max"] - stats["mean"])
            batches.append("b=" + ",".join(map(str, by[(v, c)]["batch"])))
        bars = ax.bar(xs, means, width=width * 0.9, yerr=[low, high] if len(settings["seeds"]) > 1 else None,
                      capsize=3, label=v)
        if budget is not None:  # each bar's batch: the point of an equal-memory comparison
            ax.bar_label(bars, batches, fontsize="x-small", label_type="center")
    ax.set_xticks(range(len(classes)), [f"C = {c:,}" for c in classes])
    seeds = ",".join(map(str, settings["seeds"]))
    title = (f"synthetic dataset, batch b = the largest within {budget:g} GiB,\nimages of {settings['iters']} "
             f"iterations at the protocol's batch, seeds {seeds}" if budget is not None
             else f"synthetic dataset, {settings['iters']} iterations, seeds {seeds}")
    ax.set(ylabel="mIoU (%)", title=title)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
