"""`scaleseg predict` on a folder: reader workers, batches of same-size images, failures reported, not fatal."""

import numpy as np
import pytest
import torch
from PIL import Image

from scaleseg.cli import main
from scaleseg.config import EvalConfig
from scaleseg.data.transforms import to_tensor
from scaleseg.engine import inference
from scaleseg.engine.inference import predict_labels
from scaleseg.export import load_checkpoint_model

# file name -> (H, W): five images of two sizes; with a2_corrupt.png between a1 and a3 and --batch-size 2 the
# batches are a0+a1 (full), a3 (ended by the size change), b4+b5
SIZES = {"a0.png": (40, 48), "a1.png": (40, 48), "a3.png": (40, 48), "b4.jpg": (36, 28), "b5.png": (36, 28)}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from tests.conftest import TINY

    work = tmp_path_factory.mktemp("predict") / "run"
    base = [o for o in TINY if not o.startswith(("train.iters", "train.checkpoint"))]
    assert main(["train", *base, "train.iters=2", "train.checkpoint_interval=2", "--work-dir", str(work)]) == 0
    return work / "iter_000002.pth"


def write_folder(folder, sizes=SIZES):
    rng = np.random.default_rng(0)
    folder.mkdir()
    for name, (h, w) in sizes.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / name, quality=95)
    (folder / "a2_corrupt.png").write_bytes(b"these bytes are not an image")
    return {name: np.array(Image.open(folder / name).convert("RGB")) for name in sizes}  # as decoded (jpeg!)


def record_batches(monkeypatch):
    """Batch shapes that reach predict_labels (cmd_predict imports it at call time)."""
    shapes = []

    def recording(model, images, cfg):
        shapes.append(tuple(images.shape))
        return predict_labels(model, images, cfg)

    monkeypatch.setattr(inference, "predict_labels", recording)
    return shapes


def test_predict_folder_batches_same_size_images_and_reports_the_corrupt_one(checkpoint, tmp_path, capsys, monkeypatch):
    images = write_folder(tmp_path / "in")
    shapes = record_batches(monkeypatch)
    out = tmp_path / "out"
    code = main(["predict", str(checkpoint), str(tmp_path / "in"), "--out", str(out), "--batch-size", "2",
                 "--workers", "2", "--no-progress"])
    assert code == 1
    printed = capsys.readouterr().out
    assert "predicted 5 of 6 images" in printed and "a2_corrupt.png: image" in printed
    failures = (out / "failures.txt").read_text().splitlines()
    assert len(failures) == 1 and failures[0].startswith(str(tmp_path / "in" / "a2_corrupt.png") + "\t")
    assert "cannot be decoded" in failures[0]
    assert [s[0] for s in shapes] == [2, 1, 2]
    assert [s[-2:] for s in shapes] == [(40, 48), (40, 48), (36, 28)]

    model, _, _ = load_checkpoint_model(checkpoint)
    for name, image in images.items():
        stem = name.rsplit(".", 1)[0]
        with torch.no_grad():  # the reference: this image alone
            alone = predict_labels(model, to_tensor(image)[None], EvalConfig())[0].numpy()
        assert np.array_equal(np.asarray(Image.open(out / f"{stem}.png")), alone), name
        assert Image.open(out / f"{stem}_overlay.png").size == image.shape[1::-1]
    assert not (out / "a2_corrupt.png").exists()
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["failures.txt"] + [n.rsplit(".", 1)[0] + s for n in SIZES for s in (".png", "_overlay.png")])


def test_predict_in_process_batches_equal_one_at_a_time(checkpoint, tmp_path):
    write_folder(tmp_path / "in")
    assert main(["predict", str(checkpoint), str(tmp_path / "in"), "--out", str(tmp_path / "one"), "--batch-size", "1",
                 "--workers", "0", "--no-progress"]) == 1
    assert main(["predict", str(checkpoint), str(tmp_path / "in"), "--out", str(tmp_path / "many"), "--batch-size", "8",
                 "--workers", "0", "--no-progress"]) == 1
    for name in SIZES:
        stem = name.rsplit(".", 1)[0] + ".png"
        assert np.array_equal(np.asarray(Image.open(tmp_path / "one" / stem)), np.asarray(Image.open(tmp_path / "many" / stem)))


def test_a_batch_that_fails_is_retried_image_by_image(checkpoint, tmp_path, capsys, monkeypatch):
    """One image that cannot be predicted (here: any of width 28) fails alone; its batch-mates are written."""
    write_folder(tmp_path / "in", {"a.png": (40, 48), "b.png": (36, 28), "c.png": (36, 32), "d.png": (36, 32)})
    (tmp_path / "in" / "a2_corrupt.png").unlink()
    original = inference.predict_labels

    def picky(model, images, cfg):
        if images.shape[-1] == 28:
            raise RuntimeError("out of memory (simulated)")
        return original(model, images, cfg)

    monkeypatch.setattr(inference, "predict_labels", picky)
    out = tmp_path / "out"
    assert main(["predict", str(checkpoint), str(tmp_path / "in"), "--out", str(out), "--no-progress", "--workers", "0"]) == 1
    assert "predicted 3 of 4 images" in capsys.readouterr().out
    assert (out / "failures.txt").read_text().startswith(f"{tmp_path / 'in' / 'b.png'}\tprediction failed: RuntimeError")
    assert {p.name for p in out.glob("*.png")} == {"a.png", "a_overlay.png", "c.png", "c_overlay.png", "d.png", "d_overlay.png"}
    # a clean run afterwards removes the stale failures.txt
    monkeypatch.setattr(inference, "predict_labels", original)
    assert main(["predict", str(checkpoint), str(tmp_path / "in"), "--out", str(out), "--no-progress", "--workers", "0"]) == 0
    assert not (out / "failures.txt").exists()


def test_predict_rejects_bad_batch_size_and_workers(checkpoint, tmp_path, capsys):
    image = tmp_path / "x.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(image)
    assert main(["predict", str(checkpoint), str(image), "--out", str(tmp_path / "o"), "--batch-size", "0"]) == 2
    assert "--batch-size 0: must be >= 1" in capsys.readouterr().err
    assert main(["predict", str(checkpoint), str(image), "--out", str(tmp_path / "o"), "--workers", "-1"]) == 2
    assert "--workers -1: must be >= 0" in capsys.readouterr().err
