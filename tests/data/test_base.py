"""The file-dataset base class: label reading without truncation, and bad input named by file."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from PIL import Image

from scaleseg.data.datasets.base import FileSegmentation, Sample, make_palette, read_label_file
from scaleseg.errors import DataError


class Toy(FileSegmentation):
    """images/<name>.png + labels/<name>.png, 5 classes, ignore 255, labels.txt lists the names."""

    NAME = "toy"
    CLASS_NAMES = ("a", "b", "c", "d", "e")
    LAYOUT = "images/, labels/, <split>.txt"

    def list_samples(self):
        names = (self.root / f"{self.split}.txt").read_text().split()
        return [Sample(n, self.root / "images" / f"{n}.png", self.root / "labels" / f"{n}.png") for n in names]


def _write(root, name, label, image_size=None, mode="L"):
    h, w = label.shape if image_size is None else image_size
    (root / "images").mkdir(exist_ok=True)
    (root / "labels").mkdir(exist_ok=True)
    Image.fromarray(np.full((h, w, 3), 100, np.uint8)).save(root / "images" / f"{name}.png")
    if mode == "I;16":
        Image.fromarray(label.astype(np.uint16)).save(root / "labels" / f"{name}.png")
    else:
        Image.fromarray(label.astype(np.uint8), mode="L").save(root / "labels" / f"{name}.png")


def _split(root, names, split="train"):
    (root / f"{split}.txt").write_text("\n".join(names) + "\n")


def test_read_label_file_keeps_palette_indices_and_16_bit_values(tmp_path):
    indices = np.array([[0, 1, 255], [20, 7, 3]], np.uint8)
    im = Image.fromarray(indices, mode="P")
    im.putpalette([(i * 7) % 256 for i in range(768)])
    im.save(tmp_path / "p.png")
    np.testing.assert_array_equal(read_label_file(tmp_path / "p.png", 8), indices)

    wide = np.array([[0, 300, 1283], [65535, 256, 255]], np.uint16)
    Image.fromarray(wide).save(tmp_path / "w.png")
    got = read_label_file(tmp_path / "w.png", 16)
    np.testing.assert_array_equal(got, wide)  # nothing truncated to 8 bits
    with pytest.raises(DataError, match=r"w\.png.*16-bit.*8-bit"):
        read_label_file(tmp_path / "w.png", 8)


def test_read_label_file_refuses_colour_and_corrupt_files(tmp_path):
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "rgb.png")
    with pytest.raises(DataError, match=r"rgb\.png.*RGB image.*single-channel"):
        read_label_file(tmp_path / "rgb.png", 8)
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(DataError, match=r"bad\.png.*cannot be decoded"):
        read_label_file(tmp_path / "bad.png", 8)
    with pytest.raises(DataError, match=r"none\.png.*does not exist"):
        read_label_file(tmp_path / "none.png", 8)


def test_loads_a_good_sample(tmp_path):
    label = np.array([[0, 1, 2], [3, 4, 255]])
    _write(tmp_path, "x", label)
    _split(tmp_path, ["x"])
    ds = Toy(tmp_path, "train")
    assert (len(ds), ds.num_classes, ds.ignore_index, ds.palette.shape) == (1, 5, 255, (5, 3))
    item = ds[0]
    np.testing.assert_array_equal(item["label"], label)
    assert item["image"].shape == (2, 3, 3) and item["name"] == "x"


def test_value_out_of_range_names_the_file_and_the_values(tmp_path):
    _write(tmp_path, "x", np.array([[0, 5, 9], [1, 255, 5]]))
    _split(tmp_path, ["x"])
    with pytest.raises(DataError, match=r"labels/x\.png.*3 pixels.*5, 9"):
        Toy(tmp_path, "train")[0]


def test_size_mismatch_names_both_files(tmp_path):
    _write(tmp_path, "x", np.zeros((4, 6)), image_size=(4, 5))
    _split(tmp_path, ["x"])
    with pytest.raises(DataError, match=r"images/x\.png.*5x4.*labels/x\.png.*6x4"):
        Toy(tmp_path, "train")[0]


def test_missing_files_stop_or_are_skipped_with_a_count(tmp_path):
    _write(tmp_path, "a", np.zeros((2, 2)))
    _write(tmp_path, "b", np.ones((2, 2)))
    (tmp_path / "labels" / "b.png").unlink()
    _split(tmp_path, ["a", "b", "c"])
    with pytest.raises(DataError, match=r"2 of 3 samples lack a file.*b\.png.*c\.png.*on_bad_sample=skip"):
        Toy(tmp_path, "train")
    with pytest.warns(UserWarning, match=r"2 of 3 samples lack a file and will be skipped"):
        ds = Toy(tmp_path, "train", on_bad_sample="skip")
    assert [s.name for s in ds.samples] == ["a", "b", "c"]  # listed, each skipped when read
    assert ds.load_or_skip(0, substitute=False)[0]["name"] == "a"
    item, skipped = ds.load_or_skip(1, substitute=False)  # evaluation: left out
    assert item is None and skipped == [f"image {str(tmp_path / 'images' / 'b.png')!r} has no label "
                                        f"(expected {str(tmp_path / 'labels' / 'b.png')!r})"]
    item, skipped = ds.load_or_skip(1, substitute=True)  # training: replaced by the next good one (c is bad too)
    assert item["name"] == "a" and len(skipped) == 2


def test_skip_mode_replaces_a_bad_sample_by_the_next_and_counts(tmp_path):
    _write(tmp_path, "a", np.full((2, 2), 1))
    _write(tmp_path, "b", np.full((2, 2), 7))  # out of range
    _write(tmp_path, "c", np.full((2, 2), 2))
    _split(tmp_path, ["a", "b", "c"])
    ds = Toy(tmp_path, "train", on_bad_sample="skip")
    with pytest.warns(UserWarning, match=r"1 skipped so far.*labels/b\.png"):
        item = ds[1]
    assert item["name"] == "c" and ds.skipped == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ds[0]["name"] == "a"  # good samples raise no warning


def test_root_and_empty_split_errors(tmp_path):
    with pytest.raises(DataError, match=r"data.root is not set.*toy"):
        Toy(None, "train")
    with pytest.raises(DataError, match=r"is not a folder"):
        Toy(tmp_path / "nowhere", "train")
    _split(tmp_path, [])
    with pytest.raises(DataError, match=r"split 'train'.*no samples"):
        Toy(tmp_path, "train")


def test_make_palette_gives_distinct_colours():
    palette = make_palette(1000)
    assert palette.shape == (1000, 3) and palette.dtype == np.uint8
    assert len({tuple(c) for c in palette}) > 990
