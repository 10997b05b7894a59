"""Bad samples never mislead: `data.on_bad_sample=skip` skips a bad sample (evaluation does not score a
substitute twice), counts it and logs the count in train.log, scalars.jsonl and metrics.json; an
unpaired file is reported by name by every loader (and by check-data); a bad sample read in a DataLoader
worker is one line naming the file and the fix; images and labels are read without EXIF orientation,
both alike; Cityscapes labelIds that are no label id, and an 8-bit ADE20K-full label, are refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from scaleseg.cli import main
from scaleseg.data.datasets.ade20k import ADE20K, ADE20KFull
from scaleseg.data.datasets.cityscapes import Cityscapes
from scaleseg.data.datasets.cocostuff import COCOStuff164k
from scaleseg.data.datasets.folder import FolderSegmentation
from scaleseg.errors import DataError

TRAIN_ID = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12,
            26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
H, W = 24, 32

TINY_FILE_RUN = [
    "data.dataset=cityscapes", "data.num_classes=19", "data.batch_size=2", "data.train_pipeline.crop_size=16",
    "data.train_pipeline.scale_range=[1.0,1.0]", "model.decoder.channels=8", "model.decoder.low_level_channels=8",
    "train.iters=2", "train.log_interval=1", "train.eval_interval=0", "train.checkpoint_interval=2",
    "train.progress=false", "train.deterministic=true",
]


def cityscapes_tree(root: Path, frames: dict[str, int], corrupt: set[str] = frozenset()) -> dict[str, np.ndarray]:
    """leftImg8bit/<split>/c/<stem>_leftImg8bit.png and gtFine/.../<stem>_gtFine_labelIds.png for each
    "split/stem"; `corrupt` images are garbage bytes. Returns {stem: trainIds by brute force}."""
    truth = {}
    for k, (key, seed) in enumerate(frames.items()):
        split, stem = key.split("/")
        rng = np.random.default_rng(seed)
        ids = rng.choice(np.array([0, 1, 7, 8, 11, 21, 23, 26, 33]), size=(H, W)).astype(np.uint8)
        for folder in ("leftImg8bit", "gtFine"):
            (root / folder / split / "c").mkdir(parents=True, exist_ok=True)
        image = root / "leftImg8bit" / split / "c" / f"{stem}_leftImg8bit.png"
        if key in corrupt:
            image.write_bytes(b"\x89PNG not really")
        else:
            Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)).save(image)
        Image.fromarray(ids, mode="L").save(root / "gtFine" / split / "c" / f"{stem}_gtFine_labelIds.png")
        truth[stem] = np.vectorize(lambda v: TRAIN_ID.get(int(v), 255))(ids)
    return truth


def label_area(csv_path: Path) -> np.ndarray:
    return np.array([int(r.split(",")[-1]) for r in csv_path.read_text().splitlines()[1:]])


def test_skip_in_evaluation_skips_the_bad_frame_instead_of_scoring_its_neighbour_twice(tmp_path, capsys):
    root = tmp_path / "cityscapes"
    truth = cityscapes_tree(root, {"train/a_0": 1, "train/a_1": 2, "val/v_0": 3, "val/v_1": 4, "val/v_2": 5},
                            corrupt={"val/v_1", "train/a_1"})
    work = tmp_path / "run"
    common = [f"data.root={root}", "data.on_bad_sample=skip", *TINY_FILE_RUN]
    assert main(["train", *common, "data.num_workers=1", "--work-dir", str(work)]) == 0
    good = np.concatenate([truth["v_0"].ravel(), truth["v_2"].ravel()])
    expected = np.bincount(good[good != 255], minlength=19)  # the two good frames only, by brute force
    np.testing.assert_array_equal(label_area(work / "eval" / "iter_000002" / "per_class.csv"), expected)
    assert json.loads((work / "eval" / "iter_000002" / "metrics.json").read_text())["skipped_samples"] == 1

    # training: 2 iterations of batch 2 over 2 images = 2 epochs, so the corrupt one was drawn (and replaced) twice,
    # counted across the worker process, in scalars.jsonl and train.log
    records = [json.loads(line) for line in (work / "scalars.jsonl").read_text().splitlines()]
    assert sum(r.get("skipped_samples", 0) for r in records if r["split"] == "train") == 2
    assert [r.get("skipped_samples") for r in records if r["split"] == "val"] == [1]
    log = (work / "train.log").read_text()
    assert log.count("a_1_leftImg8bit.png") >= 2 and "v_1_leftImg8bit.png" in log

    out = tmp_path / "ev"
    assert main(["eval", str(work), "--out", str(out), "--no-progress", "data.num_workers=0"]) == 0
    np.testing.assert_array_equal(label_area(out / "per_class.csv"), expected)
    assert json.loads((out / "metrics.json").read_text())["skipped_samples"] == 1
    assert "v_1_leftImg8bit.png" in capsys.readouterr().out


def test_a_bad_sample_in_a_loader_worker_is_one_line_naming_the_file_and_the_fix(tmp_path, capsys):
    root = tmp_path / "cityscapes"
    cityscapes_tree(root, {"train/a_0": 1, "train/a_1": 2, "val/v_0": 3}, corrupt={"train/a_1"})
    assert main(["train", f"data.root={root}", *TINY_FILE_RUN, "data.num_workers=1",
                 "--work-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "a_1_leftImg8bit.png" in err[0] and "Traceback" not in err[0] and "worker" not in err[0]
    assert "scaleseg check-data" in err[0] and "data.on_bad_sample=skip" in err[0]


# ------------------------------------------------------------------------------------- unpaired files
def _jpeg(path: Path, h: int = 3, w: int = 4) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((h, w, 3), np.uint8)).save(path)


def _png(path: Path, label: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(label).save(path)


def _ade20k(root: Path) -> tuple:
    for name in ("a", "b"):
        _jpeg(root / "images" / "training" / f"{name}.jpg")
        _png(root / "annotations" / "training" / f"{name}.png", np.ones((3, 4), np.uint8))
    return root / "annotations" / "training" / "c.png", root / "images" / "training" / "d.jpg"


def _ade20k_full(root: Path) -> tuple:
    (root / "classes.txt").write_text("0\t2978\twall\n1\t312\tbuilding\n")
    for name in ("a", "b"):
        _jpeg(root / "images" / "training" / f"{name}.jpg")
        _png(root / "annotations" / "training" / f"{name}.png", np.ones((3, 4), np.uint16))
    return root / "annotations" / "training" / "c.png", root / "images" / "training" / "d.jpg"


def _cocostuff164k(root: Path) -> tuple:
    for name in ("a", "b"):
        _jpeg(root / "images" / "train2017" / f"{name}.jpg")
        _png(root / "annotations" / "train2017" / f"{name}.png", np.ones((3, 4), np.uint8))
    return root / "annotations" / "train2017" / "c.png", root / "images" / "train2017" / "d.jpg"


UNPAIRED = [(ADE20K, "ade20k", _ade20k, 150), (ADE20KFull, "ade20k_full", _ade20k_full, 2),
            (COCOStuff164k, "cocostuff164k", _cocostuff164k, 171)]


@pytest.mark.parametrize("cls, name, make, classes", UNPAIRED)
@pytest.mark.parametrize("side", ["label without image", "image without label"])
def test_an_unpaired_file_is_reported_by_name(tmp_path, capsys, cls, name, make, classes, side):
    lonely_label, lonely_image = make(tmp_path)
    if side == "label without image":
        _png(lonely_label, np.ones((3, 4), np.uint16 if name == "ade20k_full" else np.uint8))
        lonely, missing = lonely_label, lonely_image.with_name("c.jpg")
    else:
        _jpeg(lonely_image)
        lonely, missing = lonely_image, lonely_label.with_name("d.png")
    with pytest.raises(DataError) as err:
        cls(tmp_path, "train")
    assert str(lonely) in str(err.value) and str(missing) in str(err.value)
    with pytest.warns(UserWarning, match="1 of 3 samples"):
        skipping = cls(tmp_path, "train", on_bad_sample="skip")
    assert len(skipping) == 3  # listed; skipped (and counted) when read
    assert main(["check-data", f"data.dataset={name}", f"data.root={tmp_path}", f"data.num_classes={classes}",
                 "--splits", "train", "--no-progress", "data.num_workers=0"]) == 1
    out = capsys.readouterr().out
    assert "1 problems found" in out and str(lonely) in out and str(missing) in out


# ------------------------------------------------------------------------------------- EXIF orientation
def test_images_and_labels_are_read_as_stored_without_exif_orientation(tmp_path, capsys):
    """A JPEG tagged "rotate 180" (EXIF orientation 3) with a label map drawn on its stored pixels: the
    dataset reads both as stored, so they stay aligned; `scaleseg predict` (no label) applies the tag."""
    from scaleseg.data.io import read_image

    (tmp_path / "classes.txt").write_text("a\nb\n")
    stored = np.zeros((4, 6, 3), np.uint8)
    stored[:2] = 255  # the top half is white ...
    label = np.zeros((4, 6), np.uint8)
    label[:2] = 1  # ... and labelled 1
    image_path = tmp_path / "images" / "train" / "x.png"
    image_path.parent.mkdir(parents=True)
    exif = Image.Exif()
    exif[0x0112] = 3
    Image.fromarray(stored).save(image_path, exif=exif)
    _png(tmp_path / "labels" / "train" / "x.png", label)
    item = FolderSegmentation(tmp_path, "train")[0]
    np.testing.assert_array_equal(item["image"], stored)
    np.testing.assert_array_equal(item["label"], label)
    np.testing.assert_array_equal(read_image(image_path), stored[::-1, ::-1])  # predict: as displayed
    # check-data points the tag out (a label drawn on the displayed picture would be upside down)
    (tmp_path / "images" / "val").mkdir()
    (tmp_path / "labels" / "val").mkdir()
    (tmp_path / "images" / "val" / "x.png").symlink_to(image_path)
    (tmp_path / "labels" / "val" / "x.png").symlink_to(tmp_path / "labels" / "train" / "x.png")
    assert main(["check-data", "data.dataset=folder", f"data.root={tmp_path}", "data.num_classes=2", "--no-progress",
                 "data.num_workers=0"]) == 0
    assert f"note: 1 images carry an EXIF orientation tag (e.g. {image_path} (orientation 3))" in capsys.readouterr().out


# ------------------------------------------------------------------------------------- refused values
def test_a_cityscapes_label_id_without_a_class_is_reported(tmp_path, capsys):
    root = tmp_path / "cityscapes"
    cityscapes_tree(root, {"train/a_0": 1, "val/v_0": 3})
    path = root / "gtFine" / "val" / "c" / "v_0_gtFine_labelIds.png"
    ids = np.array(Image.open(path))
    ids[0, :3] = 200
    ids[1, 0] = 34
    Image.fromarray(ids, mode="L").save(path)
    with pytest.raises(DataError, match=r"v_0_gtFine_labelIds\.png.* 4 pixels .*: 34, 200"):
        Cityscapes(root, "val")[0]
    assert main(["check-data", "data.dataset=cityscapes", f"data.root={root}", "data.num_classes=19",
                 "--no-progress", "data.num_workers=0"]) == 1
    assert "v_0_gtFine_labelIds.png" in capsys.readouterr().out


def test_an_8_bit_ade20k_full_label_is_refused(tmp_path):
    (tmp_path / "classes.txt").write_text("0\t2978\twall\n")
    _jpeg(tmp_path / "images" / "validation" / "a.jpg")
    _png(tmp_path / "annotations" / "validation" / "a.png", np.array([[0, 255, 0, 0]] * 3, np.uint8))
    with pytest.raises(DataError, match=r"a\.png.* 8-bit .*16-bit"):
        ADE20KFull(tmp_path, "val")[0]
