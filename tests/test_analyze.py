"""`scaleseg analyze`: files, clusters, family recovery, top-n mIoU, PCA, errors, --compare."""

import csv
import json

import numpy as np
import pytest
import torch

from scaleseg.analysis import AnalysisError, analyze
from scaleseg.analysis.embeddings import pca, project, to_rgb
from scaleseg.cli import main
from scaleseg.config import load_config
from scaleseg.data.datasets import SyntheticSegmentation
from scaleseg.engine.checkpoint import load_checkpoint
from scaleseg.engine.trainer import Trainer
from scaleseg.errors import ScalesegError

from conftest import TINY

EMBEDDING = ["model.head.scorer=embedding", "model.head.embedding.embed_dim=8", "train.device=cpu"]


def _train(path, extra):
    Trainer(load_config(None, TINY + ["train.iters=4", "train.eval_interval=4", *extra]), work_dir=path).run()
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("analyze")
    torch.manual_seed(0)
    return {"ess": _train(root / "ess", EMBEDDING), "linear": _train(root / "linear", ["train.device=cpu"])}


@pytest.fixture(scope="module")
def analysed(runs, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    code = main(["analyze", str(runs["ess"]), "--out", str(out), "--images", "2", "--clusters", "5",
                 "--compare", str(runs["linear"]), "--leaves", "12", "--no-progress"])
    assert code == 0
    return out


def _per_class_miou(path):
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    ious = []
    for r in rows:
        i, p, l = int(r["intersection"]), int(r["pred_area"]), int(r["label_area"])
        if p + l - i > 0:
            ious.append(i / (p + l - i))
    return float(np.mean(ious))


def test_every_file_is_written(analysed, capsys):
    summary = json.loads((analysed / "summary.json").read_text())
    expected = {"dendrogram.png", "clusters.txt", "pixel_embeddings_2d.png", "embeddings_rgb_val_000000.png",
                "embeddings_rgb_val_000001.png", "frequency_vs_length.png", "per_class_iou.png",
                "miou_vs_top_n.png", "miou_vs_top_n.csv", "summary.json"}
    assert set(summary["files"]) == expected
    for name in expected:
        path = analysed / name
        assert path.is_file() and path.stat().st_size > 0, name
        if name.endswith(".png"):
            assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert summary["frequency"]["split"] == "train" and summary["frequency"]["images"] == 64
    assert summary["command"].startswith("scaleseg analyze ")


def test_clusters_list_every_class_once(analysed, runs):
    names = load_checkpoint(runs["ess"] / "best.pth")["class_names"]
    listed = []
    lines = (analysed / "clusters.txt").read_text().splitlines()
    for line in lines[1:]:
        listed += line.split(": ", 1)[1].split(", ")
    assert sorted(listed) == sorted(names) and len(listed) == 40
    assert 1 <= len(lines) - 1 <= 5


def test_family_recovery_matches_brute_force(analysed, runs):
    ckpt = load_checkpoint(runs["ess"] / "best.pth")
    table = torch.nn.functional.normalize(ckpt["model"]["head.scorer.class_embeddings"].double(), dim=1).numpy()
    family = np.arange(40) % SyntheticSegmentation(num_classes=40, length=1).num_families
    same, chance = [], []
    for c in range(40):
        dist = [np.sum((table[c] - table[o]) ** 2) if o != c else np.inf for o in range(40)]
        same.append(family[int(np.argmin(dist))] == family[c])
        chance.append((np.sum(family == family[c]) - 1) / 39)
    got = json.loads((analysed / "summary.json").read_text())["family_recovery"]
    assert got["fraction"] == pytest.approx(np.mean(same))
    assert got["chance"] == pytest.approx(np.mean(chance))


def test_top_n_curve_ends_at_each_runs_miou(analysed, runs):
    with open(analysed / "miou_vs_top_n.csv", newline="") as f:
        rows = list(csv.reader(f))
    header, last = rows[0], rows[-1]
    assert len(rows) == 41 and last[0] == "40"
    assert sorted(int(r[1]) for r in rows[1:]) == list(range(40))  # a permutation of the classes
    for column, run in ((3, "ess"), (4, "linear")):
        assert run in header[column]
        expected = _per_class_miou(runs[run] / "eval" / "iter_000004" / "per_class.csv")
        assert float(last[column]) == pytest.approx(expected, abs=1e-7)


def test_pca_matches_eigendecomposition():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(50, 5)) * np.array([5.0, 3.0, 1.0, 0.5, 0.1])
    mean, comps = pca(x, 3)
    centred = x - x.mean(0)
    values, vectors = np.linalg.eigh(centred.T @ centred)
    top = vectors[:, np.argsort(values)[::-1][:3]].T
    top *= np.sign(top[np.arange(3), np.abs(top).argmax(1)])[:, None]
    assert np.allclose(mean, x.mean(0))
    assert np.allclose(comps, top, atol=1e-8)
    assert np.allclose(project(x, mean, comps), centred @ top.T, atol=1e-8)
    rgb = to_rgb(project(x, mean, comps))
    assert rgb.dtype == np.uint8 and (rgb.min(0) == 0).all() and (rgb.max(0) == 255).all()


def test_linear_head_alone_is_refused(runs, tmp_path, capsys):
    with pytest.raises(AnalysisError, match="linear-head model"):
        analyze(runs["linear"], out=tmp_path, progress=False)
    assert main(["analyze", str(runs["linear"]), "--out", str(tmp_path), "--no-progress"]) == 2
    assert "--compare" in capsys.readouterr().err


def test_linear_head_with_compare_plots_per_class_iou_only(runs, tmp_path):
    summary = analyze(runs["linear"], out=tmp_path, compare=runs["ess"], progress=False)
    assert set(summary["per_class"]) == {"linear", "ess"}
    assert (tmp_path / "per_class_iou.png").is_file() and (tmp_path / "miou_vs_top_n.png").is_file()
    assert not (tmp_path / "dendrogram.png").exists()


def test_bad_inputs(runs, tmp_path):
    with pytest.raises(ScalesegError, match="does not exist"):
        analyze(tmp_path / "missing", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ScalesegError, match="no config.yaml"):
        analyze(tmp_path / "empty", progress=False)
    with pytest.raises(ScalesegError, match="--compare"):
        analyze(runs["ess"], out=tmp_path / "o", compare=tmp_path / "empty", progress=False)
    with pytest.raises(ScalesegError, match="does not exist"):
        analyze(tmp_path / "nothing.pth", progress=False)
    with pytest.raises(ScalesegError, match="--clusters 0"):
        analyze(runs["ess"], out=tmp_path / "o", clusters=0, progress=False)


def test_a_checkpoint_file_is_a_target(runs, tmp_path):
    summary = analyze(runs["ess"] / "iter_000004.pth", out=tmp_path, images=0, progress=False)
    assert summary["checkpoint"].endswith("iter_000004.pth") and "per_class" in summary
    assert (tmp_path / "dendrogram.png").is_file() and not (tmp_path / "pixel_embeddings_2d.png").exists()


PYRAMID = ["model.head.structure=pyramid", "model.head.pyramid.semantic_channels=16",
           "model.head.pyramid.unity_channels=8", "model.head.pyramid.strides=[16,8,4]"]


def test_a_pyramid_with_the_embedding_scorer_gets_the_figures_of_its_one_class_table(tmp_path):
    """The pyramid's levels share one class table: the analyses read it through the head protocol."""
    run = _train(tmp_path / "pyramid_ess", PYRAMID + EMBEDDING)
    summary = analyze(run, out=tmp_path / "out", images=1, clusters=4, progress=False)
    assert summary["embedding"] == {"dim": 8, "normalize": True}
    for name in ("dendrogram.png", "clusters.txt", "pixel_embeddings_2d.png", "frequency_vs_length.png"):
        assert (tmp_path / "out" / name).is_file(), name
    table = load_checkpoint(run / "best.pth")["model"]["head.scorers.0.class_embeddings"]
    assert summary["clusters"]["k"] == 4 and table.shape == (40, 8)


def test_a_pyramid_with_the_linear_scorer_is_refused_like_any_linear_head(tmp_path, capsys):
    run = _train(tmp_path / "pyramid_linear", PYRAMID + ["train.device=cpu"])
    with pytest.raises(AnalysisError, match="linear-head model"):
        analyze(run, out=tmp_path / "out", progress=False)
    assert main(["analyze", str(run), "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    assert "model.head.scorer=embedding" in capsys.readouterr().err


def test_loss_gradients_of_a_linear_pyramid_run_equal_the_library_function_on_the_same_batches(tmp_path, capsys):
    """`analyze --loss-gradients N` on a linear pyramid: the mean over the run's first N training batches
    of each term's gradient norm at the head's input, and the unity / ce ratio the docs report."""
    from scaleseg.analysis.gradients import loss_gradient_norms
    from scaleseg.data import build_dataset, build_train_loader
    from scaleseg.engine.checkpoint import resolve_run

    run = _train(tmp_path / "pyramid_linear", PYRAMID + ["train.device=cpu", "model.decoder.dropout=0"])
    assert main(["analyze", str(run), "--out", str(tmp_path / "out"), "--loss-gradients", "2", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    grads = summary["loss_gradients"]
    assert grads["batches"] == 2 and set(grads["gradient_norm"]) == {"ce", "unity"}
    assert "unity / ce" in printed and "embedding analyses do not apply" in printed
    resolved = resolve_run(run, [])
    cfg, model = resolved.cfg, resolved.model()
    loader = build_train_loader(cfg.data, build_dataset(cfg.data, "train"), 255, cfg.train.seed, progress=False)
    it = iter(loader)
    expected = [loss_gradient_norms(model, b["image"], b["label"]) for b in (next(it), next(it))]
    for term in ("ce", "unity"):
        assert grads["gradient_norm"][term] == pytest.approx((expected[0][term] + expected[1][term]) / 2, rel=1e-5)
    assert grads["unity_to_ce"] == pytest.approx(grads["gradient_norm"]["unity"] / grads["gradient_norm"]["ce"])
