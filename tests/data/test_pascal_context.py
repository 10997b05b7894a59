"""Pascal-Context: `scaleseg prepare pascal-context` on a tiny VOC2010 tree and a Detail-API
`trainval_merged.json` (COCO RLE segmentations), checked against hand-painted labels, and the loader's
59-class (background ignored) and 60-class settings."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from scaleseg.cli import main
from scaleseg.config import load_config
from scaleseg.data import build_dataset
from scaleseg.data.datasets.base import read_label_file
from scaleseg.data.datasets.pascal_context import PascalContext
from scaleseg.errors import ConfigError, DataError

pytest.importorskip("pycocotools")
from pycocotools import mask as mask_utils  # noqa: E402

# Detail category id -> label 0..59, by hand from the benchmark list (ascending ids): aeroplane 2 -> 1,
# person 284 -> 37, sky 360 -> 47, wall 440 -> 56, wood 458 -> 59
AEROPLANE, PERSON, SKY, WALL, WOOD = 2, 284, 360, 440, 458
LABEL = {0: 0, AEROPLANE: 1, PERSON: 37, SKY: 47, WALL: 56, WOOD: 59}


def rle(mask):
    r = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in r["size"]], "counts": r["counts"].decode("ascii")}


def rect(h, w, y0, y1, x0, x1):
    m = np.zeros((h, w), np.uint8)
    m[y0:y1, x0:x1] = 1
    return m


def detail_json(path, images, annotations, categories=None):
    cats = categories or [{"category_id": i, "name": n, "supercategory": "x", "onlysemantic": 0}
                          for i, n in ((AEROPLANE, "aeroplane"), (PERSON, "person"), (SKY, "sky"), (WALL, "wall"),
                                       (WOOD, "wood"), (3, "air conditioner"))]
    path.write_text(json.dumps({"info": {}, "images": images, "annos_segmentation": annotations,
                                "categories": cats, "parts": [], "annos_occlusion": [], "annos_boundary": [],
                                "annos_joints": []}))


def make_context(tmp_path):
    """VOCdevkit/VOC2010/JPEGImages with 3 images (2 train, 1 val) and a trainval_merged.json.
    Returns (voc folder, json path, {name: expected 0..59 label by hand})."""
    voc = tmp_path / "VOCdevkit" / "VOC2010"
    (voc / "JPEGImages").mkdir(parents=True)
    sizes = {"2008_000002": (4, 6), "2008_000003": (3, 3), "2010_000005": (2, 4)}
    for name, (h, w) in sizes.items():
        Image.fromarray(np.full((h, w, 3), 80, np.uint8)).save(voc / "JPEGImages" / f"{name}.jpg")
    images = [{"image_id": int(n.replace("_", "")), "file_name": f"{n}.jpg", "height": h, "width": w,
               "phase": "val" if n.startswith("2010") else "train"} for n, (h, w) in sizes.items()]
    images.append({"image_id": 2011000009, "file_name": "2011_000009.jpg", "height": 2, "width": 2, "phase": "test"})
    a = [
        # image 2008_000002 (4 x 6): sky on top, a wall below, a person over both, then an aeroplane over the person
        {"id": 1, "image_id": 2008000002, "category_id": SKY, "segmentation": rle(rect(4, 6, 0, 2, 0, 6))},
        {"id": 2, "image_id": 2008000002, "category_id": WALL, "segmentation": rle(rect(4, 6, 2, 4, 0, 5))},
        {"id": 3, "image_id": 2008000002, "category_id": PERSON, "segmentation": rle(rect(4, 6, 1, 4, 2, 4))},
        {"id": 4, "image_id": 2008000002, "category_id": AEROPLANE, "segmentation": rle(rect(4, 6, 0, 2, 3, 5))},
        # 2008_000003: wood on one column (the rest is background)
        {"id": 5, "image_id": 2008000003, "category_id": WOOD, "segmentation": rle(rect(3, 3, 0, 3, 1, 2))},
        # 2010_000005 (val): all person
        {"id": 6, "image_id": 2010000005, "category_id": PERSON, "segmentation": rle(np.ones((2, 4)))},
    ]
    path = tmp_path / "trainval_merged.json"
    detail_json(path, images, a)
    expected = {
        "2008_000002": np.array([[47, 47, 47, 1, 1, 47], [47, 47, 37, 1, 1, 47], [56, 56, 37, 37, 56, 0],
                                 [56, 56, 37, 37, 56, 0]]),
        "2008_000003": np.array([[0, 59, 0]] * 3),
        "2010_000005": np.full((2, 4), 37),
    }
    return voc, path, expected


def prepare(voc, path, *extra):
    return main(["prepare", "pascal-context", "--voc", str(voc), "--json", str(path), "--no-progress", *extra])


def test_prepare_paints_in_file_order_and_maps_the_60_ids(tmp_path, capsys):
    voc, path, expected = make_context(tmp_path)
    assert prepare(voc, path) == 0
    assert "3 images (train 2, val 1); 3 labels written, 0 already complete" in capsys.readouterr().out
    for name, label in expected.items():
        stored = read_label_file(voc / "SegmentationClassContext" / f"{name}.png", 8)
        np.testing.assert_array_equal(stored, label)
    lists = voc / "ImageSets" / "SegmentationContext"
    assert (lists / "train.txt").read_text() == "2008_000002\n2008_000003\n"
    assert (lists / "val.txt").read_text() == "2010_000005\n"

    # a second run keeps every label; a killed run's temporary file is removed
    (voc / "SegmentationClassContext" / ".2008_000003.png.77.tmp").write_bytes(b"")
    assert prepare(tmp_path, path) == 0  # --voc may also be the folder holding VOCdevkit/
    assert "0 labels written, 3 already complete" in capsys.readouterr().out
    assert not list((voc / "SegmentationClassContext").glob(".*"))


def test_loader_59_classes_ignore_background_and_60_keep_it(tmp_path):
    voc, path, expected = make_context(tmp_path)
    assert prepare(voc, path) == 0
    ds59 = build_dataset(load_config(None, ["data.dataset=pascal_context", f"data.root={tmp_path}",
                                            "data.num_classes=59"]).data, "train")
    assert isinstance(ds59, PascalContext) and ds59.num_classes == 59 and len(ds59) == 2
    assert ds59.class_names[0] == "aeroplane" and ds59.class_names[36] == "person" and ds59.class_names[-1] == "wood"
    label = expected["2008_000002"]
    np.testing.assert_array_equal(ds59[0]["label"], np.where(label == 0, 255, label - 1))
    ds60 = PascalContext(tmp_path / "VOCdevkit", "val", num_classes=60)
    assert ds60.class_names[0] == "background" and ds60.class_names[37] == "person"
    np.testing.assert_array_equal(ds60[0]["label"], expected["2010_000005"])
    with pytest.raises(ConfigError, match="59 .* or 60"):
        PascalContext(tmp_path, "train", num_classes=150)


def test_bad_inputs_name_the_file(tmp_path, capsys):
    voc, path, _ = make_context(tmp_path)
    # a category outside the benchmark (air conditioner, 3): refused naming the image
    data = json.loads(path.read_text())
    data["annos_segmentation"].append({"id": 9, "image_id": 2008000003, "category_id": 3,
                                       "segmentation": rle(rect(3, 3, 0, 1, 0, 1))})
    other = tmp_path / "other.json"
    other.write_text(json.dumps(data))
    assert prepare(voc, other) == 2
    err = capsys.readouterr().err
    assert "2008_000003" in err and "categories 3 " in err
    assert prepare(voc, tmp_path / "nope.json") == 2
    assert "nope.json" in capsys.readouterr().err

    # labels of one annotation file are not resumed from another (the failed build wrote 2008_000002 from other.json)
    assert prepare(voc, path) == 2
    assert "built from other.json" in capsys.readouterr().err
    assert prepare(voc, path, "--overwrite") == 0
    data["annos_segmentation"] = data["annos_segmentation"][:-1]
    data["annos_segmentation"][4]["category_id"] = SKY
    other.write_text(json.dumps(data))
    assert prepare(voc, other) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert prepare(voc, other, "--overwrite") == 0
    np.testing.assert_array_equal(read_label_file(voc / "SegmentationClassContext" / "2008_000003.png", 8),
                                  [[0, 47, 0]] * 3)

    # the loader: a value above 59, and data.root without the prepared files
    bad = voc / "SegmentationClassContext" / "2008_000003.png"
    Image.fromarray(np.array([[0, 60, 0]] * 3, np.uint8), mode="L").save(bad)
    with pytest.raises(DataError, match=r"2008_000003\.png.* 3 pixels .*: 60"):
        PascalContext(tmp_path, "train")[1]
    (voc / "ImageSets" / "SegmentationContext" / "val.txt").unlink()
    with pytest.raises(DataError, match=r"val\.txt.* does not exist.*scaleseg prepare pascal-context"):
        PascalContext(tmp_path, "val")
