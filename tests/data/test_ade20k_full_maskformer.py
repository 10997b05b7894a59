"""`scaleseg prepare ade20k-full` by default writes MaskFormer's ADE20K-full benchmark: its fixed
847-class id list and its resizing (shorter side above 512 -> 512, labels by OpenCV's nearest rule),
on a tiny release in the published format (RGB *_seg.png, class = R // 10 * 256 + G)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from scaleseg.cli import main
from scaleseg.data.datasets.ade20k import ADE20KFull
from scaleseg.data.datasets.base import read_label_file
from scaleseg.data.prepare.maskformer_ade20k_full import MASKFORMER_FULL_INDICES

IGN = 65535
# a few entries of MaskFormer's ADE20K_SEM_SEG_FULL_CATEGORIES ("id" -> "trainId"), copied by hand from
# facebookresearch/MaskFormer datasets/prepare_ade20k_full_sem_seg.py: wall, building, sky, blanket,
# heater, wine rack, adding machine
MASKFORMER = {2978: 0, 312: 1, 2420: 2, 206: 150, 1223: 268, 3059: 561, 3148: 846}
NOT_LISTED = 7  # a full index outside the benchmark's list
PATTERN = [2978, 3148, 312, NOT_LISTED, 2420, 0, 206, 3059, 1223, 3148]


def test_the_fixed_list_has_the_benchmark_entries():
    assert len(MASKFORMER_FULL_INDICES) == 847 and len(set(MASKFORMER_FULL_INDICES)) == 847
    for full, train_id in MASKFORMER.items():
        assert MASKFORMER_FULL_INDICES[train_id] == full
    assert NOT_LISTED not in MASKFORMER_FULL_INDICES


def encode(index: np.ndarray) -> np.ndarray:
    """Full indices -> *_seg.png RGB (R = idx // 256 * 10 + 3, G = idx % 256, B = 0)."""
    return np.stack([(index // 256) * 10 + 3, index % 256, np.zeros_like(index)], axis=-1).astype(np.uint8)


def sample(root, split, name, h, w, shift=0):
    folder = root / "images" / "ADE" / split / "scene"
    folder.mkdir(parents=True, exist_ok=True)
    y, x = np.mgrid[0:h, 0:w]
    index = np.array(PATTERN)[(x + 2 * y + shift) % len(PATTERN)]
    Image.fromarray(encode(index), mode="RGB").save(folder / f"{name}_seg.png")
    Image.fromarray(np.full((h, w, 3), 90, np.uint8)).save(folder / f"{name}.jpg", quality=95)
    return index


def expected(index: np.ndarray, out_hw=None) -> np.ndarray:
    """The benchmark's label by brute force: OpenCV nearest source pixel floor(i * in / out) in exact
    integer arithmetic, then the fixed list."""
    h, w = index.shape
    oh, ow = out_hw or (h, w)
    out = np.empty((oh, ow), np.int64)
    for i in range(oh):
        for j in range(ow):
            out[i, j] = MASKFORMER.get(int(index[i * h // oh, j * w // ow]), IGN)
    return out


@pytest.fixture
def release(tmp_path):
    root = tmp_path / "ADE20K_2021_17_01"
    big = sample(root, "training", "ADE_train_00000001", 514, 515)  # shorter side 514 > 512: resized
    small = sample(root, "training", "ADE_train_00000002", 3, 4, shift=1)
    val = sample(root, "validation", "ADE_val_00000001", 512, 520, shift=2)  # shorter side exactly 512: kept
    return root, {"ADE_train_00000001": big, "ADE_train_00000002": small, "ADE_val_00000001": val}


def label(out, split, name):
    return read_label_file(out / "annotations" / split / f"{name}.png", 16)


def test_default_preparation_is_maskformers_benchmark(release, tmp_path, capsys):
    root, index = release
    out = tmp_path / "ade20k_full"
    assert main(["prepare", "ade20k-full", "--root", str(root), "--out", str(out), "--no-progress"]) == 0
    assert "847 classes of MaskFormer's ADE20K-full benchmark" in capsys.readouterr().out

    # 514 x 515 -> 512 x round(515 / 514 * 512) = 512 x 513, labels by the nearest rule
    big = label(out, "training", "ADE_train_00000001")
    assert big.shape == (512, 513)
    np.testing.assert_array_equal(big, expected(index["ADE_train_00000001"], (512, 513)))
    with Image.open(out / "images" / "training" / "ADE_train_00000001.jpg") as im:
        assert im.size == (513, 512) and im.format == "JPEG"
        assert abs(float(np.asarray(im).mean()) - 90) < 1.5  # a flat grey stays grey
    assert not (out / "images" / "training" / "ADE_train_00000001.jpg").is_symlink()
    np.testing.assert_array_equal(label(out, "training", "ADE_train_00000002"), expected(index["ADE_train_00000002"]))
    assert (out / "images" / "training" / "ADE_train_00000002.jpg").is_symlink()  # no resizing: linked
    np.testing.assert_array_equal(label(out, "validation", "ADE_val_00000001"), expected(index["ADE_val_00000001"]))

    lines = (out / "classes.txt").read_text().splitlines()
    assert len(lines) == 847 and lines[0].split("\t")[:2] == ["0", "2978"] and lines[846].split("\t")[:2] == ["846", "3148"]
    ds = ADE20KFull(out, "val")
    assert ds.num_classes == 847
    np.testing.assert_array_equal(ds[0]["label"], expected(index["ADE_val_00000001"]))


def test_resizing_is_recorded_and_another_setting_needs_overwrite(release, tmp_path, capsys):
    root, index = release
    out = tmp_path / "ade20k_full"
    argv = ["prepare", "ade20k-full", "--root", str(root), "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    assert json.loads((out / "prepare.json").read_text())["max_short_side"] == 512
    assert main([*argv, "--max-short-side", "0"]) == 2
    assert "--max-short-side 512" in capsys.readouterr().err
    assert main([*argv, "--max-short-side", "0", "--overwrite"]) == 0
    np.testing.assert_array_equal(label(out, "training", "ADE_train_00000001"), expected(index["ADE_train_00000001"]))
    assert main([*argv, "--num-classes", "100"]) == 2
    assert "--classes ranked" in capsys.readouterr().err


def test_ranked_classes_remain_an_option(release, tmp_path):
    root, index = release
    out = tmp_path / "ranked"
    assert main(["prepare", "ade20k-full", "--root", str(root), "--out", str(out), "--classes", "ranked",
                 "--num-classes", "2", "--max-short-side", "0", "--no-progress"]) == 0
    # by brute force: full indices ranked by the number of training images holding them, ties by index
    present = [set(index[n].ravel().tolist()) - {0} for n in ("ADE_train_00000001", "ADE_train_00000002")]
    ranking = sorted(set().union(*present), key=lambda v: (-sum(v in p for p in present), v))
    kept = [int(line.split("\t")[1]) for line in (out / "classes.txt").read_text().splitlines()]
    assert kept == ranking[:2] and kept != list(MASKFORMER_FULL_INDICES[:2])
