"""COCO-Stuff 164k (stuffthingmaps PNGs) and 10k (v1.1 .mat files) against hand-built expectations."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from scipy.io import savemat

from scaleseg.config import DataConfig
from scaleseg.data import build_dataset
from scaleseg.data.datasets.cocostuff import COCOStuff10k, COCOStuff164k
from scaleseg.errors import ConfigError, DataError

# The 11 COCO thing ids without annotations, written out independently of the module under test.
UNUSED = {12, 26, 29, 30, 45, 66, 68, 69, 71, 83, 91}


def class_171(coco_id: int) -> int:
    """Reference: the 171-class id of a COCO-Stuff id by counting the used ids below it."""
    assert coco_id not in UNUSED
    return sum(1 for i in range(1, coco_id) if i not in UNUSED)


def _jpg(path, h, w):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((h, w, 3), 90, np.uint8)).save(path, format="JPEG")


# ---------------------------------------------------------------- 164k
def _write_164k(root, split, name, raw, image_size=None):
    h, w = raw.shape if image_size is None else image_size
    _jpg(root / "images" / split / f"{name}.jpg", h, w)
    (root / "annotations" / split).mkdir(parents=True, exist_ok=True)
    Image.fromarray(raw.astype(np.uint8), mode="L").save(root / "annotations" / split / f"{name}.png")


def test_164k_class_names_and_order():
    names = COCOStuff164k.CLASS_NAMES
    assert len(names) == 171 and len(set(names)) == 171
    assert names[:3] == ("person", "bicycle", "car") and names[79] == "toothbrush"
    assert names[80] == "banner" and names[170] == "wood"
    assert "street sign" not in names and "hair brush" not in names and "desk-stuff" in names


def test_164k_labels_map_ids_to_171_classes(tmp_path):
    # file value = COCO-Stuff id - 1; 255 unlabeled
    raw = np.array([
        [0, 11, 12, 255],     # person (id 1); street sign (id 12, unused); stop sign (id 13); unlabeled
        [90, 91, 92, 181],    # hair brush (id 91, unused); banner (92); blanket (93); wood (182)
        [25, 65, 66, 108],    # hat (26, unused); mirror (66, unused); dining table (67); curtain (109)
    ])
    expected = np.array([
        [0, 255, 11, 255],
        [255, 80, 81, 170],
        [255, 255, 60, class_171(109)],
    ])
    assert class_171(13) == 11 and class_171(92) == 80 and class_171(67) == 60 and class_171(109) == 97
    _write_164k(tmp_path, "val2017", "000000000139", raw)
    _write_164k(tmp_path, "val2017", "000000000285", np.zeros((3, 4), np.uint8))
    ds = COCOStuff164k(tmp_path, "val")
    assert (len(ds), ds.num_classes, ds.ignore_index, ds.split) == (2, 171, 255, "val2017")
    item = ds[0]
    assert item["name"] == "000000000139" and item["image"].shape == (3, 4, 3)
    np.testing.assert_array_equal(item["label"], expected)
    np.testing.assert_array_equal(ds[1]["label"], np.zeros((3, 4)))  # all person


def test_164k_from_config_and_bad_files(tmp_path):
    raw = np.array([[0, 1], [2, 200]])  # 200: no COCO-Stuff id
    _write_164k(tmp_path, "train2017", "a", raw)
    ds = build_dataset(DataConfig(dataset="cocostuff164k", root=str(tmp_path), num_classes=171), "train")
    with pytest.raises(DataError, match=r"a\.png.*1 pixels.*no COCO-Stuff id.*200"):
        ds[0]
    # a 16-bit label in this 8-bit dataset
    Image.fromarray(np.zeros((2, 2), np.uint16) + 300).save(tmp_path / "annotations" / "train2017" / "a.png")
    with pytest.raises(DataError, match=r"a\.png.*16-bit"):
        ds[0]
    # size mismatch
    _write_164k(tmp_path, "train2017", "a", np.zeros((2, 2)), image_size=(3, 2))
    with pytest.raises(DataError, match=r"a\.jpg.*2x3.*a\.png.*2x2"):
        ds[0]
    # an image without its annotation
    _jpg(tmp_path / "images" / "train2017" / "b.jpg", 2, 2)
    with pytest.raises(DataError, match=r"1 of 2 samples lack a file.*b\.jpg.* has no label .*b\.png"):
        COCOStuff164k(tmp_path, "train")
    with pytest.raises(DataError, match=r"images/val2017.*does not exist"):
        COCOStuff164k(tmp_path, "val")


# ---------------------------------------------------------------- 10k
def _write_10k(root, name, s, image_size=None, key="S"):
    h, w = s.shape if image_size is None else image_size
    _jpg(root / "images" / f"{name}.jpg", h, w)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    names = np.array(["unlabeled", "person", "bicycle"], dtype=object)
    savemat(root / "annotations" / f"{name}.mat", {key: s, "names": names})


def _lists(root, train, test):
    (root / "imageLists").mkdir(parents=True, exist_ok=True)
    (root / "imageLists" / "train.txt").write_text("".join(n + "\n" for n in train))
    (root / "imageLists" / "test.txt").write_text("".join(n + "\n" for n in test))


S = np.array([
    [0, 1, 12, 13],
    [91, 92, 110, 182],
], dtype=np.uint16)  # unlabeled, person, street sign (unused), stop sign; hair brush (unused), banner, desk-stuff, wood


def test_10k_182_class_setting_is_id_minus_one(tmp_path):
    _write_10k(tmp_path, "COCO_train2014_000000000077", S)
    _write_10k(tmp_path, "COCO_train2014_000000000078", S.astype(np.uint8))  # uint8 S as well
    _write_10k(tmp_path, "COCO_val2014_000000000139", S)
    _lists(tmp_path, ["COCO_train2014_000000000077", "COCO_train2014_000000000078"], ["COCO_val2014_000000000139"])
    ds = build_dataset(DataConfig(dataset="cocostuff10k", root=str(tmp_path), num_classes=182), "train")
    assert isinstance(ds, COCOStuff10k) and (len(ds), ds.num_classes, ds.ignore_index) == (2, 182, 255)
    assert ds.class_names[11] == "street sign" and ds.class_names[109] == "desk-stuff" and ds.class_names[181] == "wood"
    expected = np.array([[255, 0, 11, 12], [90, 91, 109, 181]])
    np.testing.assert_array_equal(ds[0]["label"], expected)
    np.testing.assert_array_equal(ds[1]["label"], expected)
    val = build_dataset(DataConfig(dataset="cocostuff10k", root=str(tmp_path), num_classes=182), "val")
    assert val.split == "test" and val[0]["name"] == "COCO_val2014_000000000139"


def test_10k_171_class_setting_drops_unused_ids(tmp_path):
    _write_10k(tmp_path, "x", S)
    _lists(tmp_path, ["x"], ["x"])
    ds = COCOStuff10k.from_config(DataConfig(dataset="cocostuff10k", root=str(tmp_path), num_classes=171), "train")
    assert ds.num_classes == 171 and ds.class_names == list(COCOStuff164k.CLASS_NAMES)
    expected = np.array([[255, 0, 255, 11], [255, 80, class_171(110), 170]])
    assert class_171(110) == 98
    np.testing.assert_array_equal(ds[0]["label"], expected)


def test_10k_other_class_counts_are_a_config_error(tmp_path):
    _write_10k(tmp_path, "x", S)
    _lists(tmp_path, ["x"], ["x"])
    with pytest.raises(ConfigError, match=r"data\.num_classes = 150.*182.*171"):
        build_dataset(DataConfig(dataset="cocostuff10k", root=str(tmp_path), num_classes=150), "train")


def test_10k_bad_files(tmp_path):
    _lists(tmp_path, ["a", "b", "c", "d"], ["e"])
    _write_10k(tmp_path, "a", np.array([[0, 183], [1, 2]], np.uint16))  # 183 is no id in the 10k maps
    _write_10k(tmp_path, "b", np.array([[0, 1]], np.uint16), key="L")  # no S
    _jpg(tmp_path / "images" / "c.jpg", 2, 2)
    (tmp_path / "annotations" / "c.mat").write_bytes(b"MATLAB 5.0 MAT-file, corrupt")
    _write_10k(tmp_path, "d", np.ones((2, 3), np.uint16), image_size=(2, 2))
    ds = COCOStuff10k(tmp_path, "train", num_classes=182)
    with pytest.raises(DataError, match=r"a\.mat.*1 pixels.*no COCO-Stuff id.*183"):
        ds[0]
    with pytest.raises(DataError, match=r"b\.mat.*no variable 'S'"):
        ds[1]
    with pytest.raises(DataError, match=r"c\.mat.*cannot be read"):
        ds[2]
    with pytest.raises(DataError, match=r"d\.jpg.*2x2.*d\.mat.*3x2"):
        ds[3]
    with pytest.raises(DataError, match=r"1 of 1 samples lack a file.*neither .*e\.jpg.* nor .*e\.mat.* exists"):
        COCOStuff10k(tmp_path, "val")
    (tmp_path / "imageLists" / "test.txt").unlink()
    with pytest.raises(DataError, match=r"split list.*test\.txt.*does not exist"):
        COCOStuff10k(tmp_path, "val")
