"""`scaleseg bench accuracy`: the head variants (ESS Table 3 ablations) trained the same way, one work dir each."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from scaleseg.bench import accuracy
from scaleseg.cli import main
from scaleseg.config import load_config
from scaleseg.errors import ScalesegError

REPO = Path(__file__).resolve().parents[1]
TINY_RUN = ["data.synthetic.image_size=48", "data.train_pipeline.crop_size=32", "data.synthetic.train_length=16",
            "data.synthetic.val_length=2", "model.decoder.channels=16", "model.decoder.low_level_channels=8",
            "data.num_workers=0", "data.batch_size=2", "train.deterministic=true"]
TINY_SET = [arg for item in TINY_RUN for arg in ("--set", item)]


def test_bench_accuracy_records_each_runs_own_metrics(tmp_path, capsys):
    out = tmp_path / "acc"
    assert main(["bench", "accuracy", "--classes", "10", "--variants", "baseline,ess-knn", "--iters", "2",
                 *TINY_SET, "--no-progress", "--out", str(out)]) == 0
    report = json.loads((out / "accuracy.json").read_text())
    records = report["records"]
    assert [(r["variant"], r["num_classes"], r["seed"], r["status"]) for r in records] == [
        ("baseline", 10, 0, "ok"), ("ess-knn", 10, 0, "ok")]
    for r in records:
        work_dir = out / f"{r['variant']}_C10_seed0"
        own = json.loads((work_dir / "eval" / "iter_000002" / "metrics.json").read_text())
        assert {k: r[k] for k in ("mIoU", "aAcc", "mAcc", "fwIoU")} == {k: own[k] for k in ("mIoU", "aAcc", "mAcc", "fwIoU")}
        assert (r["miou"], r["fwiou"], r["aacc"]) == (own["mIoU"], own["fwIoU"], own["aAcc"])  # the ESS tables' three
        cfg = load_config(work_dir / "config.yaml")  # the run trained what the variant says
        assert cfg.model.head.scorer == ("linear" if r["variant"] == "baseline" else "embedding")
        assert (cfg.data.num_classes, cfg.train.iters, cfg.train.seed, cfg.data.synthetic.image_size) == (10, 2, 0, (48, 48))
        assert (cfg.optim.warmup_iters, cfg.optim.clip_grad_norm) == (100, 5.0)
    summary = {(s["variant"], s["num_classes"]): s for s in report["summary"]}
    assert summary[("ess-knn", 10)]["mIoU"]["mean"] == records[1]["mIoU"]
    assert report["settings"]["command"].startswith(
        "scaleseg bench accuracy --variants baseline,ess-knn --classes 10 --seeds 0 --iters 2 --set data.synthetic")
    table = (out / "accuracy.md").read_text().splitlines()
    assert table[:2] == ["| variant | C = 10 |", "| --- | --- |"]
    assert table[2] == f"| baseline | {records[0]['mIoU']:.2f} |"
    assert table[3] == f"| ess-knn | {records[1]['mIoU']:.2f} |"
    assert (out / "accuracy.png").stat().st_size > 0
    assert "| ess-knn |" in capsys.readouterr().out


def test_aggregate_table_and_failed_runs_recorded(tmp_path):
    """Fake training: mean (min..max) over seeds; a run that raises is recorded, the others go on."""
    fake = {("baseline", 0): 10.0, ("baseline", 1): 13.0, ("baseline", 2): 16.0, ("ess-knn", 0): 7.5}

    def train(cfg, work_dir, resume=False):
        variant = "baseline" if cfg.model.head.scorer == "linear" else "ess-knn"
        if (variant, cfg.train.seed) not in fake:
            raise RuntimeError("diverged")
        m = fake[(variant, cfg.train.seed)]
        return {"mIoU": m, "aAcc": 2 * m, "mAcc": m + 1, "fwIoU": m - 1}

    args = SimpleNamespace(variants=["baseline", "ess-knn"], classes=[12], seeds=[0, 1, 2], iters=3, set=None,
                           out=tmp_path, no_progress=True)
    records = accuracy.run_benchmark(args, train=train)
    assert [r["status"] for r in records] == ["ok"] * 4 + ["error"] * 2
    assert records[4]["error"] == "RuntimeError: diverged"
    report = json.loads((tmp_path / "accuracy.json").read_text())
    base = report["summary"][0]
    assert base["mIoU"] == {"mean": 13.0, "min": 10.0, "max": 16.0} and base["aAcc"]["mean"] == 26.0
    table = accuracy.format_table(report["summary"], args.variants, args.classes).splitlines()
    assert table[2:] == ["| baseline | 13.00 (10.00..16.00) |", "| ess-knn | 7.50 [2 failed] |"]
    all_failed = accuracy.aggregate([{**records[4], "num_classes": 99}], ["ess-knn"], [99])
    assert accuracy.format_table(all_failed, ["ess-knn"], [99]).splitlines()[-1] == "| ess-knn | ERROR |"


def test_variant_overrides_give_the_intended_configs():
    cfgs = {v: load_config(None, accuracy.run_overrides(v, 150, 3)) for v in accuracy.VARIANTS
            if v not in accuracy.PYRAMID_VARIANTS}
    assert set(cfgs) == {"baseline", "ess-knn", "ess-full", "ess-random", "ess-nonorm", "ess-nomargin",  # Table 3
                         "ess-exact", "ess-cached", "ess-block2", "ess-block4", "ess-ivf", "ess-fast",  # supp. C
                         "ess-sphere", "ess-sphere-x3"}  # the class table's LR (docs/ess.md)
    ess_file = load_config(REPO / "configs" / "synthetic" / "ess.yaml")
    for name, cfg in cfgs.items():
        assert (cfg.data.dataset, cfg.data.num_classes, cfg.train.seed, cfg.train.iters) == ("synthetic", 150, 3, 300)
        assert cfg.train.progress is False and cfg.train.eval_interval == 0
        if name.startswith("ess-sphere"):  # the sphere table, at 1x or 3x the base LR instead of 30x
            assert cfg.model.head.embedding.table == "sphere"
            assert cfg.optim.groups.class_embeddings.lr_mult == {"ess-sphere": 1, "ess-sphere-x3": 3}[name]
            assert {k for k in vars(cfg.model.head.embedding)
                    if getattr(cfg.model.head.embedding, k) != getattr(ess_file.model.head.embedding, k)} == {"table"}
            continue
        assert cfg.optim == ess_file.optim  # same warm-up and clipping for every variant
        if name == "baseline":
            assert cfg.model.head.scorer == "linear"
            continue
        e, ref = cfg.model.head.embedding, ess_file.model.head.embedding
        assert cfg.model.head.scorer == "embedding"
        changed = {k for k in vars(ref) if getattr(e, k) != getattr(ref, k)}
        supplementary = {"ess-exact": {}, "ess-cached": {"margin_refresh": 100}, "ess-block2": {"search_block": 2},
                         "ess-block4": {"search_block": 4}, "ess-ivf": {"search_index": "ivf"},
                         "ess-fast": {"search_block": 4, "search_index": "ivf", "margin_refresh": 100}}
        if name in supplementary:  # the exact settings pinned (whatever the defaults), then one change
            want = {"search_block": 1, "search_index": "exact", "margin_refresh": 1, **supplementary[name]}
            assert {k: getattr(e, k) for k in want} == want, name
            assert changed <= set(want), name
            continue
        expected = {"ess-knn": set(), "ess-full": {"loss"}, "ess-random": {"negatives"},
                    "ess-nonorm": {"normalize"}, "ess-nomargin": {"margin_weight"}}[name]
        assert changed == expected, name
    assert cfgs["ess-full"].model.head.embedding.loss == "full"
    assert cfgs["ess-random"].model.head.embedding.negatives == "random"
    assert cfgs["ess-nonorm"].model.head.embedding.normalize is False
    assert cfgs["ess-nomargin"].model.head.embedding.margin_weight == 0
    # --iters and --set apply last
    cfg = load_config(None, accuracy.run_overrides("ess-knn", 20, 0, iters=7, extra=["model.head.embedding.embed_dim=8"]))
    assert (cfg.train.iters, cfg.model.head.embedding.embed_dim) == (7, 8)


def test_table_6_variants_are_the_synthetic_configs_at_the_default_runs_optimiser():
    """single = the default run, single-semantic = configs/synthetic/single_semantic.yaml, pyramid =
    configs/synthetic/pyramid.yaml; the -noctx / -anl / -anl-multi variants differ from them by the context alone."""
    cfgs = {v: load_config(None, accuracy.run_overrides(v, 1000, 0)) for v in accuracy.PYRAMID_VARIANTS}
    assert set(accuracy.PYRAMID_VARIANTS).isdisjoint(accuracy.DEFAULT_VARIANTS)
    default = load_config(None)
    files = {"single": default, "single-semantic": load_config(REPO / "configs/synthetic/single_semantic.yaml"),
             "pyramid": load_config(REPO / "configs/synthetic/pyramid.yaml")}
    for name, cfg in cfgs.items():
        assert cfg.optim == default.optim and cfg.data == default.data, name
        contexts = {"-noctx": False, "-anl-multi": "anl_multi", "-anl": "anl"}  # longest suffix first
        suffix = next((end for end in contexts if name.endswith(end)), "")
        base = files[name.removesuffix(suffix) if suffix else name]
        context = contexts.get(suffix, True)
        assert cfg.model.head.pyramid.context == context and base.model.head.pyramid.context is True, name
        cfg.model.head.pyramid.context = True
        assert cfg.model == base.model, name


@pytest.mark.parametrize("argv, message", [
    (["--variants", "baseline,ess-fancy"], "unknown variant 'ess-fancy'"),
    (["--classes", "10,many"], "--classes '10,many': 'many' is not an integer"),
    (["--classes", "1"], "--classes '1': 1 is below 2"),
    (["--seeds", ""], "--seeds '': the list is empty"),
    (["--classes", "5"], "variant ess-knn, C = 5: model.head.embedding.num_neighbours = 7"),
    (["--set", "train.iterz=3"], "train.iterz"),
    (["--memory-budget-gb", "0"], "--memory-budget-gb 0: must be a positive number of GiB"),
    (["--memory-budget-gb", "nan"], "--memory-budget-gb nan: must be a positive number"),
    (["--memory-budget-gb", "4", "--max-batch-limit", "1"], "--max-batch-limit 1: must be >= 2"),
])
def test_bench_accuracy_rejects_bad_input(argv, message, tmp_path, capsys):
    assert main(["bench", "accuracy", *argv, "--out", str(tmp_path / "acc")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "acc").exists()


def test_list_variants(capsys):
    assert main(["bench", "accuracy", "--list-variants"]) == 0
    text = capsys.readouterr().out
    for name in accuracy.VARIANTS:
        assert text.count(f"\n{name} ") + text.startswith(f"{name} ") == 1
    assert "model.head.embedding.normalize=false" in text


def test_collect_merges_outputs_run_apart_into_the_report_of_one_run(tmp_path, capsys):
    """Fake training: the runs of one benchmark split over three outputs (by variant and by seed) collect
    into the same summary and table as the one benchmark gives; mixed protocols and duplicates are refused."""
    fake = {("baseline", 0): 10.0, ("baseline", 1): 14.0, ("ess-knn", 0): 7.5, ("ess-knn", 1): 9.5}

    def train(cfg, work_dir, resume=False):
        m = fake[("baseline" if cfg.model.head.scorer == "linear" else "ess-knn", cfg.train.seed)]
        return {"mIoU": m, "aAcc": 2 * m, "mAcc": m + 1, "fwIoU": m - 1}

    def bench(out, variants, seeds, iters=3, extra=None):
        args = SimpleNamespace(variants=variants, classes=[12], seeds=seeds, iters=iters, set=extra, out=out,
                               no_progress=True)
        accuracy.run_benchmark(args, train=train)
        return out

    whole = json.loads((bench(tmp_path / "whole", ["baseline", "ess-knn"], [0, 1]) / "accuracy.json").read_text())
    parts = [bench(tmp_path / "a", ["baseline"], [0, 1]), bench(tmp_path / "b", ["ess-knn"], [0]),
             bench(tmp_path / "c", ["ess-knn"], [1], extra=["train.checkpoint_interval=100"])]  # one protocol still
    out = tmp_path / "collected"
    assert main(["bench", "accuracy", "--collect", *map(str, parts), "--out", str(out)]) == 0
    collected = json.loads((out / "accuracy.json").read_text())
    assert collected["summary"] == whole["summary"]
    assert [(r["miou"], r["fwiou"], r["aacc"]) for r in collected["records"]] == [
        (10.0, 9.0, 20.0), (14.0, 13.0, 28.0), (7.5, 6.5, 15.0), (9.5, 8.5, 19.0)]
    assert collected["settings"]["seeds"] == [0, 1] and collected["settings"]["collected_from"] == list(map(str, parts))
    assert (out / "accuracy.md").read_text().splitlines()[:4] == (tmp_path / "whole" / "accuracy.md").read_text().splitlines()[:4]
    assert "| ess-knn | 8.50 (7.50..9.50) |" in capsys.readouterr().out
    assert main(["bench", "accuracy", "--collect", str(parts[0]), str(parts[0]), "--out", str(tmp_path / "x")]) == 2
    assert "baseline C = 12 seed 0 is in both" in capsys.readouterr().err
    other = bench(tmp_path / "d", ["ess-knn"], [2], iters=5)
    assert main(["bench", "accuracy", "--collect", str(parts[0]), str(other), "--out", str(tmp_path / "y")]) == 2
    assert "different settings (--iters [3, 5]" in capsys.readouterr().err
    other = bench(tmp_path / "e", ["ess-knn"], [2], extra=["optim.lr=0.1"])  # a --set that changes the runs
    assert main(["bench", "accuracy", "--collect", str(parts[0]), str(other), "--out", str(tmp_path / "w")]) == 2
    assert "--set [[], ['optim.lr=0.1']]" in capsys.readouterr().err
    assert main(["bench", "accuracy", "--collect", str(tmp_path / "nothing"), "--out", str(tmp_path / "z")]) == 2
    assert "not a `scaleseg bench accuracy` output" in capsys.readouterr().err
    legacy = json.loads((parts[1] / "accuracy.json").read_text())  # an output written before the lower-case keys
    for r in legacy["records"]:
        del r["miou"], r["fwiou"], r["aacc"]
    (parts[1] / "accuracy.json").write_text(json.dumps(legacy))
    assert main(["bench", "accuracy", "--collect", str(parts[1]), "--out", str(tmp_path / "legacy")]) == 0
    [r] = json.loads((tmp_path / "legacy" / "accuracy.json").read_text())["records"]
    assert (r["miou"], r["fwiou"], r["aacc"]) == (7.5, 6.5, 15.0)


def test_pyramid_runs_are_also_read_at_their_finest_level(tmp_path, capsys):
    """S&F Table 8 by the same command: every pyramid run also gets a `<variant>@finest` record, its own
    checkpoint evaluated with eval.pyramid_readout=finest, equal to evaluating it with tau = 1 (the
    definition of the finest level alone); single-level runs get none."""
    out = tmp_path / "acc"
    assert main(["bench", "accuracy", "--classes", "6", "--variants", "single-semantic,pyramid", "--iters", "2",
                 *TINY_SET, "--set", "model.head.pyramid.semantic_channels=16",
                 "--set", "model.head.pyramid.unity_channels=8", "--set", "model.head.pyramid.tau=0.3",
                 "--no-progress", "--out", str(out)]) == 0
    report = json.loads((out / "accuracy.json").read_text())
    assert [(r["variant"], r["status"]) for r in report["records"]] == [
        ("single-semantic", "ok"), ("pyramid", "ok"), ("pyramid@finest", "ok")]
    finest = report["records"][2]
    work_dir = out / "pyramid_C6_seed0"
    assert main(["eval", str(work_dir), "model.head.pyramid.tau=1.0", "--out", str(tmp_path / "tau1"),
                 "--no-progress"]) == 0
    tau1 = json.loads((tmp_path / "tau1" / "metrics.json").read_text())
    assert {k: finest[k] for k in accuracy.METRICS} == {k: tau1[k] for k in accuracy.METRICS}
    assert tau1["level_stride_4"] == 100.0
    fused = json.loads((work_dir / "eval" / "iter_000002" / "metrics.json").read_text())
    assert fused["level_stride_4"] < 100.0  # the fused reading took pixels from coarse levels (tau 0.3)
    assert [row["variant"] for row in report["summary"]] == ["single-semantic", "pyramid", "pyramid@finest"]
    assert "| pyramid@finest |" in (out / "accuracy.md").read_text()
    # the option itself refuses a single-level head, naming the key
    assert main(["eval", str(out / "single-semantic_C6_seed0"), "eval.pyramid_readout=finest",
                 "--out", str(tmp_path / "bad"), "--no-progress"]) == 2
    assert "eval.pyramid_readout = 'finest' needs a pyramid head" in capsys.readouterr().err


def test_memory_budget_trains_each_variant_at_its_largest_fitting_batch_for_equal_images(tmp_path, capsys):
    """--memory-budget-gb: the batch search (doubling, then bisection) on each (variant, C)'s own config;
    each run at its batch for as many images as --iters at the protocol's batch (8); a variant whose batch
    2 does not fit is recorded, not trained. Fake memory model: peak = 100 + per-image cost x batch MiB."""
    cost = {("baseline", 40): 30, ("baseline", 400): 400, ("ess-knn", 40): 20, ("ess-knn", 400): 25}
    measured, trained = [], []

    def measure(overrides, num_classes, batch, crop):
        variant = "ess-knn" if "model.head.scorer=embedding" in overrides else "baseline"
        measured.append((variant, num_classes, batch, crop))
        return {"status": "ok", "peak_mb": 100 + cost[(variant, num_classes)] * batch}

    def train(cfg, work_dir, resume=False):
        trained.append((cfg.model.head.scorer, cfg.data.num_classes, cfg.train.seed, cfg.data.batch_size, cfg.train.iters))
        return {"mIoU": 1.0, "aAcc": 2.0, "mAcc": 3.0, "fwIoU": 4.0}

    args = SimpleNamespace(variants=["baseline", "ess-knn"], classes=[40, 400], seeds=[0, 1], iters=30, set=None,
                           out=tmp_path / "acc", no_progress=True, memory_budget_gb=0.5, max_batch_limit=32)
    records = accuracy.run_benchmark(args, train=train, measure=measure)
    # 512 MiB: baseline 40 -> (512 - 100) // 30 = 13; baseline 400: batch 2 needs 900 MiB; ess-knn -> 20 and 16
    got = {(r["variant"], r["num_classes"], r["seed"]): (r["status"], r["batch"], r["iters"]) for r in records}
    assert got == {("baseline", 40, 0): ("ok", 13, 18), ("baseline", 40, 1): ("ok", 13, 18),
                   ("baseline", 400, 0): ("does not fit", 0, 30), ("baseline", 400, 1): ("does not fit", 0, 30),
                   ("ess-knn", 40, 0): ("ok", 20, 12), ("ess-knn", 40, 1): ("ok", 20, 12),
                   ("ess-knn", 400, 0): ("ok", 16, 15), ("ess-knn", 400, 1): ("ok", 16, 15)}
    assert accuracy.equal_images_iters(30, 8, 13) == 18  # 240 images / 13 = 18.5 -> 18
    assert accuracy.equal_images_iters(1200, 8, 2, grad_accum=4) == 1200  # GA: 9,600 images in steps of 2 x 4
    # one search per (variant, C), not per seed, at the run's crop; doubling then bisection
    assert sorted({m[:2] for m in measured}) == [("baseline", 40), ("baseline", 400), ("ess-knn", 40), ("ess-knn", 400)]
    assert [m[2] for m in measured if m[:2] == ("baseline", 40)] == [2, 4, 8, 16, 12, 14, 13]
    assert all(m[3] == 128 for m in measured)
    assert sorted(trained) == sorted([("linear", 40, s, 13, 18) for s in (0, 1)] + [("embedding", 40, s, 20, 12) for s in (0, 1)]
                                     + [("embedding", 400, s, 16, 15) for s in (0, 1)])
    report = json.loads((tmp_path / "acc" / "accuracy.json").read_text())
    assert report["settings"]["memory_budget_gb"] == 0.5
    assert report["settings"]["command"].endswith("--memory-budget-gb 0.5 --max-batch-limit 32 --out " + str(tmp_path / "acc"))
    text = (tmp_path / "acc" / "accuracy.md").read_text()
    assert "| baseline | 13 | 0 |" in text and "| ess-knn | 20 | 16 |" in text
    # --collect keeps the budget (and so the batch table), and refuses to mix it with runs at the protocol's batch
    assert main(["bench", "accuracy", "--collect", str(tmp_path / "acc"), "--out", str(tmp_path / "merged")]) == 0
    merged = json.loads((tmp_path / "merged" / "accuracy.json").read_text())
    assert (merged["settings"]["memory_budget_gb"], merged["settings"]["max_batch_limit"]) == (0.5, 32)
    assert "| ess-knn | 20 | 16 |" in (tmp_path / "merged" / "accuracy.md").read_text()
    plain = SimpleNamespace(**{**vars(args), "memory_budget_gb": None, "classes": [40], "seeds": [2],
                               "out": tmp_path / "plain"})
    accuracy.run_benchmark(plain, train=train)
    assert main(["bench", "accuracy", "--collect", str(tmp_path / "acc"), str(tmp_path / "plain"),
                 "--out", str(tmp_path / "mixed")]) == 2
    assert "different memory budgets" in capsys.readouterr().err


def test_memory_budget_with_grad_accum_keeps_the_images_seen(tmp_path):
    """ESS Table 5's GA row: --set train.grad_accum=4 at a budget batch of 2 runs a quarter of the steps
    of batch 2 alone, so every run sees --iters x 8 images (accumulation adds steps' batch, not images)."""
    trained = []

    def train(cfg, work_dir, resume=False):
        trained.append((cfg.data.batch_size, cfg.train.grad_accum, cfg.train.iters))
        return {"mIoU": 1.0, "aAcc": 2.0, "mAcc": 3.0, "fwIoU": 4.0}

    args = SimpleNamespace(variants=["baseline"], classes=[40], seeds=[0], iters=30, set=["train.grad_accum=4"],
                           out=tmp_path / "acc", no_progress=True, memory_budget_gb=0.5, max_batch_limit=32)
    records = accuracy.run_benchmark(args, train=train, measure=lambda o, c, b, crop: {
        "status": "ok", "peak_mb": 100 + 150 * b})  # (512 - 100) // 150 = 2 images fit
    assert trained == [(2, 4, 30)]
    assert (records[0]["batch"], records[0]["iters"], records[0]["images_seen"]) == (2, 30, 240)


def test_memory_budget_reports_a_failed_trial_as_an_error_not_as_does_not_fit(tmp_path):
    """ESS Table 5's GN row with a group size that does not divide the tiny model's widths: the real
    trial process fails with the model's ConfigError. The record says so (not "batch 2 needs more than
    B GiB", as a lack of memory would), nothing is trained, and the benchmark goes on to the next run
    (seed 1, which fails the same way)."""
    trained = []

    def train(cfg, work_dir, resume=False):
        trained.append(cfg.model.norm)
        return {"mIoU": 1.0, "aAcc": 2.0, "mAcc": 3.0, "fwIoU": 4.0}

    args = SimpleNamespace(variants=["baseline"], classes=[10], seeds=[0, 1], iters=2, out=tmp_path / "acc",
                           set=[*TINY_RUN, "model.norm=group", "model.group_norm_channels=16"], no_progress=True,
                           memory_budget_gb=4.0, max_batch_limit=2)
    records = accuracy.run_benchmark(args, train=train)  # the real trial process (measure_batch)
    assert trained == [] and [r["status"] for r in records] == ["error", "error"]
    assert "baseline: the 4 GiB batch search at C = 10: the memory trial at batch 2 failed (error), not for lack" \
        in records[0]["error"] and "group_norm_channels = 16 does not divide" in records[0]["error"]
    args.set[-1] = "model.group_norm_channels=8"  # a group size that fits every width: measured, then trained
    args.out = tmp_path / "acc8"
    records = accuracy.run_benchmark(args, train=train)
    assert trained == ["group", "group"] and [r["status"] for r in records] == ["ok", "ok"]
    assert records[0]["batch"] == 2 and records[0]["batch_trials"][0]["status"] == "ok"


def test_memory_budget_measures_a_real_training_step(tmp_path):
    """The default measurement: a fresh process runs two training steps of the run's own config."""
    overrides = accuracy.run_overrides("baseline", 10, 0, 2, TINY_RUN)
    record = accuracy.measure_batch(overrides, 10, 2, 32)
    assert record["status"] == "ok" and 100 < record["peak_mb"] < 4096
    found = accuracy.budget_batch(overrides, 10, 32, budget_gb=record["peak_mb"] / 1024 / 2, limit=4)
    assert found["batch"] == 0 and found["trials"][0]["fits"] is False  # half of batch 2's peak: nothing fits


def test_resume_continues_a_stopped_run_from_its_checkpoint_to_the_uninterrupted_result(tmp_path):
    """A benchmark stopped mid-run (here: the step after the checkpoint at iteration 2 raises) continues
    with --resume from that checkpoint and ends with the metrics of the same run never stopped."""
    from scaleseg.engine.trainer import Trainer

    def args(out, resume=False):
        return SimpleNamespace(variants=["baseline"], classes=[10], seeds=[0], iters=4, out=out, no_progress=True,
                               set=[*TINY_RUN, "train.checkpoint_interval=2"], resume=resume)

    def stopped_at_iteration_3(cfg, work_dir, resume=False):
        trainer = Trainer(cfg, work_dir=work_dir, resume=resume)
        step = trainer.run_step

        def run_step():
            if trainer.state.iteration == 3:
                raise RuntimeError("the job was stopped")
            return step()
        trainer.run_step = run_step
        return trainer.run()

    whole = accuracy.run_benchmark(args(tmp_path / "whole"))
    stopped = accuracy.run_benchmark(args(tmp_path / "acc"), train=stopped_at_iteration_3)
    assert [r["status"] for r in stopped] == ["error"] and "the job was stopped" in stopped[0]["error"]
    run_dir = tmp_path / "acc" / "baseline_C10_seed0"
    assert [p.name for p in sorted(run_dir.glob("iter_*.pth"))] == ["iter_000002.pth"]
    with pytest.raises(ScalesegError, match="holds runs of an earlier benchmark .*baseline_C10_seed0.*--resume"):
        accuracy.run_benchmark(args(tmp_path / "acc"))  # not without --resume: nothing is overwritten
    assert json.loads((tmp_path / "acc" / "accuracy.json").read_text())["records"][0]["status"] == "error"
    resumed = accuracy.run_benchmark(args(tmp_path / "acc", resume=True))
    assert resumed[0]["status"] == "ok" and resumed[0]["resumed"] is True
    assert "resumed from" in (run_dir / "train.log").read_text() and (run_dir / "iter_000004.pth").exists()
    assert {k: resumed[0][k] for k in METRIC_KEYS} == {k: whole[0][k] for k in METRIC_KEYS}


METRIC_KEYS = ("mIoU", "aAcc", "mAcc", "fwIoU", "miou", "fwiou", "aacc")


def test_resume_keeps_finished_runs_and_each_batch_search_and_refuses_another_protocol(tmp_path, capsys):
    """--resume under a budget: the runs recorded ok are not trained again, the others continue at the
    batch their (variant, C)'s first search found (no second search, whose measurement could differ),
    and an output written with other options is refused, naming the option."""
    trained, measured = [], []

    def measure(overrides, num_classes, batch, crop):
        measured.append(batch)
        return {"status": "ok", "peak_mb": 100 + 30 * batch}  # 512 MiB: batch 13

    def train(cfg, work_dir, resume=False):
        trained.append((cfg.train.seed, cfg.data.batch_size, resume))
        if cfg.train.seed == 1 and not resume:
            raise RuntimeError("killed")
        return {"mIoU": 10.0 + cfg.train.seed, "aAcc": 2.0, "mAcc": 3.0, "fwIoU": 4.0}

    out = tmp_path / "acc"
    args = SimpleNamespace(variants=["baseline"], classes=[40], seeds=[0, 1], iters=30, set=None, out=out,
                           no_progress=True, memory_budget_gb=0.5, max_batch_limit=32)
    first = accuracy.run_benchmark(args, train=train, measure=measure)
    assert [r["status"] for r in first] == ["ok", "error"] and trained == [(0, 13, False), (1, 13, False)]
    searches = json.loads((out / "batch_search.json").read_text())["batches"]
    assert [(b["variant"], b["num_classes"], b["batch"]) for b in searches] == [("baseline", 40, 13)]
    measured.clear()
    args.resume = True
    resumed = accuracy.run_benchmark(args, train=train, measure=measure)
    assert trained[2:] == [(1, 13, True)] and measured == []  # seed 0 kept, seed 1 continued, nothing re-measured
    assert resumed[0] == first[0] and (resumed[1]["status"], resumed[1]["mIoU"], resumed[1]["batch"]) == ("ok", 11.0, 13)
    report = json.loads((out / "accuracy.json").read_text())
    assert report["summary"][0]["mIoU"]["mean"] == 10.5
    args.seeds = [0, 1, 2]  # more seeds of the same protocol: only the new one trains
    accuracy.run_benchmark(args, train=train, measure=measure)
    assert trained[3:] == [(2, 13, True)] and measured == []
    for change, message in ((dict(iters=60), "iters = 30, this command has 60"),
                            (dict(set=["train.seed=3"]), "extra_overrides = \\[\\], this command has \\['train.seed=3'\\]"),
                            (dict(memory_budget_gb=1.0), "memory_budget_gb = 0.5, this command has 1.0")):
        with pytest.raises(ScalesegError, match=f"--resume: .*accuracy.json was written with {message}"):
            accuracy.run_benchmark(SimpleNamespace(**{**vars(args), **change}), train=train, measure=measure)
    (out / "accuracy.json").write_text("{not json")
    with pytest.raises(ScalesegError, match="accuracy.json is not a readable `scaleseg bench accuracy` file"):
        accuracy.run_benchmark(args, train=train, measure=measure)
    # the CLI: --resume is an option; the recorded reproducing command stays the one without it
    assert main(["bench", "accuracy", "--classes", "10", "--variants", "baseline", "--iters", "2", *TINY_SET,
                 "--no-progress", "--out", str(tmp_path / "cli"), "--resume"]) == 0
    report = json.loads((tmp_path / "cli" / "accuracy.json").read_text())
    assert "--resume" not in report["settings"]["command"] and report["records"][0]["status"] == "ok"
    assert main(["bench", "accuracy", "--classes", "10", "--variants", "baseline", "--iters", "2", *TINY_SET,
                 "--no-progress", "--out", str(tmp_path / "cli"), "--resume"]) == 0  # all done: trains nothing
    assert json.loads((tmp_path / "cli" / "accuracy.json").read_text())["records"] == report["records"]
