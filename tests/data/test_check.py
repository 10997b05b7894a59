"""`scaleseg check-data`: every problem of a split reported with its file, plus label statistics."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from scaleseg.cli import main
from scaleseg.config import load_config
from scaleseg.data.check import check_config, check_dataset, format_report
from scaleseg.data.datasets import SyntheticSegmentation


def _image(path, h, w):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)


def _palette_label(path, label):
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(label.astype(np.uint8), mode="P")
    im.putpalette([(i * 37) % 256 for i in range(768)])
    im.save(path)


GOOD = np.array([[0, 0, 1, 1, 2, 255], [0, 0, 1, 1, 2, 255], [0, 0, 0, 1, 2, 2], [0, 0, 0, 1, 255, 255]])


@pytest.fixture
def folder(tmp_path):
    """The folder-dataset layout: classes.txt, images/<split>/, labels/<split>/; train has five bad samples."""
    root = tmp_path / "mydata"
    root.mkdir()
    (root / "classes.txt").write_text("sky\nroad\ncar\n")
    h, w = GOOD.shape
    _image(root / "images/train/good.jpg", h, w)
    _palette_label(root / "labels/train/good.png", GOOD)
    (root / "images/train/corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n but then nothing")
    _palette_label(root / "labels/train/corrupt.png", GOOD)
    _image(root / "images/train/outofrange.png", h, w)
    bad = GOOD.copy()
    bad[0, 0] = 7
    _palette_label(root / "labels/train/outofrange.png", bad)
    _image(root / "images/train/mismatch.png", h + 1, w)
    _palette_label(root / "labels/train/mismatch.png", GOOD)
    _image(root / "images/train/wide.png", h, w)
    Image.fromarray(GOOD.astype(np.uint16)).save(root / "labels/train/wide.png")  # 16-bit in an 8-bit dataset
    _image(root / "images/train/nolabel.png", h, w)
    for name in ("v1", "v2"):
        _image(root / f"images/val/{name}.png", h, w)
        _palette_label(root / f"labels/val/{name}.png", GOOD)
    return root


def _cfg(root, *extra):
    return load_config(None, ["data.dataset=folder", f"data.root={root}", "data.num_classes=3", *extra])


def test_every_problem_is_reported_with_its_file(folder):
    (train,) = check_config(_cfg(folder).data, ["train"], progress=False, num_workers=0)
    assert not train.ok
    assert train.num_samples == 6 and train.num_loaded == 1
    by_sample = {p.sample: p for p in train.problems}
    assert set(by_sample) == {"corrupt", "outofrange", "mismatch", "wide", "nolabel"}
    assert by_sample["corrupt"].files == (str(folder / "images/train/corrupt.png"),)
    assert "cannot be decoded" in by_sample["corrupt"].message
    assert by_sample["outofrange"].files == (str(folder / "labels/train/outofrange.png"),)
    assert "7" in by_sample["outofrange"].message
    assert "6x5" in by_sample["mismatch"].message and "6x4" in by_sample["mismatch"].message  # width x height
    assert by_sample["mismatch"].files == (str(folder / "images/train/mismatch.png"), str(folder / "labels/train/mismatch.png"))
    assert by_sample["wide"].files == (str(folder / "labels/train/wide.png"),) and "16-bit" in by_sample["wide"].message
    assert "nolabel" in by_sample["nolabel"].message and by_sample["nolabel"].files[0].endswith(".png")
    for p in train.problems:
        assert all(f in p.message for f in p.files)  # the message names the file it blames
    # statistics come from the one clean sample: counted by hand from GOOD
    np.testing.assert_array_equal(train.class_pixels, [10, 6, 4])
    np.testing.assert_array_equal(train.class_images, [1, 1, 1])
    assert (train.ignore_pixels, train.total_pixels) == (4, 24)


def test_cli_lists_all_problems_and_exits_1(folder, capsys, tmp_path):
    out_json = tmp_path / "report.json"
    rc = main(["check-data", "data.dataset=folder", f"data.root={folder}", "data.num_classes=3",
               "--no-progress", "--workers", "0", "--json", str(out_json)])
    text = capsys.readouterr().out
    assert rc == 1
    for name in ("images/train/corrupt.png", "labels/train/outofrange.png", "images/train/mismatch.png",
                 "labels/train/wide.png", "nolabel"):
        assert name in text, name
    assert "folder train: 6 samples, 1 read cleanly, 5 problems" in text
    assert "folder val: 2 samples, 2 read cleanly, 0 problems" in text
    assert "ignore (255): 16.67% of 48 pixels" in text  # val: 2 x 4 of 2 x 24
    assert "5 problems found" in text
    report = json.loads(out_json.read_text())
    assert [r["split"] for r in report] == ["train", "val"]
    assert report[1]["classes"][0] == {"id": 0, "name": "sky", "pixels": 20, "images": 2}


def test_cli_clean_split_exits_0(folder, capsys):
    rc = main(["check-data", "data.dataset=folder", f"data.root={folder}", "data.num_classes=3",
               "--splits", "val", "--no-progress", "--workers", "0"])
    text = capsys.readouterr().out
    assert rc == 0
    assert "classes present: 3 of 3" in text and "no problems found" in text
    assert "most pixels: sky 50.0%, road 30.0%, car 20.0%" in text  # 20, 12, 8 of 40 labelled pixels


def test_a_split_that_cannot_be_listed_is_a_problem(folder, capsys):
    rc = main(["check-data", "data.dataset=folder", f"data.root={folder}", "data.num_classes=3",
               "--splits", "val,test", "--no-progress", "--workers", "0"])
    text = capsys.readouterr().out
    assert rc == 1
    assert "folder test: 0 samples" in text and "images/test" in text


def test_worker_processes_find_the_same(folder):
    (one,) = check_config(_cfg(folder).data, ["train"], progress=False, num_workers=0)
    (two,) = check_config(_cfg(folder).data, ["train"], progress=False, num_workers=2)
    assert format_report([one]) == format_report([two])


def test_synthetic_histogram_matches_brute_force():
    data = SyntheticSegmentation(num_classes=9, image_size=(20, 20), length=5)
    report = check_dataset(data, progress=False)
    assert report.ok and report.num_samples == 5
    labels = np.stack([data[i]["label"] for i in range(5)])
    np.testing.assert_array_equal(report.class_pixels, np.bincount(labels[labels != data.ignore_index], minlength=9))
    np.testing.assert_array_equal(
        report.class_images, [sum(c in data[i]["label"] for i in range(5)) for c in range(9)]
    )
    assert report.ignore_pixels == int((labels == data.ignore_index).sum()) and report.total_pixels == 5 * 400


def test_a_bad_sample_of_a_plain_dataset_is_reported():
    class Broken(SyntheticSegmentation):
        def __getitem__(self, index):
            item = super().__getitem__(index)
            if index == 1:
                item["label"] = item["label"][:-1]
            if index == 2:
                item["label"] = np.full_like(item["label"], 42)
            return item

    report = check_dataset(Broken(num_classes=9, image_size=(20, 20), length=4), progress=False)
    assert [p.sample for p in report.problems] == ["train_000001", "train_000002"]
    assert "shape" in report.problems[0].message and "42" in report.problems[1].message
