"""`scaleseg bench memory`: one process per configuration, results as JSON, Markdown and a plot."""

import json

from scaleseg.bench.memory import format_table
from scaleseg.cli import main

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
