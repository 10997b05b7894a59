"""Pascal VOC 2012 and VOC + SBD "trainaug" loaders and `scaleseg prepare voc-aug`, on tiny trees in
the published formats (JPEGs, palette PNGs with 255 borders, SBD GTcls .mat files)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.io
from PIL import Image

from scaleseg.cli import main as cli_main
from scaleseg.config import load_config
from scaleseg.data import build_dataset
from scaleseg.data.datasets.voc import PascalVOC, PascalVOCAug, voc_colormap
from scaleseg.errors import DataError

H, W = 8, 12


def voc_palette() -> list[int]:
    """The VOC colour map, built the documented way with plain Python loops (an independent reference)."""
    flat = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        flat += [r, g, b]
    return flat


def voc_mask(seed: int) -> np.ndarray:
    """A VOC-style mask: background, two object classes, a 255 border around the objects."""
    rng = np.random.default_rng(seed)
    mask = np.zeros((H, W), np.uint8)
    a, b = rng.choice(np.arange(1, 21), 2, replace=False)
    mask[1:5, 1:6] = 255
    mask[2:4, 2:5] = a
    mask[5:8, 7:12] = 255
    mask[6:8, 8:12] = b
    return mask


def save_palette_png(path, mask, palette=None):
    im = Image.fromarray(mask)
    im.putpalette(voc_palette() if palette is None else palette)
    assert im.mode == "P"
    im.save(path)


def save_jpeg(path, seed, size=(H, W)):
    image = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    Image.fromarray(image).save(path, quality=95)


def make_voc(root, train=("2007_000032", "2007_000039"), val=("2007_000033", "2008_000001")):
    """root/VOCdevkit/VOC2012 as extracted from VOCtrainval_11-May-2012.tar. Returns (voc dir, {id: mask})."""
    voc = root / "VOCdevkit" / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (voc / sub).mkdir(parents=True, exist_ok=True)
    masks = {}
    for k, i in enumerate(sorted(train + val)):
        save_jpeg(voc / "JPEGImages" / f"{i}.jpg", k)
        masks[i] = voc_mask(k)
        save_palette_png(voc / "SegmentationClass" / f"{i}.png", masks[i])
    (voc / "ImageSets/Segmentation/train.txt").write_text("".join(f"{i}\n" for i in train))
    (voc / "ImageSets/Segmentation/val.txt").write_text("".join(f"{i}\n" for i in val))
    (voc / "ImageSets/Segmentation/trainval.txt").write_text("".join(f"{i}\n" for i in sorted(train + val)))
    return voc, masks


def save_sbd_mat(path, seg):
    """An SBD dataset/cls/<id>.mat: a GTcls struct with Boundaries, Segmentation, CategoriesPresent."""
    present = np.unique(seg[seg > 0]).astype(np.uint8).reshape(-1, 1)
    boundaries = np.empty((20, 1), dtype=object)
    for c in range(20):
        boundaries[c, 0] = np.zeros((0, 0))
    scipy.io.savemat(path, {"GTcls": {"Boundaries": boundaries, "Segmentation": seg, "CategoriesPresent": present}})


def make_sbd(root, train, val, extra_images_in=None):
    """benchmark_RELEASE/dataset/{cls/<id>.mat, train.txt, val.txt}; JPEGs of the SBD-only ids go into
    VOC's JPEGImages (SBD images are VOC images). Returns {id: SBD mask}."""
    dataset = root / "benchmark_RELEASE" / "dataset"
    (dataset / "cls").mkdir(parents=True)
    masks = {}
    for k, i in enumerate(sorted(set(train) | set(val))):
        rng = np.random.default_rng(100 + k)
        seg = np.zeros((H, W), np.uint8)
        seg[rng.integers(0, H):, rng.integers(0, W):] = rng.integers(1, 21)
        seg[0, 0] = 20
        masks[i] = seg
        save_sbd_mat(dataset / "cls" / f"{i}.mat", seg)
        if extra_images_in is not None and not (extra_images_in / f"{i}.jpg").exists():
            save_jpeg(extra_images_in / f"{i}.jpg", 100 + k)
    (dataset / "train.txt").write_text("".join(f"{i}\n" for i in train))
    (dataset / "val.txt").write_text("".join(f"{i}\n" for i in val))
    return root / "benchmark_RELEASE", masks


def test_voc_colormap_matches_hand_values():
    cmap = voc_colormap(256)
    assert cmap.shape == (256, 3) and cmap.dtype == np.uint8
    assert tuple(cmap[0]) == (0, 0, 0) and tuple(cmap[1]) == (128, 0, 0) and tuple(cmap[2]) == (0, 128, 0)
    assert tuple(cmap[3]) == (128, 128, 0) and tuple(cmap[15]) == (192, 128, 128)  # person
    assert tuple(cmap[255]) == (224, 224, 192)  # border
    assert cmap.reshape(-1).tolist() == voc_palette()


def test_voc_reads_palette_indices_with_borders(tmp_path):
    _, masks = make_voc(tmp_path)
    ds = PascalVOC(tmp_path, "train")
    assert ds.num_classes == 21 and ds.ignore_index == 255
    assert ds.class_names[0] == "background" and ds.class_names[15] == "person" and ds.class_names[20] == "tvmonitor"
    assert ds.palette.shape == (21, 3) and tuple(ds.palette[1]) == (128, 0, 0)
    assert [s.name for s in ds.samples] == ["2007_000032", "2007_000039"]
    for item in ds:
        assert item["image"].shape == (H, W, 3) and item["image"].dtype == np.uint8
        np.testing.assert_array_equal(item["label"], masks[item["name"]].astype(np.int64))
        assert (item["label"] == 255).any() and (item["label"] == 0).any()
    assert len(PascalVOC(tmp_path, "val")) == 2 and len(PascalVOC(tmp_path, "trainval")) == 4


def test_voc_reads_indices_not_colours(tmp_path):
    voc, _ = make_voc(tmp_path, train=("a",), val=("b",))
    mask = np.tile(np.array([0, 1, 2, 255, 3, 4, 5, 6, 7, 8, 19, 20], np.uint8), (H, 1))  # (H, W)
    scrambled = list(np.random.default_rng(0).integers(0, 256, 768))  # colours unrelated to the ids
    save_palette_png(voc / "SegmentationClass" / "a.png", mask, palette=[int(v) for v in scrambled])
    np.testing.assert_array_equal(PascalVOC(tmp_path, "train")[0]["label"], mask)


@pytest.mark.parametrize("where", [".", "VOCdevkit", "VOCdevkit/VOC2012"])
def test_voc_root_may_be_the_parent_the_devkit_or_voc2012(tmp_path, where):
    make_voc(tmp_path)
    ds = PascalVOC(tmp_path / where, "val")
    assert [s.name for s in ds.samples] == ["2007_000033", "2008_000001"]
    assert ds.samples[0].image == tmp_path / "VOCdevkit" / "VOC2012" / "JPEGImages" / "2007_000033.jpg"


def test_voc_bad_inputs_raise_data_errors_naming_the_file(tmp_path):
    voc, _ = make_voc(tmp_path)
    # a split file listing an id that has no image or label
    (voc / "ImageSets/Segmentation/train.txt").write_text("2007_000032\n2009_999999\n")
    with pytest.raises(DataError, match="2009_999999.jpg"):
        PascalVOC(tmp_path, "train")
    with pytest.warns(UserWarning, match="1 of 2 samples lack a file and will be skipped"):
        assert len(PascalVOC(tmp_path, "train", on_bad_sample="skip")) == 2
    # a missing split file
    with pytest.raises(DataError, match="train_missing.txt"):
        PascalVOC(tmp_path, "train_missing")
    # an RGB rendering as a label
    (voc / "ImageSets/Segmentation/train.txt").write_text("2007_000032\n2007_000039\n")
    rgb = voc / "SegmentationClass" / "2007_000032.png"
    Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(rgb)
    ds = PascalVOC(tmp_path, "train")
    with pytest.raises(DataError, match="RGB image") as info:
        ds[0]
    assert str(rgb) in str(info.value)
    # a label of another size
    other = voc / "SegmentationClass" / "2007_000039.png"
    save_palette_png(other, np.zeros((H, W + 1), np.uint8))
    with pytest.raises(DataError, match="same size") as info:
        ds[1]
    assert str(other) in str(info.value)
    # a value that is neither a class nor ignore
    bad = voc_mask(0)
    bad[0, 0] = 21
    save_palette_png(other, bad)
    with pytest.raises(DataError, match="21") as info:
        ds[1]
    assert str(other) in str(info.value)
    # a corrupt JPEG
    jpeg = voc / "JPEGImages" / "2007_000033.jpg"
    jpeg.write_bytes(b"\xff\xd8\xff garbage")
    with pytest.raises(DataError, match="cannot be decoded") as info:
        PascalVOC(tmp_path, "val")[0]
    assert str(jpeg) in str(info.value)


def test_voc_without_devkit_says_what_layout_is_expected(tmp_path):
    with pytest.raises(DataError, match="VOCdevkit"):
        PascalVOC(tmp_path, "train")


# ---------------------------------------------------------------------------------- trainaug

VOC_TRAIN = ("2007_000032", "2007_000039")
VOC_VAL = ("2007_000033", "2008_000001")
SBD_TRAIN = ("2007_000039", "2008_000002", "2007_000033")  # 2007_000039: also VOC train; 2007_000033: VOC val
SBD_VAL = ("2008_000003", "2007_000032", "2008_000002")  # duplicates across SBD lists are merged
TRAINAUG = ["2007_000032", "2007_000039", "2008_000002", "2008_000003"]


def make_voc_and_sbd(tmp_path):
    voc, voc_masks = make_voc(tmp_path, train=VOC_TRAIN, val=VOC_VAL)
    sbd, sbd_masks = make_sbd(tmp_path, SBD_TRAIN, SBD_VAL, extra_images_in=voc / "JPEGImages")
    return voc, sbd, voc_masks, sbd_masks


def prepare(voc, sbd, *extra):
    return cli_main(["prepare", "voc-aug", "--voc", str(voc), "--sbd", str(sbd), "--no-progress", *extra])


def test_voc_aug_before_prepare_says_to_run_the_converter(tmp_path):
    make_voc_and_sbd(tmp_path)
    with pytest.raises(DataError, match="scaleseg prepare voc-aug"):
        PascalVOCAug(tmp_path, "train")
    assert len(PascalVOCAug(tmp_path, "val")) == 2  # VOC val needs no conversion


def test_prepare_voc_aug_builds_trainaug_and_resumes(tmp_path, capsys):
    voc, sbd, voc_masks, sbd_masks = make_voc_and_sbd(tmp_path)
    assert prepare(voc, sbd) == 0
    out = capsys.readouterr().out
    assert "trainaug has 4 images (2 VOC masks, 2 SBD masks); 4 masks written, 0 already present" in out
    assert (voc / "ImageSets/Segmentation/trainaug.txt").read_text() == "".join(f"{i}\n" for i in TRAINAUG)

    aug = voc / "SegmentationClassAug"
    assert sorted(p.stem for p in aug.iterdir()) == TRAINAUG  # no temporary files left
    for i in TRAINAUG:
        with Image.open(aug / f"{i}.png") as im:
            assert im.mode == "P" and im.getpalette()[: 3 * 256] == voc_palette()
            stored = np.array(im)
        # VOC masks take priority (2007_000039 is in both); SBD values are kept as they are
        expected = voc_masks[i] if i in VOC_TRAIN else sbd_masks[i]
        np.testing.assert_array_equal(stored, expected)
    assert not np.array_equal(voc_masks["2007_000039"], sbd_masks["2007_000039"])

    # the loader reads them; VOC ids equal the plain VOC loader's labels, SBD ids the .mat masks
    ds = PascalVOCAug(tmp_path, "train")
    assert ds.split == "trainaug" and [s.name for s in ds.samples] == TRAINAUG
    plain = {item["name"]: item["label"] for item in PascalVOC(tmp_path, "train")}
    for item in ds:
        expected = plain[item["name"]] if item["name"] in plain else sbd_masks[item["name"]]
        np.testing.assert_array_equal(item["label"], expected)
    val = PascalVOCAug(tmp_path, "val")
    assert [s.name for s in val.samples] == list(VOC_VAL)
    assert all(s.label.parent.name == "SegmentationClass" for s in val.samples)

    # second run: nothing rewritten
    mtimes = {p.name: p.stat().st_mtime_ns for p in aug.iterdir()}
    list_mtime = (voc / "ImageSets/Segmentation/trainaug.txt").stat().st_mtime_ns
    assert prepare(voc, sbd) == 0
    assert "0 masks written, 4 already present" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in aug.iterdir()} == mtimes
    assert (voc / "ImageSets/Segmentation/trainaug.txt").stat().st_mtime_ns == list_mtime

    # an interrupted run (a mask and the list missing, a write killed half-way) is completed; --sbd may also name dataset/
    (aug / "2008_000003.png").unlink()
    (aug / ".2008_000003.png.4242.tmp").write_bytes(b"")
    (voc / "ImageSets/Segmentation/trainaug.txt").unlink()
    assert prepare(tmp_path, sbd / "dataset") == 0
    assert "1 masks written, 3 already present" in capsys.readouterr().out
    assert len(PascalVOCAug(tmp_path, "train")) == 4
    assert sorted(p.stem for p in aug.iterdir()) == TRAINAUG


def test_voc_aug_missing_masks_point_to_the_converter(tmp_path, capsys):
    voc, sbd, _, _ = make_voc_and_sbd(tmp_path)
    assert prepare(voc, sbd) == 0
    (voc / "SegmentationClassAug" / "2008_000002.png").unlink()
    with pytest.raises(DataError, match="2008_000002.png.*run it again"):
        PascalVOCAug(tmp_path, "train")


def test_prepare_voc_aug_reports_bad_sbd_files(tmp_path, capsys):
    voc, sbd, _, _ = make_voc_and_sbd(tmp_path)
    cls = sbd / "dataset" / "cls"
    # a .mat without GTcls (e.g. an instance mask file)
    scipy.io.savemat(cls / "2008_000002.mat", {"GTinst": {"Segmentation": np.zeros((H, W), np.uint8)}})
    assert prepare(voc, sbd) == 2
    err = capsys.readouterr().err
    assert str(cls / "2008_000002.mat") in err and "GTcls" in err
    assert not (voc / "ImageSets/Segmentation/trainaug.txt").exists()  # the list is written last

    # a value that is no VOC class
    seg = np.zeros((H, W), np.uint8)
    seg[2, 2] = 37
    save_sbd_mat(cls / "2008_000002.mat", seg)
    assert prepare(voc, sbd) == 2
    err = capsys.readouterr().err
    assert str(cls / "2008_000002.mat") in err and "37" in err

    # not a MATLAB file at all
    (cls / "2008_000002.mat").write_bytes(b"garbage")
    assert prepare(voc, sbd) == 2
    assert "cannot be read as a MATLAB file" in capsys.readouterr().err

    # a listed id without its .mat
    (cls / "2008_000002.mat").unlink()
    assert prepare(voc, sbd) == 2
    assert "does not exist" in capsys.readouterr().err

    # --sbd pointing somewhere else
    assert prepare(voc, tmp_path / "nowhere") == 2
    assert "no SBD found" in capsys.readouterr().err
    assert prepare(tmp_path / "nowhere", sbd) == 2
    assert "--voc must be the folder holding VOCdevkit/" in capsys.readouterr().err


def test_build_dataset_from_config(tmp_path, capsys):
    voc, sbd, _, _ = make_voc_and_sbd(tmp_path)
    cfg = load_config(None, ["data.dataset=voc", f"data.root={tmp_path}", "data.num_classes=21"])
    ds = build_dataset(cfg.data, "train")
    assert isinstance(ds, PascalVOC) and len(ds) == 2
    assert prepare(voc, sbd) == 0
    cfg = load_config(None, ["data.dataset=voc_aug", f"data.root={tmp_path}", "data.num_classes=21"])
    train, val = build_dataset(cfg.data, "train"), build_dataset(cfg.data, "val")
    assert isinstance(train, PascalVOCAug) and (len(train), len(val)) == (4, 2)
    assert train[0]["label"].shape == (H, W)
