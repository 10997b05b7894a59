"""The `scaleseg` command: train, eval, predict, export.

    scaleseg train [CONFIG.yaml] [key=value ...] [--work-dir DIR] [--resume [CKPT]]
    scaleseg eval  WORK_DIR | CONFIG.yaml | CKPT.pth [key=value ...] [--checkpoint CKPT] [--out DIR]
    scaleseg predict CKPT.pth IMAGE_OR_FOLDER --out DIR [key=value ...] [--batch-size 8] [--workers 2]
    scaleseg export CKPT.pth --format onnx|safetensors [--out FILE] [--chunk-classes N] [--no-verify]
    scaleseg prepare {cityscapes,voc-aug,ade20k-full,coco-lvis,pascal-context} ...
    scaleseg check-data [CONFIG.yaml] [key=value ...] [--splits train,val] [--no-progress]
    scaleseg bench memory ...

`key=value` items are dotted config overrides (model.backbone=resnet50 train.iters=200).
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from pathlib import Path

from scaleseg.errors import ScalesegError, user_message
from scaleseg.bench.memory import DEFAULT_CLASSES


def _split_config_and_overrides(items: list[str]) -> tuple[str | None, list[str]]:
    config, overrides = None, []
    for item in items:
        if "=" in item:
            overrides.append(item)
        elif config is None:
            config = item
        else:
            raise ScalesegError(f"unexpected argument {item!r}: give one config file, then key=value overrides")
    return config, overrides


def cmd_train(args: argparse.Namespace) -> int:
    from scaleseg.config import load_config
    from scaleseg.engine.trainer import Trainer, default_work_dir

    config, overrides = _split_config_and_overrides(args.args)
    cfg = load_config(config, overrides)
    resume = True if args.resume == "" else (args.resume or False)
    Trainer(cfg, work_dir=args.work_dir or default_work_dir(cfg, config), resume=resume).run()
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from scaleseg.data import build_dataset, build_eval_loader
    from scaleseg.engine.checkpoint import resolve_run
    from scaleseg.engine.evaluator import evaluate, format_table, write_results
    from scaleseg.engine.runtime import amp_dtype, log_to, select_device, show_progress
    from scaleseg.engine.trainer import dataset_meta
    from scaleseg.engine.workdir import check_writable

    run = resolve_run(args.target, args.overrides, args.checkpoint)
    cfg, ckpt = run.cfg, run.checkpoint
    out_dir = Path(args.out) if args.out else run.eval_dir
    check_writable(out_dir, "the output folder")  # before a long evaluation, not after it
    with log_to(None) as log:
        device = select_device(cfg.train.device)
        dataset = build_dataset(cfg.data, "val")
        meta = dataset_meta(dataset, cfg)
        model = run.model().to(device)
        log.info(f"evaluating {run.checkpoint_path} (iteration {ckpt.get('iteration')}) on {cfg.data.dataset} val, "
                 f"{len(dataset)} images, mode {cfg.eval.mode}, scales {list(cfg.eval.scales)}, flip {cfg.eval.flip}")
        loader = build_eval_loader(cfg.data, dataset, meta["ignore_index"])
        results = evaluate(
            model, loader, meta["num_classes"], meta["ignore_index"], cfg.eval, device,
            amp_dtype(cfg.train, device), progress=show_progress(not args.no_progress),
        )
        json_path, csv_path = write_results(
            results, meta["class_names"], out_dir,
            extra={"checkpoint": str(run.checkpoint_path), "iteration": ckpt.get("iteration")},
        )
        for problem in results["skipped"]:
            log.warning(f"skipped a bad val sample, not scored (data.on_bad_sample=skip): {problem}")
        log.info(format_table(results, meta["class_names"], show=args.show))
        log.info(f"wrote {json_path} and {csv_path}")
    return 0


def cmd_check_data(args: argparse.Namespace) -> int:
    """Read every sample of the configured dataset's splits; print a summary and every problem.
    Exit status 0 when clean, 1 when a problem was found."""
    import json

    from scaleseg.config import load_config
    from scaleseg.data.check import check_config, format_report

    config, overrides = _split_config_and_overrides(args.args)
    cfg = load_config(config, overrides)
    splits = [s.strip() for s in args.splits.split(",") if s.strip()]
    if not splits:
        raise ScalesegError(f"--splits {args.splits!r} names no split; e.g. --splits train,val")
    if args.workers is not None and args.workers < 0:
        raise ScalesegError(f"--workers {args.workers}: must be >= 0")
    from scaleseg.engine.runtime import show_progress

    reports = check_config(cfg.data, splits, progress=show_progress(not args.no_progress), num_workers=args.workers)
    print(format_report(reports))
    for r in reports:
        if r.num_classes and r.num_classes != cfg.data.num_classes:
            print(f"note: data.num_classes = {cfg.data.num_classes} but {r.dataset} {r.split} has {r.num_classes} "
                  f"classes; training needs data.num_classes={r.num_classes}")
            break
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps([r.to_dict() for r in reports], indent=1))
        print(f"wrote {out}")
    return 0 if all(r.ok for r in reports) else 1


def cmd_predict(args: argparse.Namespace) -> int:
    """Label maps and overlays for an image or a folder (engine/predict.py). Exit status 1 when a file
    could not be read or predicted (all of them listed, and in OUT/failures.txt)."""
    from scaleseg.engine.predict import predict_files
    from scaleseg.engine.runtime import log_to

    report = predict_files(args.checkpoint, args.input, args.out, args.overrides, batch_size=args.batch_size,
                           workers=args.workers, progress=not args.no_progress)
    failures = report.failures
    with log_to(None) as log:
        log.info(f"predicted {len(report.files) - len(failures)} of {len(report.files)} images into {report.out}")
        if failures:
            log.info(f"{len(failures)} failed (all listed in {report.listing}):")
            for p, m in failures[:20]:
                log.info(f"  {p}: {m}")
            if len(failures) > 20:
                log.info(f"  ... and {len(failures) - 20} more")
    return 1 if failures else 0


def cmd_export(args: argparse.Namespace) -> int:
    """A checkpoint as ONNX (the whole predictor, verified with onnxruntime) or safetensors, each with a
    JSON sidecar."""
    from scaleseg.export import DEFAULT_CHUNK_CLASSES, export_onnx, export_safetensors

    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        raise ScalesegError(f"unexpected argument {bad[0]!r}: give one checkpoint, then key=value overrides")
    if args.format == "safetensors":
        if args.chunk_classes is not None:
            raise ScalesegError("--chunk-classes applies to --format onnx only (the embedding scorer's search)")
        result = export_safetensors(args.checkpoint, args.out, args.overrides)
        print(f"wrote {result['safetensors']} ({result['tensors']} tensors) and {result['sidecar']}")
        print("load it with scaleseg.export.load_safetensors_model(path) -> (model, meta)")
        return 0
    result = export_onnx(
        args.checkpoint, args.out, args.overrides,
        chunk_classes=DEFAULT_CHUNK_CLASSES if args.chunk_classes is None else args.chunk_classes,
        verify=not args.no_verify,
    )
    print(f"wrote {result['onnx']} and {result['sidecar']}")
    check = result["verification"]
    if check is None:
        print("not verified (--no-verify)")
    else:
        shapes = ", ".join("x".join(map(str, s)) for s in check["shapes"])
        print(f"verified with {check['runtime']}: labels agree with PyTorch on {check['agreement']:.4%} of "
              f"{check['pixels']} pixels (random images, B x H x W = {shapes})")
    return 0


def cmd_bench_memory(args: argparse.Namespace) -> int:
    from scaleseg.bench.memory import HEADS, format_table, run_benchmark

    unknown = [h for h in args.heads if h not in HEADS]
    if unknown:
        raise ScalesegError(f"unknown head {unknown[0]!r} for --heads; choose from {', '.join(HEADS)}")
    from scaleseg.config import load_config

    load_config(None, list(args.set or []))  # a bad --set fails here, naming the key, not in every child
    records = run_benchmark(args)
    print(format_table(records, args.heads, args.classes))
    print(f"wrote {Path(args.out) / 'memory.json'}, memory.md and memory.png")
    return 0


def _int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def cmd_bench_accuracy(args: argparse.Namespace) -> int:
    from scaleseg.bench import accuracy

    if args.list_variants:
        print(accuracy.list_variants())
        return 0
    if args.collect:
        records, settings = accuracy.collect(args.collect, args.out)
        summary = accuracy.aggregate(records, list(settings["variants"]), settings["classes"])
        print(accuracy.format_table(summary, list(settings["variants"]), settings["classes"]))
        print(f"collected {len(records)} runs from {len(args.collect)} outputs; wrote {Path(args.out) / 'accuracy.json'}, "
              "accuracy.md and accuracy.png")
        return 0
    args.variants = accuracy.parse_names(args.variants)
    args.classes = accuracy.parse_ints(args.classes, "--classes", 2)
    args.seeds = accuracy.parse_ints(args.seeds, "--seeds", 0)
    if args.iters is not None and args.iters < 1:
        raise ScalesegError(f"--iters {args.iters}: must be >= 1")
    if args.memory_budget_gb is not None and not (math.isfinite(args.memory_budget_gb) and args.memory_budget_gb > 0):
        raise ScalesegError(f"--memory-budget-gb {args.memory_budget_gb:g}: must be a positive number of GiB")
    if args.max_batch_limit < 2:
        raise ScalesegError(f"--max-batch-limit {args.max_batch_limit}: must be >= 2 (BatchNorm needs two images)")
    records = accuracy.run_benchmark(args)
    print(accuracy.format_table(accuracy.aggregate(records, args.variants, args.classes), args.variants, args.classes))
    for r in records:
        if r["status"] == "does not fit":
            print(f"does not fit: {r['variant']} C = {r['num_classes']}: {r['error']} (recorded, not trained)")
    failed = [r for r in records if r["status"] not in ("ok", "does not fit")]
    for r in failed:
        print(f"failed: {r['variant']} C = {r['num_classes']} seed {r['seed']}: {r['error']}")
    print(f"wrote {Path(args.out) / 'accuracy.json'}, accuracy.md and accuracy.png")
    return 1 if failed else 0


def cmd_analyze(args: argparse.Namespace) -> int:
    """The ESS supplementary's embedding figures (section D) and per-class IoU plots of a trained run."""
    import shlex

    from scaleseg.analysis import analyze, format_summary

    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        raise ScalesegError(f"unexpected argument {bad[0]!r}: give one work dir or checkpoint, then key=value overrides")
    summary = analyze(
        args.target, args.overrides, out=args.out, images=args.images, clusters=args.clusters, compare=args.compare,
        leaves=args.leaves, top_classes=args.top_classes, frequency_split=args.frequency_split,
        frequency_images=args.frequency_images, progress=not args.no_progress, loss_gradients=args.loss_gradients,
        command=" ".join(shlex.quote(str(a)) for a in [
            "scaleseg", "analyze", args.target, *args.overrides, *(["--out", args.out] if args.out else []),
            "--images", args.images, *(["--clusters", args.clusters] if args.clusters else []),
            *(["--compare", args.compare] if args.compare else []), "--leaves", args.leaves,
            "--top-classes", args.top_classes, "--frequency-split", args.frequency_split,
            "--frequency-images", args.frequency_images,
            *(["--loss-gradients", args.loss_gradients] if args.loss_gradients else [])]),
    )
    print(format_summary(summary))
    return 0


def cmd_bench_speed(args: argparse.Namespace) -> int:
    from scaleseg.bench import speed

    args.classes = speed.parse_classes(args.classes)
    args.heads = [h for h in args.heads.split(",") if h]
    speed.check_args(args)
    report = speed.run_benchmark(args)
    print(speed.format_markdown(report))
    print(f"wrote {Path(args.out) / 'speed.json'}, speed.md and speed.png")
    return 0


def _version() -> str:
    """`scaleseg --version`: this package's version and the PyTorch it runs on (without importing torch)."""
    from importlib.metadata import PackageNotFoundError, version

    import scaleseg

    try:
        torch_version = version("torch")
    except PackageNotFoundError:  # pragma: no cover - torch is a requirement
        torch_version = "not installed"
    return f"scaleseg {scaleseg.__version__} (torch {torch_version}, Python {sys.version.split()[0]})"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="scaleseg", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model (no arguments: the built-in synthetic default run)")
    p.add_argument("args", nargs="*", metavar="CONFIG|key=value", help="a YAML config, then dotted overrides")
    p.add_argument("--work-dir", help="output folder (default: work_dirs/default without a config file, "
                                      "work_dirs/<folder>_<stem> for CONFIG <folder>/<stem>.yaml)")
    p.add_argument(
        "--resume", nargs="?", const="", default=None, metavar="CKPT",
        help="continue from CKPT, or without a value from the work dir's last checkpoint",
    )
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="evaluate a checkpoint on the val split: table, metrics.json, per_class.csv")
    p.add_argument("target", help="a work dir, a config file (with --checkpoint), or a checkpoint")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.add_argument("--checkpoint", help="checkpoint to evaluate (default for a work dir: best.pth, else the last)")
    p.add_argument("--out", help="output folder (default: <work dir>/eval/<checkpoint name>)")
    p.add_argument("--show", type=int, default=20, help="classes listed in the console table (most frequent first)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("predict", help="label maps and colour overlays for an image or a folder of images")
    p.add_argument("checkpoint")
    p.add_argument("input", help="an image file or a folder (searched recursively)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. eval.mode=slide eval.flip=true")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--batch-size", type=int, default=8,
                   help="images predicted together; only consecutive images of one size are batched (default 8)")
    p.add_argument("--workers", type=int, default=2, help="image reader processes (default 2; 0: the main process)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("export", help="ONNX (the whole predictor) or safetensors weights, with a JSON sidecar")
    p.add_argument("checkpoint")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, rarely needed")
    p.add_argument("--format", required=True, choices=["onnx", "safetensors"])
    p.add_argument("--out", help="file to write (default: beside the checkpoint, <stem>.onnx or <stem>.safetensors); "
                                 "the JSON sidecar is <stem>.json beside it")
    p.add_argument("--chunk-classes", type=int, default=None, metavar="N",
                   help="onnx, embedding scorer: classes per step of the in-graph nearest-class search (default 1024); "
                        "peak memory about B*H*W*N*4 bytes")
    p.add_argument("--no-verify", action="store_true",
                   help="onnx: skip the onnxruntime-vs-PyTorch check on random images")
    p.set_defaults(func=cmd_export)

    from scaleseg.data.prepare import add_parsers as add_prepare_parsers

    prepare = sub.add_parser("prepare", help="convert a downloaded dataset to the files its loader reads")
    add_prepare_parsers(prepare.add_subparsers(dest="dataset", required=True))

    p = sub.add_parser("check-data", help="read every sample of the dataset's splits and report every problem")
    p.add_argument("args", nargs="*", metavar="CONFIG|key=value", help="a YAML config, then dotted overrides")
    p.add_argument("--splits", default="train,val", help="comma-separated splits to check (default train,val)")
    p.add_argument("--workers", type=int, default=None, help="reader processes (default data.num_workers)")
    p.add_argument("--json", metavar="FILE", help="also write the full report (per-class pixel and image counts)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_check_data)

    bench = sub.add_parser("bench", help="memory and speed benchmarks").add_subparsers(dest="bench", required=True)
    p = bench.add_parser("memory", help="peak training memory vs number of classes, one process per configuration")
    p.add_argument("--classes", type=_int_list, default=list(DEFAULT_CLASSES), metavar="C,C,...")
    p.add_argument("--heads", type=lambda t: t.split(","), default=["baseline", "ess-knn", "ess-full"],
                   metavar="H,H,...", help="baseline, ess-knn, ess-full, pyramid-linear, pyramid-ess")
    p.add_argument("--backbone", default="resnet50")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--crop", type=int, default=256)
    p.add_argument("--device", default="auto")
    p.add_argument("--steps", type=int, default=2, help="training steps per configuration (>= 2: momentum buffers)")
    p.add_argument("--loss-resolution", default="full", choices=["full", "decoder"])
    p.add_argument("--limit-gb", type=float, default=None,
                   help="CPU: address-space limit per process, so running out of memory is an error, not the OOM killer")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="extra config override for every configuration (repeatable), e.g. model.head.embedding.search_budget_mb=64")
    p.add_argument("--max-batch", type=float, default=None, metavar="BUDGET_GB",
                   help="also find, per (head, C), the largest batch whose training step peaks within BUDGET_GB GiB "
                        "(doubling, then bisection; one process per trial)")
    p.add_argument("--max-batch-limit", type=int, default=256, metavar="N",
                   help="largest batch the --max-batch search tries (default 256)")
    p.add_argument("--out", default="bench_results/memory")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_bench_memory)

    from scaleseg.bench.accuracy import DEFAULT_VARIANTS as default_variants
    from scaleseg.bench.accuracy import VARIANTS as accuracy_variants

    p = bench.add_parser("accuracy", help="mIoU of the head variants (ESS ablations, S&F Table 6) after the same training")
    p.add_argument("--variants", default=",".join(default_variants), metavar="V,V,...",
                   help="comma-separated, from: " + ", ".join(accuracy_variants) + " (default: "
                        + ", ".join(default_variants) + ")")
    p.add_argument("--classes", default="150,1000", metavar="C,C,...", help="class counts (default 150,1000)")
    p.add_argument("--seeds", default="0", metavar="S,S,...", help="training seeds (default 0)")
    p.add_argument("--iters", type=int, default=None, help="training iterations per run (default 300)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="extra config override for every run (repeatable, applied last), e.g. train.device=cuda")
    p.add_argument("--memory-budget-gb", type=float, default=None, metavar="GB",
                   help="train each (variant, C) at the largest batch whose training step fits GB GiB (measured "
                        "like bench memory --max-batch, at the run's model and crop), for as many training images "
                        "as --iters iterations at the protocol's batch (ESS's equal-memory comparison)")
    p.add_argument("--max-batch-limit", type=int, default=64, metavar="N",
                   help="largest batch the --memory-budget-gb search tries (default 64)")
    p.add_argument("--list-variants", action="store_true", help="print every variant's overrides and exit")
    p.add_argument("--collect", nargs="+", metavar="DIR",
                   help="train nothing: one report in --out from several outputs of this command (e.g. one per "
                        "variant and seed, run in parallel)")
    p.add_argument("--out", default="bench_results/accuracy")
    p.add_argument("--resume", action="store_true",
                   help="continue the benchmark stopped in --out (same options): keep its finished runs, continue "
                        "the others from their newest checkpoint (see train.checkpoint_interval) at the batch "
                        "their search found")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_bench_accuracy)

    p = sub.add_parser("analyze", help="embedding figures of a trained ESS run (ESS supp. section D), per-class IoU, "
                                                "loss gradients")
    p.add_argument("target", help="a work dir (best.pth, else the last checkpoint) or a checkpoint")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. data.root=... train.device=cpu")
    p.add_argument("--out", help="output folder (default: <work dir>/analysis)")
    p.add_argument("--images", type=int, default=4, help="val images for the pixel-embedding figures (default 4)")
    p.add_argument("--clusters", type=int, default=None, help="k-means clusters (default round(sqrt(C)))")
    p.add_argument("--compare", metavar="OTHER_WORK_DIR", help="another run for the per-class IoU plots")
    p.add_argument("--leaves", type=int, default=60, help="dendrogram leaves; more classes: the top of the tree")
    p.add_argument("--top-classes", type=int, default=0, help="dendrogram of the N most frequent classes (0: all)")
    p.add_argument("--frequency-split", default="train", choices=["train", "val"], help="split whose labels are counted")
    p.add_argument("--frequency-images", type=int, default=1000, help="images counted, spread evenly (0: all)")
    p.add_argument("--loss-gradients", type=int, default=0, metavar="N",
                   help="also measure each loss term's gradient at the head's input on N training batches (any head; "
                        "a pyramid: the unity term against the classification term)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_analyze)

    p = bench.add_parser("speed", help="training-step and inference time vs number of classes, with a breakdown")
    p.add_argument("--classes", default="19,1284,20000", metavar="C,C,...", help="class counts (default 19,1284,20000)")
    p.add_argument("--heads", default="baseline,ess-knn,ess-full", metavar="H,H,...",
                   help="from bench memory's heads (baseline, ess-knn, ess-knn-fast, ...); HEAD@C runs HEAD only up to C classes")
    p.add_argument("--backbone", default="resnet50")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--crop", type=int, default=256)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--loss-resolution", default="full", choices=["full", "decoder"])
    p.add_argument("--warmup", type=int, default=2, help="untimed repetitions first (default 2)")
    p.add_argument("--repeats", type=int, default=5, help="timed repetitions; median and min/max reported (default 5)")
    p.add_argument("--rounds", type=int, default=1,
                   help="run every configuration this many times, round by round, pooling the timed repetitions "
                        "(load drifting over a long run then hits every configuration alike; default 1)")
    p.add_argument("--knn-pixels", type=int, default=2 * 256 * 256 // 16,
                   help="queries of the torch-vs-FAISS search comparison (default 8192; 0 skips it)")
    p.add_argument("--no-inference", action="store_true",
                   help="time the training step only (inference decides every pixel by an exact search of all C "
                        "classes: minutes per image at C = 1,000,000 on a CPU)")
    p.add_argument("--limit-gb", type=float, default=None,
                   help="CPU: address-space limit per process, so running out of memory is recorded as OOM")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="extra config override for every configuration (repeatable), e.g. model.head.embedding.search_backend=faiss")
    p.add_argument("--out", default="bench_results/speed")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_bench_speed)
    return parser


# command -> the attribute holding its `key=value` overrides (for train and check-data: the positional list
# that also holds the config file)
_OVERRIDE_LISTS = {"train": "args", "check-data": "args", "eval": "overrides", "predict": "overrides",
                   "export": "overrides", "analyze": "overrides"}


_OVERRIDE = re.compile(r"^[A-Za-z_]\w*(\.\w+)+=")  # a dotted `key=value` override


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse a command line, accepting `key=value` overrides anywhere on it (before, between or after the
    --options): argparse stops filling a positional list at the first option, so what it leaves over is
    appended to the command's override list. Unknown options stay errors (exit status 2)."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    # `--resume` takes an optional CKPT: an override right after it is an override, not a checkpoint
    argv = ["--resume=" if a == "--resume" and _OVERRIDE.match(b) else a for a, b in zip(argv, [*argv[1:], ""])]
    args, extras = parser.parse_known_args(argv)
    target = _OVERRIDE_LISTS.get(args.command)
    unknown = [e for e in extras if e.startswith("-") or target is None]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if extras:
        setattr(args, target, [*getattr(args, target), *extras])
    return args


def _interrupted(args: argparse.Namespace, exc: KeyboardInterrupt) -> str:
    """What Ctrl-C leaves behind, per command (training says which checkpoint to --resume from)."""
    from scaleseg.engine.trainer import TrainingInterrupted

    if isinstance(exc, TrainingInterrupted):
        return str(exc)
    if args.command == "train":
        return "interrupted; continue the run with --resume"
    if args.command == "predict":
        return f"interrupted; the label maps already written in {args.out} are complete, run the command again for the rest"
    if args.command == "prepare":
        return (f"interrupted; finished files are kept: run the same `scaleseg prepare {args.dataset}` command "
                "again to continue where it stopped")
    return "interrupted"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return args.func(args)
    except ScalesegError as exc:
        print(f"scaleseg {args.command}: error: {user_message(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        print(f"scaleseg {args.command}: {_interrupted(args, exc)}", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
