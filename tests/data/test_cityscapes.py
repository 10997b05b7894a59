"""Cityscapes (fine) loader and `scaleseg prepare cityscapes`, on a tiny tree in the published layout."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from scaleseg.cli import main as cli_main
from scaleseg.config import load_config
from scaleseg.data import build_dataset
from scaleseg.data.datasets.cityscapes import Cityscapes
from scaleseg.errors import DataError

# labelId -> trainId, written out from the Cityscapes documentation (independent of the module's table)
TRAIN_ID = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12,
            26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}

H, W = 6, 10


def label_ids(seed: int) -> np.ndarray:
    """Every labelId 0..33 plus 255, shuffled into a 6x10 map (more than 34 pixels, so some repeat)."""
    rng = np.random.default_rng(seed)
    values = np.concatenate([np.arange(34), [255], rng.integers(0, 34, H * W - 35)])
    return rng.permutation(values).reshape(H, W).astype(np.uint8)


def expected_train_ids(ids: np.ndarray) -> np.ndarray:
    out = np.full(ids.shape, 255, dtype=np.int64)
    for y in range(ids.shape[0]):  # brute force, pixel by pixel
        for x in range(ids.shape[1]):
            out[y, x] = TRAIN_ID.get(int(ids[y, x]), 255)
    return out


def make_cityscapes(root, files=(("train", "aachen", 0), ("train", "aachen", 1), ("train", "bochum", 0), ("val", "lindau", 0))):
    """The published layout: leftImg8bit/<split>/<city>/<city>_<seq>_000019_leftImg8bit.png and
    gtFine/<split>/<city>/..._gtFine_labelIds.png (8-bit grey). Returns {name: labelIds array}."""
    truth = {}
    for k, (split, city, seq) in enumerate(files):
        stem = f"{city}_{seq:06d}_000019"
        (root / "leftImg8bit" / split / city).mkdir(parents=True, exist_ok=True)
        (root / "gtFine" / split / city).mkdir(parents=True, exist_ok=True)
        image = np.random.default_rng(k).integers(0, 256, (H, W, 3), dtype=np.uint8)
        Image.fromarray(image).save(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png")
        ids = label_ids(k)
        Image.fromarray(ids).save(root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png")
        truth[stem] = ids
    return truth


def test_labelids_are_mapped_to_train_ids(tmp_path):
    truth = make_cityscapes(tmp_path)
    ds = Cityscapes(tmp_path, "train")
    assert [s.name for s in ds.samples] == ["aachen_000000_000019", "aachen_000001_000019", "bochum_000000_000019"]
    for i in range(len(ds)):
        item = ds[i]
        assert item["image"].shape == (H, W, 3) and item["image"].dtype == np.uint8
        assert item["label"].dtype == np.int64
        np.testing.assert_array_equal(item["label"], expected_train_ids(truth[item["name"]]))
    # unmapped ids (0 unlabeled, 1 ego vehicle, 255) are ignore; 7 road -> 0, 33 bicycle -> 18
    ids = truth["aachen_000000_000019"]
    label = ds[0]["label"]
    assert (label[np.isin(ids, [0, 1, 2, 3, 4, 5, 6, 9, 10, 14, 15, 16, 18, 29, 30, 255])] == 255).all()
    assert (label[ids == 7] == 0).all() and (label[ids == 33] == 18).all()
    assert len(Cityscapes(tmp_path, "val")) == 1


def test_class_names_and_palette_are_the_official_ones(tmp_path):
    make_cityscapes(tmp_path)
    ds = Cityscapes(tmp_path, "val")
    assert ds.num_classes == 19 and ds.ignore_index == 255
    assert ds.class_names[0] == "road" and ds.class_names[11] == "person" and ds.class_names[18] == "bicycle"
    assert ds.palette.shape == (19, 3) and ds.palette.dtype == np.uint8
    assert tuple(ds.palette[0]) == (128, 64, 128) and tuple(ds.palette[13]) == (0, 0, 142)
    assert tuple(ds.palette[18]) == (119, 11, 32)


def test_prepared_train_ids_file_is_read_as_is(tmp_path):
    make_cityscapes(tmp_path)
    folder = tmp_path / "gtFine" / "train" / "aachen"
    prepared = np.full((H, W), 255, np.uint8)
    prepared[:, :5] = 3
    prepared[0, 0] = 18
    Image.fromarray(prepared).save(folder / "aachen_000000_000019_gtFine_labelTrainIds.png")
    ds = Cityscapes(tmp_path, "train")
    assert ds.samples[0].label.name.endswith("_gtFine_labelTrainIds.png")
    np.testing.assert_array_equal(ds[0]["label"], prepared)
    assert ds.samples[1].label.name.endswith("_gtFine_labelIds.png")


def test_prepare_writes_train_ids_equal_to_direct_decoding_and_skips_on_rerun(tmp_path, capsys):
    truth = make_cityscapes(tmp_path)
    direct = {s: item["label"] for ds in (Cityscapes(tmp_path, "train"), Cityscapes(tmp_path, "val"))
              for s, item in ((d["name"], d) for d in ds)}

    assert cli_main(["prepare", "cityscapes", "--root", str(tmp_path), "--no-progress"]) == 0
    assert "4 trainId label maps written, 0 already present" in capsys.readouterr().out
    outputs = sorted(tmp_path.glob("gtFine/*/*/*_gtFine_labelTrainIds.png"))
    assert len(outputs) == 4
    for path in outputs:
        with Image.open(path) as im:
            assert im.mode == "L" and im.size == (W, H)
            stored = np.array(im)
        np.testing.assert_array_equal(stored, expected_train_ids(truth[path.name[: -len("_gtFine_labelTrainIds.png")]]))
    assert not list(tmp_path.glob("gtFine/**/*.tmp"))  # no temporary files left behind

    # the loader now reads the prepared files and gets the same labels
    for split in ("train", "val"):
        ds = Cityscapes(tmp_path, split)
        for item in ds:
            np.testing.assert_array_equal(item["label"], direct[item["name"]])
        assert all(s.label.name.endswith("labelTrainIds.png") for s in ds.samples)

    # a second run skips every file and rewrites nothing
    mtimes = [p.stat().st_mtime_ns for p in outputs]
    assert cli_main(["prepare", "cityscapes", "--root", str(tmp_path), "--no-progress"]) == 0
    assert "0 trainId label maps written, 4 already present" in capsys.readouterr().out
    assert [p.stat().st_mtime_ns for p in outputs] == mtimes

    # a damaged output (e.g. from another tool) is rewritten; only that one; a killed run's temporary file goes
    outputs[0].write_bytes(b"not a png")
    stale = outputs[1].with_name(f".{outputs[1].name}.4242.tmp")
    stale.write_bytes(b"")
    assert cli_main(["prepare", "cityscapes", "--root", str(tmp_path), "--splits", "train", "--no-progress"]) == 0
    assert "1 trainId label maps written, 2 already present" in capsys.readouterr().out
    with Image.open(outputs[0]) as im:
        assert im.mode == "L"
    assert not stale.exists()


def test_prepare_reports_missing_split_folder(tmp_path, capsys):
    make_cityscapes(tmp_path, files=(("train", "aachen", 0),))
    assert cli_main(["prepare", "cityscapes", "--root", str(tmp_path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "gtFine" / "val") in err and "does not exist" in err


def test_missing_image_is_reported_or_skipped(tmp_path):
    make_cityscapes(tmp_path)
    missing = tmp_path / "leftImg8bit" / "train" / "bochum" / "bochum_000000_000019_leftImg8bit.png"
    missing.unlink()
    with pytest.raises(DataError, match="bochum_000000_000019_leftImg8bit.png"):
        Cityscapes(tmp_path, "train")
    with pytest.warns(UserWarning, match="1 of 3 samples lack a file and will be skipped"):
        ds = Cityscapes(tmp_path, "train", on_bad_sample="skip")
    assert len(ds) == 3 and ds.load_or_skip(2, substitute=False)[0] is None


def test_missing_label_is_reported(tmp_path):
    make_cityscapes(tmp_path)
    (tmp_path / "gtFine" / "train" / "aachen" / "aachen_000001_000019_gtFine_labelIds.png").unlink()
    with pytest.raises(DataError, match="aachen_000001_000019_gtFine_labelIds.png"):
        Cityscapes(tmp_path, "train")


def test_bad_label_files_raise_data_errors_naming_them(tmp_path):
    make_cityscapes(tmp_path)
    folder = tmp_path / "gtFine" / "train" / "aachen"
    rgb = folder / "aachen_000000_000019_gtFine_labelIds.png"
    Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(rgb)  # a colour visualisation, not ids
    sixteen = folder / "aachen_000001_000019_gtFine_labelIds.png"
    Image.fromarray(np.full((H, W), 300, np.uint16)).save(sixteen)
    small = tmp_path / "gtFine" / "train" / "bochum" / "bochum_000000_000019_gtFine_labelIds.png"
    Image.fromarray(np.zeros((H - 1, W), np.uint8)).save(small)
    ds = Cityscapes(tmp_path, "train")
    with pytest.raises(DataError, match="RGB image") as info:
        ds[0]
    assert str(rgb) in str(info.value)
    with pytest.raises(DataError, match="16-bit") as info:
        ds[1]
    assert str(sixteen) in str(info.value)
    with pytest.raises(DataError, match="same size") as info:
        ds[2]
    assert str(small) in str(info.value)


def test_corrupt_image_is_reported(tmp_path):
    make_cityscapes(tmp_path)
    image = tmp_path / "leftImg8bit" / "val" / "lindau" / "lindau_000000_000019_leftImg8bit.png"
    image.write_bytes(b"\x89PNG truncated")
    with pytest.raises(DataError, match="cannot be decoded") as info:
        Cityscapes(tmp_path, "val")[0]
    assert str(image) in str(info.value)


def test_bad_roots_and_splits(tmp_path):
    with pytest.raises(DataError, match="leftImg8bit"):
        Cityscapes(tmp_path, "train")
    make_cityscapes(tmp_path)
    with pytest.raises(DataError, match="no public labels"):
        Cityscapes(tmp_path, "test")
    with pytest.raises(DataError, match="is not a folder"):
        Cityscapes(tmp_path / "nowhere", "train")


def test_build_dataset_from_config(tmp_path):
    make_cityscapes(tmp_path)
    cfg = load_config(None, ["data.dataset=cityscapes", f"data.root={tmp_path}", "data.num_classes=19"])
    train, val = build_dataset(cfg.data, "train"), build_dataset(cfg.data, "val")
    assert isinstance(train, Cityscapes) and (len(train), len(val)) == (3, 1)
    assert train[0]["label"].shape == (H, W)
