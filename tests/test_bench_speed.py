"""`scaleseg bench speed`: training-step parts, inference time and search backends per (head, C)."""

import json
import statistics

import pytest
import torch

from scaleseg.bench import speed
from scaleseg.cli import main

TINY = ["--backbone", "resnet_tiny", "--crop", "32", "--batch", "2", "--classes", "10,50", "--repeats", "2",
        "--warmup", "1", "--knn-pixels", "256", "--no-progress"]
HEADS = ["baseline", "ess-knn", "ess-full"]


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: two threads on a shared 2-core machine only wait for each other
    yield
    torch.set_num_threads(threads)


def _in_process(job):
    """The child's work without the interpreter start (the subprocess path has its own test)."""
    return json.loads(json.dumps(speed.run_job(job)))


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("speed")
    mp = pytest.MonkeyPatch()
    mp.setattr(speed, "run_child", _in_process)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: two threads on a shared 2-core machine only wait for each other
    try:
        assert main(["bench", "speed", *TINY, "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
        mp.undo()
    return out, json.loads((out / "speed.json").read_text())


def test_one_record_per_head_and_class_with_every_part(tiny_report):
    out, report = tiny_report
    records = report["results"]
    assert [(r["head"], r["num_classes"]) for r in records] == [(h, c) for h in HEADS for c in (10, 50)]
    for r in records:
        train, infer = r["train"], r["inference"]
        assert train["status"] == "ok" and infer["status"] == "ok", r
        parts = train["parts"]
        assert set(parts) == {*speed.TRAIN_PARTS, "total"}
        ess = r["head"] != "baseline"
        applicable = [p for p in speed.TRAIN_PARTS
                      if (p != "search" or r["head"] == "ess-knn") and (p != "regularizer" or ess)]
        assert (parts["search"] is None) == (r["head"] != "ess-knn")
        assert (parts["regularizer"] is None) == (not ess)
        for p in (*applicable, "total"):
            positive = p != "refresh"  # refreshes fall in few steps (none here: their interval is 100)
            assert len(parts[p]["samples"]) == 2 and all(t > 0 or not positive for t in parts[p]["samples"]), (r["head"], p)
            assert parts[p]["min"] <= parts[p]["median"] <= parts[p]["max"]
        # the parts are contiguous: per step they add up to the step's total
        for i, total in enumerate(parts["total"]["samples"]):
            assert sum(parts[p]["samples"][i] for p in applicable) == pytest.approx(total, rel=1e-6, abs=1e-9)
        medians = sum(parts[p]["median"] for p in applicable)
        assert 0.5 * parts["total"]["median"] <= medians <= 2 * parts["total"]["median"]
        # ESS: the exact regulariser (margin_refresh 1) searches every step, inside its own part
        if ess:
            assert all(t == 0 for t in parts["refresh"]["samples"])
        # the kNN loss searched every pixel of the batch at full resolution
        assert train["search_queries"] == (2 * 32 * 32 if r["head"] == "ess-knn" else None)
        ip = infer["parts"]
        for i, total in enumerate(ip["total"]["samples"]):
            assert ip["dense"]["samples"][i] > 0 and ip["decide"]["samples"][i] > 0
            assert ip["dense"]["samples"][i] + ip["decide"]["samples"][i] == pytest.approx(total, rel=1e-6)


def test_settings_machine_and_command(tiny_report):
    out, report = tiny_report
    s, m = report["settings"], report["machine"]
    assert s["command"].startswith("scaleseg bench speed --classes 10,50 --heads baseline,ess-knn,ess-full "
                                   "--backbone resnet_tiny --batch 2 --crop 32 --device auto --loss-resolution full "
                                   "--warmup 1 --repeats 2 --knn-pixels 256")
    assert m["device"] == "cpu" and m["cpu_count"] >= 1 and m["torch"] and m["date"][:2] == "20"
    assert (out / "speed.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_knn_backends_agree_on_random_data(tiny_report):
    _, report = tiny_report
    knn = report["knn_backends"]
    assert [r["num_classes"] for r in knn] == [10, 50]
    for r in knn:
        assert r["queries"] == 256 and r["k"] == 8  # num_neighbours + 1, as the loss asks
        assert r["torch"]["status"] == "ok" and r["faiss"]["status"] == "ok"
        assert r["torch"]["median"] > 0 and r["faiss"]["median"] > 0
        assert r["agree_sets"] == 1.0 and r["agree_top1"] == 1.0


def test_markdown_tables_have_the_right_rows_and_columns(tiny_report):
    out, report = tiny_report
    md = (out / "speed.md").read_text()
    assert md.startswith("## Training and inference time versus the number of classes")
    assert report["settings"]["command"] in md
    by = {(r["head"], r["num_classes"]): r for r in report["results"]}
    tables = [[line for line in block.splitlines() if line.startswith("|")] for block in md.split("###")[1:]]
    train, breakdown, inference, refreshes, knn = tables
    # the exact regulariser (margin_refresh 1) of both ESS heads: its refresh is every step's own search
    assert [r.split(" | ")[0] for r in refreshes[2:]] == ["| ess-knn", "| ess-knn", "| ess-full", "| ess-full"]
    assert all("| 1 (exact) |" in r for r in refreshes[2:])
    assert train[0] == "| head | C = 10 | C = 50 |" and len(train) == 2 + 3
    assert train[3] == ("| ess-knn | " + speed.fmt_stats(by[("ess-knn", 10)]["train"]["parts"]["total"]) + " | "
                        + speed.fmt_stats(by[("ess-knn", 50)]["train"]["parts"]["total"]) + " |")
    assert breakdown[0] == "| head | C | forward | search | loss | regularizer | refresh | backward | optimizer | total |"
    assert len(breakdown) == 2 + 6
    row = breakdown[2 + 3].strip("|").split(" | ")  # ess-knn, C = 50
    parts = by[("ess-knn", 50)]["train"]["parts"]
    assert [c.strip() for c in row] == ["ess-knn", "50", *(speed.fmt_stats(parts[p]) for p in (*speed.TRAIN_PARTS, "total"))]
    assert breakdown[2].split(" | ")[3] == "–"  # baseline: no search
    assert inference[0] == "| head | C = 10 | C = 50 |" and [r.split(" |")[0] for r in inference[2:]] == [f"| {h}" for h in HEADS]
    assert len(knn) == 4 and knn[2].startswith("| 10 | 256 | 8 |") and "GFLOP/s, same sets |" in knn[2]
    assert "![training step and inference time against C](img/speed_resnet_tiny_cpu.png)" in md


def test_child_process_measures_one_configuration(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the child keeps a thread count given to it
    job = {"kind": "config", "head": "baseline", "num_classes": 10, "backbone": "resnet_tiny", "batch": 2, "crop": 32,
           "loss_resolution": "decoder", "device": "cpu", "warmup": 0, "repeats": 1, "overrides": [], "limit_gb": None}
    record = speed.run_child(job)
    assert record["train"]["status"] == "ok" and record["inference"]["status"] == "ok", record
    assert record["train"]["parts"]["total"]["median"] > 0


def test_an_out_of_memory_phase_is_recorded_and_the_other_still_runs(monkeypatch):
    def no_memory(*args, **kwargs):
        raise MemoryError("can't allocate memory: you tried to allocate 20 GiB")

    monkeypatch.setattr(speed, "measure_inference", no_memory)
    job = {"kind": "config", "head": "ess-knn", "num_classes": 10, "backbone": "resnet_tiny", "batch": 2, "crop": 32,
           "loss_resolution": "decoder", "device": "cpu", "warmup": 0, "repeats": 1, "overrides": [], "limit_gb": None}
    record = speed._normalize_config_record("ess-knn", 10, speed.run_job(job))
    assert record["inference"]["status"] == "oom" and "can't allocate" in record["inference"]["detail"]
    assert record["train"]["status"] == "ok"
    assert record["train"]["search_queries"] == 2 * 8 * 8  # decoder grid of two 32x32 crops
    assert "| ess-knn | OOM |" in speed.inference_table([record], ["ess-knn"], [10])
    killed = speed._normalize_config_record("baseline", 10, {"status": "killed", "detail": "signal 9"})
    assert speed.breakdown_table([killed], ["baseline"], [10]).splitlines()[-1] == "| baseline | 10 |" + " KILLED |" * 8


def test_search_backends_agree_with_tiled_torch_search():
    """A 1 MiB budget makes the torch search walk the classes in tiles and merge; FAISS must agree."""
    r = speed.compare_backends(2000, 1000, "cpu", 0, 1, ["model.head.embedding.search_budget_mb=1"], seed=3)
    assert r["k"] == 8 and r["agree_sets"] == 1.0 and r["agree_top1"] == 1.0


def test_summary_statistics():
    samples = [0.5, 0.1, 0.3, 0.2]
    s = speed.summarize(samples)
    assert s["median"] == statistics.median(samples) and (s["min"], s["max"]) == (0.1, 0.5)
    assert s["q1"] <= s["median"] <= s["q3"] and s["samples"] == samples
    assert speed.fmt_time(2.345) == "2.35 s" and speed.fmt_time(0.01234) == "12.3 ms" and speed.fmt_time(5e-5) == "50 µs"
    assert speed.fmt_stats({"median": 0.0123, "min": 0.0101, "max": 0.0456}) == "12.3 ms (10.1–45.6)"


@pytest.mark.parametrize("argv, message", [
    (["--heads", "baseline,ess-fancy"], "unknown head 'ess-fancy'"),
    (["--classes", "19,abc"], "'abc' is not a whole number"),
    (["--classes", "19,,50"], "empty item"),
    (["--classes", "1,19"], "1 classes is too few"),
    (["--classes", "5,19"], "every class count must be > 7"),
    (["--repeats", "0"], "--repeats 0"),
    (["--batch", "1"], "data.batch_size = 1"),
    (["--backbone", "resnet5"], "model.backbone"),
    (["--knn-pixels", "-1"], "--knn-pixels -1"),
    (["--set", "model.head.embeding.loss=full"], "model.head.embeding"),
])
def test_bad_arguments_are_reported(argv, message, tmp_path, capsys):
    assert main(["bench", "speed", *argv, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("scaleseg bench: error:") and message in err, err
    assert not (tmp_path / "speed.json").exists()


def test_report_with_failures_still_renders(tiny_report, tmp_path):
    """The real run has out-of-memory cells (the baseline at 20,000 classes): tables and plot mark them."""
    _, report = tiny_report
    report = json.loads(json.dumps(report))
    report["results"][1]["train"] = {"status": "oom", "detail": "can't allocate memory"}  # baseline, C = 50
    report["knn_backends"][1] = {"num_classes": 50, "queries": 256, "status": "killed", "detail": "signal 9"}
    md = speed.format_markdown(report)
    assert "| baseline | " + speed.fmt_stats(report["results"][0]["train"]["parts"]["total"]) + " | OOM |" in md
    assert "| baseline | 50 |" + " OOM |" * 8 in md
    assert "| 50 | 256 | | | KILLED |" + " |" * 5 in md
    speed.plot(report, tmp_path / "speed.png")
    assert (tmp_path / "speed.png").stat().st_size > 0


def test_rounds_pool_the_samples_and_head_limits_skip(tmp_path, monkeypatch):
    """--rounds 2 runs every job twice, round by round (A B A B), pooling the timed samples;
    ess-knn@10 is not run at C = 50 ('–' in the tables)."""
    order = []

    def fake(job):
        order.append((job.get("head", "search"), job["num_classes"]))
        if job["kind"] == "knn":
            return {"status": "skipped"}
        base = 0.1 * len(order)
        parts = {p: {"samples": [base, base + 0.01]} for p in (*speed.TRAIN_PARTS, "total")}
        parts = {p: speed.summarize(v["samples"]) for p, v in parts.items()}
        phase = {"status": "ok", "parts": parts}
        inference = {"status": "ok", "parts": {p: speed.summarize([base]) for p in (*speed.INFER_PARTS, "total")}}
        return {"threads": 1, "search_queries": None, "train": phase, "inference": inference}

    monkeypatch.setattr(speed, "run_child", fake)
    out = tmp_path / "speed"
    assert main(["bench", "speed", *TINY, "--heads", "baseline,ess-knn@10", "--rounds", "2", "--knn-pixels", "0",
                 "--out", str(out)]) == 0
    assert order == [("baseline", 10), ("baseline", 50), ("ess-knn", 10)] * 2
    report = json.loads((out / "speed.json").read_text())
    by = {(r["head"], r["num_classes"]): r for r in report["results"]}
    assert len(by[("baseline", 10)]["train"]["parts"]["total"]["samples"]) == 4
    assert by[("baseline", 10)]["train"]["round_medians"] == [pytest.approx(0.105), pytest.approx(0.405)]
    assert by[("ess-knn", 50)]["train"]["status"] == "skipped"
    md = (out / "speed.md").read_text()
    assert "| ess-knn | " + speed.fmt_stats(by[("ess-knn", 10)]["train"]["parts"]["total"]) + " | – |" in md
    assert "ess-knn above C = 10" in md and "--rounds 2" in report["settings"]["command"]
    assert speed.parse_head("ess-knn@20000") == ("ess-knn", 20000)
    with pytest.raises(Exception, match="not a class count"):
        speed.parse_head("ess-knn@lots")


def test_no_inference_times_the_training_step_only(tmp_path, monkeypatch):
    """--no-inference: every job is told so, the inference phase is never measured (recorded as skipped,
    '–' in its table) and the command that reproduces the run says so."""
    def no_inference(*args, **kwargs):
        raise AssertionError("inference measured under --no-inference")

    monkeypatch.setattr(speed, "measure_inference", no_inference)
    monkeypatch.setattr(speed, "run_child", _in_process)
    out = tmp_path / "speed"
    assert main(["bench", "speed", *TINY, "--heads", "ess-knn", "--classes", "10", "--repeats", "1", "--knn-pixels", "0",
                 "--no-inference", "--out", str(out)]) == 0
    report = json.loads((out / "speed.json").read_text())
    (record,) = report["results"]
    assert record["inference"]["status"] == "skipped" and record["train"]["status"] == "ok"
    assert record["train"]["parts"]["total"]["median"] > 0
    assert report["settings"]["command"].endswith(f"--no-inference --out {out}")
    assert "| ess-knn | – |" in speed.inference_table(report["results"], ["ess-knn"], [10])
