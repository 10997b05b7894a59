"""`scaleseg bench memory`: one process per configuration, results as JSON, Markdown and a plot."""

import json

import pytest

from scaleseg.bench.memory import format_table
from scaleseg.cli import main
from scaleseg.errors import ScalesegError

TINY_BENCH = ["--backbone", "resnet_tiny", "--batch", "2", "--crop", "64", "--steps", "2", "--no-progress",
              "--set", "model.head.embedding.search_budget_mb=4"]


def test_bench_memory_baseline_grows_with_classes_and_ess_does_not(tmp_path, capsys):
    """At 20,000 classes the baseline's C x H x W logits, their softmax and gradient cost hundreds of MiB
    (2 x 20000 x 64 x 64 floats = 625 MiB each); the embedding head's search is held to its 4 MiB budget."""
    out = tmp_path / "mem"
    assert main(["bench", "memory", "--classes", "10,20000", "--heads", "baseline,ess-knn", *TINY_BENCH,
                 "--out", str(out)]) == 0
    report = json.loads((out / "memory.json").read_text())
    by = {(r["head"], r["num_classes"]): r for r in report["results"]}
    assert all(r["status"] == "ok" for r in by.values()), report["results"]
    baseline_growth = by[("baseline", 20000)]["step_mb"] - by[("baseline", 10)]["step_mb"]
    ess_growth = by[("ess-knn", 20000)]["step_mb"] - by[("ess-knn", 10)]["step_mb"]
    assert baseline_growth > 600, by
    assert ess_growth < 100, by
    assert report["settings"]["overrides"] == ["model.head.embedding.search_budget_mb=4"]
    assert report["settings"]["command"].startswith("scaleseg bench memory --classes 10,20000 --heads baseline,ess-knn")
    assert "--set model.head.embedding.search_budget_mb=4" in report["settings"]["command"]
    assert (out / "memory.png").stat().st_size > 0
    table = (out / "memory.md").read_text()
    assert table.startswith("| head | C = 10 | C = 20,000 |") and "| ess-knn |" in table
    assert "| baseline |" in capsys.readouterr().out


def test_bench_memory_pyramid_heads_follow_their_scorer(tmp_path):
    """The pyramid with linear scorers grows with C like the baseline; with the embedding scorer it does not."""
    out = tmp_path / "mem"
    assert main(["bench", "memory", "--classes", "10,20000", "--heads", "pyramid-linear,pyramid-ess", *TINY_BENCH,
                 "--set", "model.head.pyramid.semantic_channels=32", "--out", str(out)]) == 0
    by = {(r["head"], r["num_classes"]): r for r in json.loads((out / "memory.json").read_text())["results"]}
    assert all(r["status"] == "ok" for r in by.values()), by
    assert by[("pyramid-linear", 20000)]["step_mb"] - by[("pyramid-linear", 10)]["step_mb"] > 600, by
    assert by[("pyramid-ess", 20000)]["step_mb"] - by[("pyramid-ess", 10)]["step_mb"] < 100, by


def test_bench_memory_table_marks_failures():
    records = [
        {"head": "baseline", "num_classes": 19, "status": "ok", "step_mb": 1000.4, "peak_mb": 1500.0},
        {"head": "baseline", "num_classes": 20000, "status": "oom", "detail": "can't allocate memory"},
    ]
    table = format_table(records, ["baseline"], [19, 20000])
    assert table.splitlines()[-1] == "| baseline | 1,000 (1,500) | OOM |"


def test_bench_memory_rejects_unknown_head_and_bad_override(capsys, tmp_path):
    assert main(["bench", "memory", "--heads", "baseline,ess-fancy", "--out", str(tmp_path)]) == 2
    assert "unknown head 'ess-fancy'" in capsys.readouterr().err
    assert main(["bench", "memory", "--set", "model.head.embeding.loss=full", "--out", str(tmp_path)]) == 2
    assert "model.head.embeding" in capsys.readouterr().err
    assert not (tmp_path / "memory.json").exists()


# --------------------------------------------------------------------------------------------
# --max-batch: the largest batch whose training step fits a memory budget
# --------------------------------------------------------------------------------------------


def _linear_memory(a, b):
    """A fake trial: peak = a + b x batch MiB."""
    return lambda batch: {"status": "ok", "peak_mb": a + b * batch}


def test_max_batch_search_matches_the_linear_memory_model():
    """memory = a + b * batch within budget B -> floor((B - a) / b), capped by the limit, 0 below batch 2."""
    from types import SimpleNamespace

    from scaleseg.bench.memory import find_max_batch, search_max_batch

    a, b = 300.0, 37.0
    for limit in (2, 5, 64, 100, 256):
        for budget_mb in range(300, 300 + 37 * 300, 53):
            expected = min(int((budget_mb - a) // b), limit)
            expected = expected if expected >= 2 else 0
            found, tried = search_max_batch(lambda n: a + b * n <= budget_mb, limit)
            assert found == expected, (limit, budget_mb)
            assert len(tried) == len(set(tried)) and max(tried) <= limit
    args = SimpleNamespace(max_batch=(300 + 37 * 50.5) / 1024, max_batch_limit=256)  # budget fits exactly 50
    record = find_max_batch("ess-knn", 1000, args, measure_trial=_linear_memory(a, b))
    assert (record["max_batch"], record["at_limit"]) == (50, False)
    assert [t["batch"] for t in record["trials"]] == [2, 4, 8, 16, 32, 64, 48, 56, 52, 50, 51]
    assert [t["fits"] for t in record["trials"]] == [True] * 5 + [False, True, False, False, True, False]


def test_max_batch_counts_out_of_memory_trials_as_not_fitting():
    from types import SimpleNamespace

    from scaleseg.bench.memory import find_max_batch

    def trial(batch):  # runs out of memory above 12, whatever the budget
        return {"status": "ok", "peak_mb": 10.0} if batch <= 12 else {"status": "oom", "detail": "can't allocate memory"}

    args = SimpleNamespace(max_batch=100.0, max_batch_limit=256)
    record = find_max_batch("baseline", 19, args, measure_trial=trial)
    assert record["max_batch"] == 12
    assert {"batch": 16, "status": "oom", "peak_mb": None, "fits": False, "detail": "can't allocate memory"} in record["trials"]
    args.max_batch_limit = 8
    assert find_max_batch("baseline", 19, args, measure_trial=trial)["max_batch"] == 8


def test_max_batch_stops_at_a_trial_that_failed_for_another_reason():
    """A trial that errored (here: a config the model rejects) is not "does not fit": the search names
    the batch and the cause instead of reporting 0."""
    from types import SimpleNamespace

    from scaleseg.bench.memory import find_max_batch

    def trial(batch):
        return {"status": "error", "detail": "ConfigError: model.group_norm_channels = 16 does not divide 24"}

    args = SimpleNamespace(max_batch=100.0, max_batch_limit=256)
    with pytest.raises(ScalesegError, match=r"baseline at C = 19: the memory trial at batch 2 failed \(error\), "
                                            r"not for lack of memory: ConfigError: model.group_norm_channels"):
        find_max_batch("baseline", 19, args, measure_trial=trial)


def test_max_batch_trial_runs_in_its_own_process():
    """A budget of 0.1 GiB is below the resident size of an interpreter with torch loaded (~300 MiB),
    so no batch fits: the real trial process measures it and the search stops at batch 2."""
    from types import SimpleNamespace

    from scaleseg.bench.memory import find_max_batch

    args = SimpleNamespace(backbone="resnet_tiny", batch=64, crop=32, device="cpu", steps=2, loss_resolution="decoder",
                           set=None, limit_gb=None, max_batch=0.1, max_batch_limit=8)
    record = find_max_batch("baseline", 10, args)
    assert (record["head"], record["num_classes"], record["max_batch"]) == ("baseline", 10, 0)
    [trial] = record["trials"]
    assert trial["batch"] == 2 and trial["status"] == "ok" and trial["peak_mb"] > 0.1 * 1024 and not trial["fits"]


def test_bench_memory_max_batch_outputs(tmp_path, monkeypatch, capsys):
    """The CLI with a fake per-process measurement (peak = 300 + 37 x batch MiB; 0.5 + 37 x 60 MiB more
    for ess-knn at C = 1000): JSON, both tables, the two-panel plot and the command line."""
    from scaleseg.bench import memory

    calls = []

    def fake(head, num_classes, args, limit_gb, batch=None):
        batch = args.batch if batch is None else batch
        calls.append((head, num_classes, batch))
        extra = 0 if (head, num_classes) != ("ess-knn", 1000) else 37 * 60
        return {"head": head, "num_classes": num_classes, "status": "ok", "peak_mb": 300.0 + extra + 37 * batch,
                "step_mb": 37.0 * batch}

    monkeypatch.setattr(memory, "run_one_subprocess", fake)
    out = tmp_path / "mem"
    budget_gb = (300 + 37 * 100.5) / 1024  # batch 100 fits, 101 does not
    assert main(["bench", "memory", "--classes", "19,1000", "--heads", "baseline,ess-knn", "--max-batch",
                 str(budget_gb), "--max-batch-limit", "64", "--no-progress", "--out", str(out)]) == 0
    report = json.loads((out / "memory.json").read_text())
    got = {(r["head"], r["num_classes"]): (r["max_batch"], r["at_limit"]) for r in report["max_batch"]}
    assert got == {("baseline", 19): (64, True), ("baseline", 1000): (64, True), ("ess-knn", 19): (64, True),
                   ("ess-knn", 1000): (40, False)}
    assert ("ess-knn", 1000, 2) in calls and len(report["results"]) == 4
    assert report["settings"]["max_batch_limit"] == 64
    assert f"--max-batch {budget_gb:g} --max-batch-limit 64" in report["settings"]["command"]
    md = (out / "memory.md").read_text()
    assert md.startswith("| head | C = 19 | C = 1,000 |") and f"fits {budget_gb:g} GiB" in md
    assert md.rstrip().splitlines()[-2:] == ["| baseline | >= 64 | >= 64 |", "| ess-knn | >= 64 | 40 |"]
    assert "| ess-knn | >= 64 | 40 |" in capsys.readouterr().out
    assert (out / "memory.png").stat().st_size > 0


def test_bench_memory_max_batch_reports_a_failed_trial_and_goes_on(tmp_path, monkeypatch, capsys):
    """A (head, C) whose trial errors at batch 8 gets an ERROR cell with the cause on stderr and in the
    JSON (not a max batch of 4); the other pairs are still searched."""
    from scaleseg.bench import memory

    def fake(head, num_classes, args, limit_gb, batch=None):
        batch = args.batch if batch is None else batch
        if head == "ess-knn" and batch == 8:
            return {"head": head, "num_classes": num_classes, "status": "error", "detail": "ValueError: boom"}
        return {"head": head, "num_classes": num_classes, "status": "ok", "peak_mb": 300.0 + 37 * batch,
                "step_mb": 37.0 * batch}

    monkeypatch.setattr(memory, "run_one_subprocess", fake)
    out = tmp_path / "mem"
    assert main(["bench", "memory", "--classes", "19", "--heads", "baseline,ess-knn", "--max-batch", "10",
                 "--max-batch-limit", "16", "--no-progress", "--out", str(out)]) == 0
    report = json.loads((out / "memory.json").read_text())
    by = {r["head"]: r for r in report["max_batch"]}
    assert (by["baseline"]["max_batch"], by["ess-knn"]["max_batch"]) == (16, None)
    assert "ess-knn at C = 19: the memory trial at batch 8 failed (error), not for lack of memory: ValueError: boom" \
        in by["ess-knn"]["error"]
    assert (out / "memory.md").read_text().rstrip().splitlines()[-2:] == ["| baseline | >= 16 |", "| ess-knn | ERROR |"]
    assert "ValueError: boom" in capsys.readouterr().err
    assert (out / "memory.png").stat().st_size > 0


def test_max_batch_table_and_bad_budget(tmp_path, capsys):
    from scaleseg.bench.memory import format_max_batch_table

    records = [{"head": "ess-knn", "num_classes": 19, "max_batch": 256, "at_limit": True},
               {"head": "ess-knn", "num_classes": 20000, "max_batch": 37, "at_limit": False}]
    assert format_max_batch_table(records, ["ess-knn"], [19, 20000]).splitlines()[-1] == "| ess-knn | >= 256 | 37 |"
    assert main(["bench", "memory", "--max-batch", "0", "--out", str(tmp_path)]) == 2
    assert "--max-batch 0: the memory budget must be > 0" in capsys.readouterr().err
    assert main(["bench", "memory", "--max-batch", "4", "--max-batch-limit", "1", "--out", str(tmp_path)]) == 2
    assert "--max-batch-limit 1: must be >= 2" in capsys.readouterr().err
    assert not (tmp_path / "memory.json").exists()
