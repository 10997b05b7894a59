import json

import numpy as np
import pytest
from PIL import Image

from scaleseg.cli import main


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny training run through the CLI, shared by the eval/predict tests."""
    from tests.conftest import TINY

    work = tmp_path_factory.mktemp("cli") / "run"
    assert main(["train", *TINY, "--work-dir", str(work)]) == 0
    return work


def test_train_cli_rejects_bad_config_with_the_key(capsys, tmp_path):
    assert main(["train", "model.backbon=resnet50", "--work-dir", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'model.backbon'" in err and "did you mean 'model.backbone'" in err
    assert "Traceback" not in err


def test_train_cli_accepts_a_config_file_and_resume(tmp_path, trained):
    from tests.conftest import TINY

    cfg = tmp_path / "mine.yaml"
    cfg.write_text("train:\n  iters: 3\n  checkpoint_interval: 3\n")
    work = tmp_path / "w"
    assert main(["train", str(cfg), *[o for o in TINY if not o.startswith(("train.iters", "train.checkpoint"))],
                 "--work-dir", str(work)]) == 0
    assert (work / "iter_000003.pth").exists()
    # resuming a finished run with more iterations continues from iteration 3
    assert main(["train", str(cfg), *[o for o in TINY if not o.startswith(("train.iters", "train.checkpoint"))],
                 "train.iters=5", "train.checkpoint_interval=5", "--work-dir", str(work), "--resume"]) == 0
    assert "resumed from" in (work / "train.log").read_text()


def test_eval_cli_reproduces_the_training_evaluation(trained, capsys):
    assert main(["eval", str(trained), "--checkpoint", str(trained / "iter_000006.pth"), "--no-progress"]) == 0
    out_dir = trained / "eval" / "iter_000006"
    got = json.loads((out_dir / "metrics.json").read_text())
    rows = (out_dir / "per_class.csv").read_text().splitlines()
    assert rows[0].startswith("class_id,name,IoU,Acc")
    assert len(rows) == 1 + 40
    # the trainer's own final evaluation of the same checkpoint wrote the same numbers
    train_rows = [json.loads(l) for l in (trained / "scalars.jsonl").read_text().splitlines()]
    final = [r for r in train_rows if r["split"] == "val"][-1]
    assert got["mIoU"] == final["mIoU"] and got["aAcc"] == final["aAcc"]
    printed = capsys.readouterr().out
    assert "mIoU" in printed and "fwIoU" in printed


def test_eval_cli_slide_mode_and_default_checkpoint(trained, tmp_path):
    out = tmp_path / "ev"
    assert main(["eval", str(trained), "eval.mode=slide", "eval.crop_size=48", "eval.stride=32",
                 "--out", str(out), "--no-progress"]) == 0
    assert json.loads((out / "metrics.json").read_text())["checkpoint"].endswith("best.pth")


def test_eval_cli_refuses_a_mismatched_checkpoint(trained, capsys):
    assert main(["eval", str(trained), "data.num_classes=41", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "data.num_classes: checkpoint 40, config 41" in err


def write_odd_images(folder):
    rng = np.random.default_rng(0)
    folder.mkdir()
    Image.fromarray(rng.integers(0, 255, (37, 53, 3), dtype=np.uint8)).save(folder / "rgb_odd.jpg")
    Image.fromarray(rng.integers(0, 255, (40, 40), dtype=np.uint8), mode="L").save(folder / "gray.png")
    Image.fromarray(rng.integers(0, 255, (33, 61, 4), dtype=np.uint8), mode="RGBA").save(folder / "rgba.png")
    Image.fromarray(rng.integers(0, 65535, (29, 31), dtype=np.uint16)).save(folder / "gray16.png")
    pal = Image.fromarray(rng.integers(0, 8, (45, 45), dtype=np.uint8), mode="P")
    pal.putpalette(list(rng.integers(0, 255, 768)))
    (folder / "sub").mkdir()
    pal.save(folder / "sub" / "palette.png")
    (folder / "broken.png").write_bytes(b"\x89PNG not really")


def test_predict_cli_on_odd_images(trained, tmp_path, capsys):
    images = tmp_path / "images"
    write_odd_images(images)
    out = tmp_path / "pred"
    code = main(["predict", str(trained / "best.pth"), str(images), "--out", str(out), "--no-progress"])
    assert code == 1  # one image was broken; the others were still written
    err_out = capsys.readouterr().out
    assert "broken.png" in err_out and "predicted 5 of 6" in err_out
    for rel, size in [("rgb_odd", (53, 37)), ("gray", (40, 40)), ("rgba", (61, 33)), ("gray16", (31, 29)),
                      ("sub/palette", (45, 45))]:
        label = Image.open(out / f"{rel}.png")
        assert label.size == size and label.mode == "L"  # 40 classes: 8-bit
        assert np.asarray(label).max() < 40
        assert Image.open(out / f"{rel}_overlay.png").size == size


def test_predict_writes_16_bit_labels_above_255_classes(tmp_path):
    from tests.conftest import TINY

    work = tmp_path / "big"
    overrides = [o for o in TINY if not o.startswith(("data.num_classes", "train.iters", "train.checkpoint"))]
    assert main(["train", *overrides, "data.num_classes=300", "train.iters=2", "train.checkpoint_interval=2",
                 "--work-dir", str(work)]) == 0
    image = tmp_path / "one.png"
    Image.fromarray(np.full((20, 24, 3), 128, np.uint8)).save(image)
    assert main(["predict", str(work / "iter_000002.pth"), str(image), "--out", str(tmp_path / "p")]) == 0
    label = Image.open(tmp_path / "p" / "one.png")
    assert label.mode.startswith("I;16") and label.size == (24, 20)
