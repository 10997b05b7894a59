"""The `folder` dataset (users' own data): pairing, class lists, palettes, 8/16-bit labels."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from scaleseg.config import load_config
from scaleseg.data import build_dataset
from scaleseg.data.datasets.folder import FolderSegmentation
from scaleseg.errors import DataError

H, W = 5, 7


def write_classes(root, n):
    (root / "classes.txt").write_text("".join(f"class {i}\n" for i in range(n)))


def write_image(path, seed, size=(H, W), fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)).save(path, format=fmt)


def write_label(path, label):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(label).save(path)  # uint8 -> 8-bit L, uint16 -> 16-bit I;16


def make_small(root):
    """3 classes: images/train/{a/x.jpg, b.png}, labels/train/{a/x.png, b.tif}, images/val/c.bmp."""
    write_classes(root, 3)
    labels = {
        "a/x": np.array([[0, 1, 2, 255, 0, 1, 2]] * H, np.uint8),
        "b": np.eye(H, W, dtype=np.uint8) * 2,
        "c": np.full((H, W), 1, np.uint8),
    }
    write_image(root / "images/train/a/x.jpg", 0)
    write_label(root / "labels/train/a/x.png", labels["a/x"])
    write_image(root / "images/train/b.png", 1)
    write_label(root / "labels/train/b.tif", labels["b"])
    write_image(root / "images/val/c.bmp", 2)
    write_label(root / "labels/val/c.png", labels["c"])
    return labels


def test_pairs_images_and_labels_by_relative_path_and_stem(tmp_path):
    labels = make_small(tmp_path)
    ds = FolderSegmentation(tmp_path, "train")
    assert ds.class_names == ["class 0", "class 1", "class 2"] and ds.num_classes == 3
    assert ds.ignore_index == 255 and ds.LABEL_BITS == 8
    assert [s.name for s in ds.samples] == ["a/x", "b"]
    assert ds.samples[0].image.name == "x.jpg" and ds.samples[1].label.name == "b.tif"
    for item in ds:
        assert item["image"].shape == (H, W, 3)
        np.testing.assert_array_equal(item["label"], labels[item["name"]])
    val = FolderSegmentation(tmp_path, "val")
    assert [item["name"] for item in val] == ["c"]
    assert val.palette.shape == (3, 3) and val.palette.dtype == np.uint8


def test_palette_file_gives_the_colours(tmp_path):
    make_small(tmp_path)
    (tmp_path / "palette.txt").write_text("0 0 0\n255, 0, 0\n  10 20 30  \n\n")
    ds = FolderSegmentation(tmp_path, "train")
    np.testing.assert_array_equal(ds.palette, [[0, 0, 0], [255, 0, 0], [10, 20, 30]])
    (tmp_path / "palette.txt").write_text("0 0 0\n255 0\n1 2 3\n")
    with pytest.raises(DataError, match="line 2"):
        FolderSegmentation(tmp_path, "train")
    (tmp_path / "palette.txt").write_text("0 0 0\n1 2 3\n")
    with pytest.raises(DataError, match="2 colours but classes.txt names 3"):
        FolderSegmentation(tmp_path, "train")


def test_more_than_255_classes_read_16_bit_labels_without_truncation(tmp_path):
    write_classes(tmp_path, 300)
    label = np.array([[0, 255, 256, 299, 65535, 211, 280]] * H, np.uint16)
    write_image(tmp_path / "images/train/big.jpg", 0)
    write_label(tmp_path / "labels/train/big.png", label)
    write_image(tmp_path / "images/train/tiff.png", 1)
    write_label(tmp_path / "labels/train/tiff.tif", label[::-1, ::-1].copy())
    small = np.array([[0, 1, 254, 255, 2, 3, 4]] * H, np.uint8)  # an 8-bit label in a 16-bit dataset
    write_image(tmp_path / "images/train/small.jpg", 2)
    write_label(tmp_path / "labels/train/small.png", small)
    ds = FolderSegmentation(tmp_path, "train")
    assert ds.num_classes == 300 and ds.ignore_index == 65535 and ds.LABEL_BITS == 16
    with Image.open(tmp_path / "labels/train/big.png") as im:
        assert im.mode.startswith("I")  # really a 16-bit file
    got = {item["name"]: item["label"] for item in ds}
    np.testing.assert_array_equal(got["big"], label.astype(np.int64))
    assert got["big"][0, 2] == 256 and got["big"][0, 3] == 299 and got["big"][0, 4] == 65535
    np.testing.assert_array_equal(got["tiff"], label[::-1, ::-1].astype(np.int64))
    np.testing.assert_array_equal(got["small"], small)  # 255 is class 255 here, not ignore
    # an id beyond the class list is still an error
    write_label(tmp_path / "labels/train/big.png", np.full((H, W), 300, np.uint16))
    with pytest.raises(DataError, match="300"):
        ds[0]


def test_sixteen_bit_label_in_an_8_bit_dataset_is_an_error(tmp_path):
    make_small(tmp_path)
    path = tmp_path / "labels/train/a/x.png"
    write_label(path, np.full((H, W), 2, np.uint16))
    with pytest.raises(DataError, match="16-bit") as info:
        FolderSegmentation(tmp_path, "train")[0]
    assert str(path) in str(info.value)


def test_unpaired_files_are_listed_or_skipped(tmp_path):
    make_small(tmp_path)
    write_image(tmp_path / "images/train/lonely.jpg", 3)
    write_label(tmp_path / "labels/train/sub/orphan.png", np.zeros((H, W), np.uint8))
    with pytest.raises(DataError) as info:
        FolderSegmentation(tmp_path, "train")
    message = str(info.value)
    assert "2 of 4 samples lack a file" in message
    assert f"image {str(tmp_path / 'images/train/lonely.jpg')!r} has no label (expected labels/train/lonely.png or .tif" in message
    assert f"label {str(tmp_path / 'labels/train/sub/orphan.png')!r} has no image (expected images/train/sub/orphan." in message
    with pytest.warns(UserWarning, match="2 of 4 samples lack a file and will be skipped"):
        ds = FolderSegmentation(tmp_path, "train", on_bad_sample="skip")
    assert [s.name for s in ds.samples] == ["a/x", "b", "lonely", "sub/orphan"]
    assert [ds.load_or_skip(i, substitute=False)[0] is None for i in range(4)] == [False, False, True, True]


def test_bad_inputs_raise_data_errors_naming_the_file(tmp_path):
    make_small(tmp_path)
    ds = FolderSegmentation(tmp_path, "train")
    rgb = tmp_path / "labels/train/a/x.png"
    Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(rgb)
    with pytest.raises(DataError, match="RGB image") as info:
        ds[0]
    assert str(rgb) in str(info.value)
    other = tmp_path / "labels/train/b.tif"
    write_label(other, np.zeros((H + 1, W), np.uint8))
    with pytest.raises(DataError, match="same size") as info:
        ds[1]
    assert str(other) in str(info.value)
    write_label(other, np.full((H, W), 3, np.uint8))  # class 3 of a 3-class set
    with pytest.raises(DataError, match="neither a class") as info:
        ds[1]
    assert str(other) in str(info.value)
    broken = tmp_path / "images/train/b.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with pytest.raises(DataError, match="cannot be decoded") as info:
        ds[1]
    assert str(broken) in str(info.value)


def test_two_images_with_one_stem_are_ambiguous(tmp_path):
    make_small(tmp_path)
    write_image(tmp_path / "images/train/b.jpg", 5)
    with pytest.raises(DataError, match="same name"):
        FolderSegmentation(tmp_path, "train")


def test_class_list_problems(tmp_path):
    make_small(tmp_path)
    (tmp_path / "classes.txt").write_text("sky\n\nroad\n")
    with pytest.raises(DataError, match="blank lines"):
        FolderSegmentation(tmp_path, "train")
    (tmp_path / "classes.txt").write_text("\n")
    with pytest.raises(DataError, match="empty"):
        FolderSegmentation(tmp_path, "train")
    (tmp_path / "classes.txt").unlink()
    with pytest.raises(DataError, match="classes.txt"):
        FolderSegmentation(tmp_path, "train")
    write_classes(tmp_path, 3)
    with pytest.raises(DataError, match="images/test"):
        FolderSegmentation(tmp_path, "test")


def test_build_dataset_from_config(tmp_path):
    make_small(tmp_path)
    cfg = load_config(None, ["data.dataset=folder", f"data.root={tmp_path}", "data.num_classes=3"])
    train, val = build_dataset(cfg.data, "train"), build_dataset(cfg.data, "val")
    assert isinstance(train, FolderSegmentation) and (len(train), len(val)) == (2, 1)
