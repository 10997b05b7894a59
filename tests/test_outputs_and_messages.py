"""What the commands write and say: predict never overwrites an input and its outputs never collide; eval
refuses a read-only output folder before evaluating; no progress bars in piped output; per_class.csv in
percent; Ctrl-C messages per command; bad numbers refused before training; `scaleseg --version`."""

from __future__ import annotations

import builtins
import csv
import errno
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from scaleseg.cli import main
from scaleseg.data.io import read_image
from scaleseg.data.transforms import to_tensor
from scaleseg.engine import inference
from scaleseg.engine.checkpoint import load_checkpoint_model

from tests.conftest import TINY

BASE = [o for o in TINY if not o.startswith(("train.iters", "train.checkpoint"))]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    work = tmp_path_factory.mktemp("outputs") / "run"
    assert main(["train", *BASE, "train.iters=2", "train.checkpoint_interval=2", "--work-dir", str(work)]) == 0
    return work


def rgb(h=40, w=48, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def expected_labels(checkpoint, path) -> np.ndarray:
    model, _, cfg = load_checkpoint_model(checkpoint)
    with torch.inference_mode():
        return inference.predict_labels(model, to_tensor(read_image(path))[None], cfg.eval)[0].numpy()


# ------------------------------------------------------------------------------------------------
# predict


def test_predict_into_the_input_folder_never_overwrites_an_input(trained, tmp_path, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.fromarray(rgb()).save(folder / "shot.png")
    Image.fromarray(rgb(seed=1)).save(folder / "other.jpg", quality=95)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    checkpoint = trained / "iter_000002.pth"
    assert main(["predict", str(checkpoint), str(folder), "--out", str(folder), "--no-progress", "--workers", "0"]) == 0
    for name, data in before.items():
        assert (folder / name).read_bytes() == data, f"{name} was overwritten"
    # shot.png's label map would be shot.png itself: its outputs keep the input's extension in the name
    np.testing.assert_array_equal(np.array(Image.open(folder / "shot.png.png")), expected_labels(checkpoint, folder / "shot.png"))
    assert (folder / "shot.png_overlay.png").is_file()
    np.testing.assert_array_equal(np.array(Image.open(folder / "other.png")), expected_labels(checkpoint, folder / "other.jpg"))
    assert "predicted 2 of 2 images" in capsys.readouterr().out


def test_predict_outputs_of_inputs_sharing_a_stem_do_not_collide(trained, tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(rgb(seed=2)).save(folder / "photo.jpg", quality=95)
    Image.fromarray(rgb(seed=3)).save(folder / "photo.png")
    Image.fromarray(rgb(seed=4)).save(folder / "x.png")
    Image.fromarray(rgb(seed=5)).save(folder / "x_overlay.png")  # its label map would be x.png's overlay
    checkpoint = trained / "iter_000002.pth"
    out = tmp_path / "out"
    assert main(["predict", str(checkpoint), str(folder), "--out", str(out), "--no-progress", "--workers", "0"]) == 0
    written = sorted(p.name for p in out.iterdir())
    assert written == ["photo.jpg.png", "photo.jpg_overlay.png", "photo.png.png", "photo.png_overlay.png",
                       "x.png.png", "x.png_overlay.png", "x_overlay.png.png", "x_overlay.png_overlay.png"], written
    for name in ("photo.jpg", "photo.png", "x.png", "x_overlay.png"):
        np.testing.assert_array_equal(np.array(Image.open(out / f"{name}.png")), expected_labels(checkpoint, folder / name))
    assert "predicted 4 of 4 images" in capsys.readouterr().out


def test_ctrl_c_in_predict_does_not_talk_about_training(trained, tmp_path, capsys, monkeypatch):
    Image.fromarray(rgb()).save(tmp_path / "a.png")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(inference, "predict_labels", interrupted)
    assert main(["predict", str(trained / "iter_000002.pth"), str(tmp_path / "a.png"), "--out", str(tmp_path / "o"),
                 "--no-progress"]) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "--resume" not in err and "train" not in err


# ------------------------------------------------------------------------------------------------
# eval


@pytest.fixture
def read_only_folder(tmp_path, monkeypatch):
    """A folder no file can be written in: chmod (not root), a read-only tmpfs (root), or the kernel's
    EROFS injected (root without mount rights)."""
    folder = tmp_path / "ro"
    folder.mkdir()
    mounted = False
    if os.geteuid() != 0:
        folder.chmod(0o555)
    elif subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(folder)], capture_output=True).returncode == 0:
        mounted = True
    else:
        real_open = builtins.open

        def read_only(file, mode="r", *args, **kwargs):
            if any(m in mode for m in "wax+") and folder in Path(file).parents:
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(file))
            return real_open(file, mode, *args, **kwargs)

        monkeypatch.setattr(builtins, "open", read_only)
    yield folder
    if mounted:
        subprocess.run(["umount", str(folder)], check=False)
    folder.chmod(0o755)


def test_eval_into_a_read_only_folder_is_refused_before_evaluating(trained, read_only_folder, capsys, monkeypatch):
    from scaleseg.engine import evaluator

    calls = []
    monkeypatch.setattr(evaluator, "evaluate", lambda *a, **k: calls.append(1))
    assert main(["eval", str(trained), "--out", str(read_only_folder / "ev"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"{read_only_folder / 'ev'} is not writable" in err and "Traceback" not in err, err
    assert calls == []


def test_per_class_csv_is_in_percent_like_metrics_json(trained):
    out = trained / "eval" / "iter_000002"
    metrics = json.loads((out / "metrics.json").read_text())
    rows = list(csv.DictReader((out / "per_class.csv").open()))
    ious = [float(r["IoU"]) for r in rows if r["IoU"]]
    assert np.mean(ious) == pytest.approx(metrics["mIoU"], abs=0.01)
    accs = [float(r["Acc"]) for r in rows if r["Acc"]]
    assert np.mean(accs) == pytest.approx(metrics["mAcc"], abs=0.01)


# ------------------------------------------------------------------------------------------------
# the console


def test_no_progress_bars_when_the_output_is_not_a_terminal(tmp_path, capsys):
    work = tmp_path / "run"
    args = [*BASE, "train.iters=4", "train.checkpoint_interval=4", "train.eval_interval=2", "train.log_interval=2",
            "train.progress=true"]
    assert main(["train", *args, "--work-dir", str(work)]) == 0  # capsys: neither stream is a terminal
    captured = capsys.readouterr()
    assert "\r" not in captured.err and "\r" not in captured.out
    assert "it/s" not in captured.err and "s/it]" not in captured.err
    lines = [line for line in captured.out.splitlines() if line.startswith("iter ")]
    assert [line.split()[1] for line in lines] == ["2/4", "4/4"]  # one line per log interval instead
    assert main(["eval", str(work)]) == 0
    assert "\r" not in capsys.readouterr().err


def test_bad_numbers_are_refused_before_training(tmp_path, capsys):
    for bad in ("train.seed=99999999999999999999999", "eval.scales=[.nan]", "optim.lr=.inf", "model.head.pyramid.tau=nan"):
        work = tmp_path / bad.split("=")[0]
        assert main(["train", *BASE, bad, "--work-dir", str(work)]) == 2
        err = capsys.readouterr().err
        assert bad.split("=")[0] in err and "Traceback" not in err, err
        assert not work.exists()


def test_checkpoint_errors_never_advise_weights_only_false(tmp_path, capsys):
    bad = tmp_path / "iter_000002.pth"
    torch.save({"format": "scaleseg-checkpoint", "path": Path("/x")}, bad)
    assert main(["eval", str(bad), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "cannot be read safely" in err and "pathlib" in err
    assert "weights_only" not in err and "likely succeed" not in err and "can still be loaded" not in err


def test_version(capsys):
    import scaleseg

    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"scaleseg {scaleseg.__version__} (torch {torch.__version__.split('+')[0]}")
