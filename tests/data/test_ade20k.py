"""ADE20K SceneParsing (150 classes), ADE20K-full (16-bit, top-N classes) and its converter, on tiny
trees written in the published formats: 8-bit grey annotation PNGs, RGB *_seg.png files whose
R // 10 * 256 + G is the full class index (B: instance ids), JPEG images."""

from __future__ import annotations

import argparse
import os
import pickle

import numpy as np
import pytest
from PIL import Image

from scaleseg.config import DataConfig
from scaleseg.data import build_dataset
from scaleseg.data.datasets.ade20k import ADE20K, ADE20KFull
from scaleseg.data.datasets.base import read_label_file
from scaleseg.data.prepare import ade20k_full
from scaleseg.errors import DataError

RNG = np.random.default_rng(0)


def _jpeg(path, h, w):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(RNG.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path, quality=90)


def _grey(path, label):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(label, np.uint8), mode="L").save(path)


# ------------------------------------------------------------------------------ ADE20K (150 classes)
def _challenge(root, split="training", name="ADE_train_00000001", label=None, image_hw=None):
    label = np.array([[0, 1, 150, 2], [37, 0, 149, 150], [1, 1, 0, 75]]) if label is None else label
    h, w = label.shape if image_hw is None else image_hw
    _jpeg(root / "images" / split / f"{name}.jpg", h, w)
    _grey(root / "annotations" / split / f"{name}.png", label)


def test_ade20k_reduces_zero_label(tmp_path):
    _challenge(tmp_path)
    _challenge(tmp_path, name="ADE_train_00000002", label=np.full((2, 2), 150))
    _challenge(tmp_path, "validation", "ADE_val_00000001", label=np.array([[0, 12], [13, 0]]))
    ds = ADE20K(tmp_path, "train")
    assert (len(ds), ds.num_classes, ds.ignore_index, ds.palette.shape) == (2, 150, 255, (150, 3))
    assert ds.class_names[:5] == ["wall", "building", "sky", "floor", "tree"] and ds.class_names[-1] == "flag"
    item = ds[0]
    assert item["name"] == "ADE_train_00000001" and item["image"].shape == (3, 4, 3)
    # by hand: 0 -> 255, k -> k - 1
    np.testing.assert_array_equal(item["label"], [[255, 0, 149, 1], [36, 255, 148, 149], [0, 0, 255, 74]])
    np.testing.assert_array_equal(ds[1]["label"], np.full((2, 2), 149))

    # through the registry and config: "val" is the validation folder
    val = build_dataset(DataConfig(dataset="ade20k", root=str(tmp_path)), "val")
    assert isinstance(val, ADE20K) and len(val) == 1
    np.testing.assert_array_equal(val[0]["label"], [[255, 11], [12, 255]])  # person is 12, earth 13


def test_ade20k_missing_annotation_names_the_file(tmp_path):
    _challenge(tmp_path)
    _jpeg(tmp_path / "images" / "training" / "ADE_train_00000009.jpg", 3, 4)
    with pytest.raises(DataError, match=r"ADE_train_00000009\.png"):
        ADE20K(tmp_path, "train")
    with pytest.warns(UserWarning, match="1 of 2 samples lack a file and will be skipped"):
        ds = ADE20K(tmp_path, "train", on_bad_sample="skip")
    assert len(ds) == 2  # listed; skipped (and counted) when read
    item, skipped = ds.load_or_skip(1, substitute=False)
    assert item is None and len(skipped) == 1 and "ADE_train_00000009.png" in skipped[0]


def test_ade20k_bad_labels_name_the_file(tmp_path):
    _challenge(tmp_path, name="a_size", image_hw=(5, 4))
    _challenge(tmp_path, name="b_too_high", label=np.array([[0, 151], [200, 3]]))
    path16 = tmp_path / "annotations" / "training" / "c_16bit.png"
    _challenge(tmp_path, name="c_16bit")
    Image.fromarray(np.array([[0, 1, 2, 3], [4, 5, 6, 7], [1, 1, 1, 1]], np.uint16)).save(path16)
    ds = ADE20K(tmp_path, "train")
    with pytest.raises(DataError, match=r"a_size\.jpg.* is 4x5 .*a_size\.png.* is 4x3"):
        ds[0]
    with pytest.raises(DataError, match=r"b_too_high\.png.* 2 pixels .*above 150: 151, 200"):
        ds[1]
    with pytest.raises(DataError, match=r"c_16bit\.png.*16-bit.*8-bit"):
        ds[2]


def test_ade20k_wrong_root(tmp_path):
    with pytest.raises(DataError, match="not a folder"):
        ADE20K(tmp_path / "nowhere", "train")
    (tmp_path / "images").mkdir()
    with pytest.raises(DataError, match="no samples"):
        ADE20K(tmp_path, "train")


# ------------------------------------------------------------------------------ full ADE20K release
def _encode(index):
    """Full class indices -> the release's *_seg.png RGB: R = idx // 256 * 10 (+ 0..9, dropped by the
    integer division), G = idx % 256, B = instance noise."""
    index = np.asarray(index)
    rgb = np.stack([(index // 256) * 10 + RNG.integers(0, 10, index.shape), index % 256,
                    RNG.integers(0, 256, index.shape)], axis=-1)
    assert rgb.max() <= 255
    return rgb.astype(np.uint8)


def _release_sample(root, split, scene, name, index, image_hw=None):
    folder = root / "images" / "ADE" / split / scene
    h, w = np.shape(index) if image_hw is None else image_hw
    _jpeg(folder / f"{name}.jpg", h, w)
    Image.fromarray(_encode(index), mode="RGB").save(folder / f"{name}_seg.png")
    Image.fromarray(_encode(np.zeros_like(index)), mode="RGB").save(folder / f"{name}_parts_1.png")  # not a label


# Training images holding each full index: 2978 -> 3, 312 -> 2, 7 / 2420 / 5000 -> 1 each; 5000
# has the most pixels of all, which does not count. Top 3: 2978, 312, then 7 (tie at 1 image, the
# smallest index wins).
TRAIN = {
    ("urban/street", "ADE_train_00000001"): [[2978, 2978, 312, 0], [2978, 312, 312, 0], [0, 2978, 2978, 2978]],
    ("home/kitchen", "ADE_train_00000002"): [[5000, 5000, 5000, 5000], [5000, 5000, 2978, 7], [5000, 5000, 5000, 5000]],
    ("home/bedroom/indoor", "ADE_train_00000003"): [[2420, 312], [2978, 2978]],
}
VAL = {("urban/street", "ADE_val_00000001"): [[2978, 2420, 7], [0, 4000, 312]]}
KEPT = {2978: 0, 312: 1, 7: 2}


def _expected(index, kept=KEPT):
    return np.array([[kept.get(v, 65535) for v in row] for row in index])


def _release(root, objects=True):
    for (scene, name), index in TRAIN.items():
        _release_sample(root, "training", scene, name, index)
    for (scene, name), index in VAL.items():
        _release_sample(root, "validation", scene, name, index)
    if objects:
        names = {2978: "wall", 312: "building, edifice", 7: "ad, advertisement"}
        rows = ["Object Names\tWordnet name\tnumber of images"]
        rows += [f"{names.get(k, f'thing {k}')}\tx\t1" for k in range(1, 3689)]
        (root / "objects.txt").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return root


def _prepare(root, out, *extra):
    parser = argparse.ArgumentParser()
    ade20k_full.add_arguments(parser)
    args = parser.parse_args(["--root", str(root), "--out", str(out), "--classes", "ranked", "--num-classes", "3",
                              "--no-progress", *extra])
    return ade20k_full.run(args)


def _label(out, split, name):
    return read_label_file(out / "annotations" / split / f"{name}.png", 16)


def test_decode_full_index_uses_integer_division():
    seg = np.array([[[116, 162, 3], [119, 162, 250], [0, 0, 9], [255, 255, 0]]], np.uint8)
    np.testing.assert_array_equal(ade20k_full.decode_full_index(seg), [[11 * 256 + 162] * 2 + [0, 25 * 256 + 255]])
    assert 11 * 256 + 162 == 2978


def test_select_classes_counts_images_and_breaks_ties_by_index():
    counts = np.zeros(ade20k_full.NUM_FULL_INDICES, np.int64)
    counts[[0, 9, 4, 300, 2978, 6655]] = [99, 2, 5, 2, 5, 1]
    np.testing.assert_array_equal(ade20k_full.select_classes(counts, 3), [4, 2978, 9])  # 0 is never a class
    np.testing.assert_array_equal(ade20k_full.select_classes(counts, 10), [4, 2978, 9, 300, 6655])


def test_convert_then_load(tmp_path, capsys):
    root, out = _release(tmp_path / "ADE20K_2021_17_01"), tmp_path / "ade_full"
    assert _prepare(root, out) == 0
    captured = capsys.readouterr()
    summary = captured.out
    assert "warning" not in captured.err
    assert "kept 3 of the 5 classes seen in 3 training images" in summary
    assert "training: 3 images (3 written, 0 already complete)" in summary
    assert "validation: 1 images (1 written" in summary

    assert (out / "classes.txt").read_text().splitlines() == ["0\t2978\twall", "1\t312\tbuilding, edifice", "2\t7\tad, advertisement"]
    counts = [line.split("\t")[:2] for line in (out / "class_image_counts.tsv").read_text().splitlines() if line[0] != "#"]
    assert counts == [["2978", "3"], ["312", "2"], ["7", "1"], ["2420", "1"], ["5000", "1"]]
    for (scene, name), index in TRAIN.items():
        label = _label(out, "training", name)
        assert label.dtype == np.uint16  # 16-bit PNG, 65535 survives
        np.testing.assert_array_equal(label, _expected(index))
        link = out / "images" / "training" / f"{name}.jpg"
        source = root / "images" / "ADE" / "training" / scene / f"{name}.jpg"
        assert link.is_symlink() and os.readlink(link) == str(source.resolve())
    np.testing.assert_array_equal(_label(out, "validation", "ADE_val_00000001"), [[0, 65535, 2], [65535, 65535, 1]])
    assert not list(out.rglob(".*.tmp*"))  # no temporary files left

    train = ADE20KFull(out, "train")
    assert (len(train), train.num_classes, train.ignore_index) == (3, 3, 65535)
    assert train.class_names == ["wall", "building, edifice", "ad, advertisement"] and train.full_indices == [2978, 312, 7]
    for i, ((_, name), index) in enumerate(TRAIN.items()):
        item = train[i]
        assert item["name"] == name and item["image"].shape[:2] == np.shape(index)
        np.testing.assert_array_equal(item["label"], _expected(index))
    val = build_dataset(DataConfig(dataset="ade20k_full", root=str(out)), "val")
    np.testing.assert_array_equal(val[0]["label"], [[0, 65535, 2], [65535, 65535, 1]])


def test_second_run_skips_and_an_interrupted_run_resumes(tmp_path, capsys):
    root, out = _release(tmp_path / "release"), tmp_path / "out"
    _prepare(root, out)
    labels = sorted((out / "annotations").rglob("*.png"))
    stamps = [p.stat().st_mtime_ns for p in labels]
    capsys.readouterr()

    assert _prepare(root, out) == 0
    summary = capsys.readouterr().out
    assert "reusing the training class counts" in summary and "(0 written, 3 already complete)" in summary
    assert [p.stat().st_mtime_ns for p in labels] == stamps  # nothing rewritten

    # an interrupted run: one label never written, one image link missing, a stale temporary file
    (out / "annotations" / "training" / "ADE_train_00000002.png").unlink()
    (out / "images" / "validation" / "ADE_val_00000001.jpg").unlink()
    (out / "annotations" / "training" / ".ADE_train_00000002.png.tmp123").write_bytes(b"partial")
    assert _prepare(root, out) == 0
    summary = capsys.readouterr().out
    assert "training: 3 images (1 written, 2 already complete)" in summary
    assert "validation: 1 images (1 written, 0 already complete)" in summary
    np.testing.assert_array_equal(_label(out, "training", "ADE_train_00000002"), _expected(TRAIN["home/kitchen", "ADE_train_00000002"]))
    assert not list(out.rglob(".*.tmp*"))


def test_changed_selection_needs_overwrite(tmp_path):
    root, out = _release(tmp_path / "release"), tmp_path / "out"
    _prepare(root, out)
    with pytest.raises(DataError, match=r"classes\.txt.*another class selection \(3 classes\).*\(2 classes\).*--overwrite"):
        _prepare(root, out, "--num-classes", "2")
    assert _prepare(root, out, "--num-classes", "2", "--overwrite") == 0
    assert len((out / "classes.txt").read_text().splitlines()) == 2
    index = TRAIN["home/kitchen", "ADE_train_00000002"]
    np.testing.assert_array_equal(_label(out, "training", "ADE_train_00000002"), _expected(index, {2978: 0, 312: 1}))


def test_workers_and_copies_give_the_same_files(tmp_path):
    root = _release(tmp_path / "release")
    _prepare(root, tmp_path / "one")
    _prepare(root, tmp_path / "two", "--workers", "2", "--copy-images")
    for split, name in [("training", n) for _, n in TRAIN] + [("validation", n) for _, n in VAL]:
        np.testing.assert_array_equal(_label(tmp_path / "one", split, name), _label(tmp_path / "two", split, name))
        copy = tmp_path / "two" / "images" / split / f"{name}.jpg"
        assert copy.is_file() and not copy.is_symlink()
        assert copy.read_bytes() == (tmp_path / "one" / "images" / split / f"{name}.jpg").read_bytes()


def test_class_names_are_optional_and_read_safely_from_the_index(tmp_path, capsys):
    root = _release(tmp_path / "release", objects=False)
    _prepare(root, tmp_path / "plain")
    assert [line.split("\t")[2] for line in (tmp_path / "plain" / "classes.txt").read_text().splitlines()] == [
        "class_2978", "class_312", "class_7"]
    assert ADE20KFull(tmp_path / "plain", "val").class_names == ["class_2978", "class_312", "class_7"]

    # index_ade20k.pkl: objectnames[k - 1] names full index k; numpy arrays inside are fine
    objectnames = [f"thing {k}" for k in range(1, 3689)]
    objectnames[2977], objectnames[311], objectnames[6] = "wall", "building, edifice", "ad, advertisement"
    index = {"objectnames": objectnames, "objectPresence": np.zeros((3688, 3), np.uint8), "filename": ["a.jpg"]}
    (root / "index_ade20k.pkl").write_bytes(pickle.dumps(index))
    _prepare(root, tmp_path / "pkl")
    assert ADE20KFull(tmp_path / "pkl", "train").class_names == ["wall", "building, edifice", "ad, advertisement"]
    assert "names from " + str(root / "index_ade20k.pkl") in capsys.readouterr().out

    # a pickle that would run code is refused, not executed: a warning, and names become class_<index>
    (root / "index_ade20k.pkl").write_bytes(pickle.dumps({"objectnames": [os.system]}))
    _prepare(root, tmp_path / "evil")
    assert ADE20KFull(tmp_path / "evil", "train").class_names == ["class_2978", "class_312", "class_7"]
    assert "index_ade20k.pkl' cannot be read safely (refusing to load" in capsys.readouterr().err

    # objects.txt (preferred over the index) with an unrecognised first line: names shift by one, a warning says so
    rows = ["Objects list v2\tx"] + ["wall" if k == 2978 else f"thing {k}" for k in range(1, 3689)]
    (root / "objects.txt").write_text("\n".join(rows) + "\n")
    _prepare(root, tmp_path / "shifted")
    assert "full index 2978 is named 'thing 2977', not 'wall'" in capsys.readouterr().err


def test_converter_bad_input_names_the_file(tmp_path):
    with pytest.raises(DataError, match=r"no images/ADE folder"):
        _prepare(tmp_path, tmp_path / "out")

    root = _release(tmp_path / "size")
    _release_sample(root, "validation", "x", "ADE_val_00000002", [[1, 2], [3, 4]], image_hw=(3, 2))
    with pytest.raises(DataError, match=r"ADE_val_00000002_seg\.png.* is 2x2 .*ADE_val_00000002\.jpg.* is 2x3"):
        _prepare(root, tmp_path / "out_size")

    root = _release(tmp_path / "missing")
    (root / "images" / "ADE" / "training" / "home" / "kitchen" / "ADE_train_00000002.jpg").unlink()
    with pytest.raises(DataError, match=r"ADE_train_00000002\.jpg.* does not exist"):
        _prepare(root, tmp_path / "out_missing")

    root = _release(tmp_path / "grey")
    _grey(root / "images" / "ADE" / "training" / "urban" / "street" / "ADE_train_00000001_seg.png", np.zeros((3, 4)))
    with pytest.raises(DataError, match=r"ADE_train_00000001_seg\.png.* is a L image.*RGB"):
        _prepare(root, tmp_path / "out_grey")

    root = _release(tmp_path / "corrupt")
    (root / "images" / "ADE" / "validation" / "urban" / "street" / "ADE_val_00000001_seg.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    with pytest.raises(DataError, match=r"ADE_val_00000001_seg\.png.* cannot be decoded"):
        _prepare(root, tmp_path / "out_corrupt")


def test_prepare_command_line(tmp_path, capsys):
    from scaleseg.cli import main

    root = _release(tmp_path / "release")
    assert main(["prepare", "ade20k-full", "--root", str(root), "--out", str(tmp_path / "out"), "--classes", "ranked",
                 "--num-classes", "3", "--no-progress"]) == 0
    assert ADE20KFull(tmp_path / "out", "train").num_classes == 3
    assert main(["prepare", "ade20k-full", "--root", str(tmp_path / "nope"), "--out", str(tmp_path / "o2")]) == 2
    assert "no images/ADE folder" in capsys.readouterr().err


# ------------------------------------------------------------------------------ ADE20K-full loader alone
def _prepared(root, num_classes, labels):
    (root / "classes.txt").parent.mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text("".join(f"{i}\t{i + 1}\tname {i}\n" for i in range(num_classes)))
    for name, label in labels.items():
        _jpeg(root / "images" / "training" / f"{name}.jpg", *np.shape(label))
        path = root / "annotations" / "training" / f"{name}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.asarray(label, np.uint16)).save(path)


def test_full_loader_keeps_ids_above_255(tmp_path):
    label = [[299, 256, 65535], [0, 255, 298]]
    _prepared(tmp_path, 300, {"a": label, "b": [[300, 1], [2, 3]]})
    ds = ADE20KFull(tmp_path, "train")
    assert (ds.num_classes, len(ds.class_names), ds.palette.shape) == (300, 300, (300, 3))
    np.testing.assert_array_equal(ds[0]["label"], label)
    with pytest.raises(DataError, match=r"b\.png.*1 pixels.*0\.\.299.*: 300"):
        ds[1]


def test_full_loader_needs_the_prepared_folder(tmp_path):
    (tmp_path / "images" / "ADE").mkdir(parents=True)
    with pytest.raises(DataError, match=r"classes\.txt.*does not exist.*scaleseg prepare ade20k-full"):
        ADE20KFull(tmp_path, "train")
    (tmp_path / "classes.txt").write_text("0\t5\ta\n2\t6\tb\n")
    with pytest.raises(DataError, match=r"classes\.txt.*line 2.*class id 2 where 1 was expected"):
        ADE20KFull(tmp_path, "train")
    (tmp_path / "classes.txt").write_text("zero\twall\n")
    with pytest.raises(DataError, match=r"classes\.txt.*line 1"):
        ADE20KFull(tmp_path, "train")
