"""Training and checking a `folder` dataset (your own data) end to end: class count from classes.txt,
a crop larger than every image refused, duplicate names reported with the split's other problems."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from scaleseg.cli import main
from scaleseg.config import load_config
from scaleseg.engine.trainer import Trainer
from scaleseg.errors import ConfigError

from tests.conftest import TINY

RUN = [o for o in TINY if not o.startswith("data.num_classes")] + ["train.iters=2", "train.checkpoint_interval=2"]


def make_folder_dataset(root, classes: int = 3, train: int = 4, val: int = 2, size=(64, 64)):
    """classes.txt, images/{train,val}/i.png and labels/{train,val}/i.png: stripes of the classes."""
    (root / "classes.txt").parent.mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text("".join(f"class {i}\n" for i in range(classes)))
    rng = np.random.default_rng(0)
    for split, n in (("train", train), ("val", val)):
        for i in range(n):
            (root / "images" / split).mkdir(parents=True, exist_ok=True)
            (root / "labels" / split).mkdir(parents=True, exist_ok=True)
            label = (np.arange(size[1])[None, :] // 8 + i) % classes * np.ones((size[0], 1), dtype=np.int64)
            image = (label[..., None] * 80 + rng.integers(0, 20, (*size, 3))).astype(np.uint8)
            Image.fromarray(image).save(root / "images" / split / f"{i}.png")
            Image.fromarray(label.astype(np.uint8)).save(root / "labels" / split / f"{i}.png")


def test_num_classes_is_taken_from_classes_txt(tmp_path):
    make_folder_dataset(tmp_path / "data", classes=3)
    cfg = load_config(None, [*RUN, "data.dataset=folder", f"data.root={tmp_path / 'data'}"])
    assert cfg.data.num_classes == 3  # not the default 1000
    Trainer(cfg, work_dir=tmp_path / "run").run()
    # an explicit value that contradicts classes.txt is still an error naming both
    with pytest.raises(Exception, match=r"data.num_classes = 5 .*3 classes"):
        Trainer(load_config(None, [*RUN, "data.dataset=folder", f"data.root={tmp_path / 'data'}",
                                   "data.num_classes=5"]), work_dir=tmp_path / "run2").run()


def test_a_crop_larger_than_every_image_is_refused(tmp_path):
    make_folder_dataset(tmp_path / "data", size=(20, 24))
    cfg = load_config(None, [*RUN, "data.dataset=folder", f"data.root={tmp_path / 'data'}",
                             "data.train_pipeline.crop_size=64"])
    with pytest.raises(ConfigError, match=r"data.train_pipeline.crop_size = \[64, 64\] is larger than every training "
                                          r"image resized by data.train_pipeline.scale_range high 2.0 \(largest 20x24"):
        Trainer(cfg, work_dir=tmp_path / "run").run()
    assert not (tmp_path / "run" / "config.yaml").exists()  # refused before training
    # one image large enough is enough
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(tmp_path / "data/images/train/big.png")
    Image.fromarray(np.zeros((40, 40), np.uint8)).save(tmp_path / "data/labels/train/big.png")
    Trainer(cfg, work_dir=tmp_path / "run").run()


def test_check_data_lists_the_other_problems_when_two_images_share_a_name(tmp_path, capsys):
    root = tmp_path / "data"
    make_folder_dataset(root, train=3)
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(root / "images/train/1.jpg")  # 1.png and 1.jpg
    Image.fromarray(np.full((64, 64), 7, np.uint8)).save(root / "labels/train/2.png")  # class 7 of 3
    assert main(["check-data", "data.dataset=folder", f"data.root={root}", "--no-progress"]) == 1
    out = capsys.readouterr().out
    assert "folder train: 3 samples" in out and "2 problems" in out, out
    assert "have the same name" in out and "1.jpg" in out and "1.png" in out
    assert "2: " in out and "neither a class" in out  # the other problem of the split is still listed
    assert "folder val: 2 samples, 2 read cleanly, 0 problems" in out
