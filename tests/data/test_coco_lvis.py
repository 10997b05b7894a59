"""`scaleseg prepare coco-lvis` and the COCO+LVIS loader on tiny LVIS v1 / COCO-Stuff JSONs
(polygons, compressed and uncompressed RLE), checked against hand-painted label maps."""

from __future__ import annotations

import json
import os
import warnings

import numpy as np
import pytest
from PIL import Image

from scaleseg.config import DataConfig
from scaleseg.data import build_dataset
from scaleseg.data.datasets.coco_lvis import COCOLVIS
from scaleseg.data.datasets.cocostuff import COCOSTUFF_ID_NAMES
from scaleseg.data.prepare.coco_lvis import build, image_class_lists
from scaleseg.errors import DataError

pytest.importorskip("pycocotools")
from pycocotools import mask as mask_utils  # noqa: E402

IGN = 65535
# the 10 LVIS categories that stuff classes merge into, with their LVIS names
MERGE_TARGETS = {50: "banner", 110: "blanket", 181: "cabinet", 346: "cupboard", 350: "curtain",
                 713: "napkin", 804: "pillow", 904: "salad", 1050: "table", 1108: "towel"}


# ---------------------------------------------------------------- annotation writers
def rect(h, w, x0, x1, y0, y1):
    """Mask of columns x0..x1-1, rows y0..y1-1."""
    m = np.zeros((h, w), np.uint8)
    m[y0:y1, x0:x1] = 1
    return m


def compressed_rle(mask):
    """As in stuff_*2017.json: counts a string."""
    rle = mask_utils.encode(np.asfortranarray(mask))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def uncompressed_rle(mask):
    """Column-major run lengths starting with a run of zeros."""
    flat = mask.ravel(order="F").astype(np.int8)
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    runs = np.diff(bounds).tolist()
    if flat[0] == 1:
        runs = [0] + runs
    return {"size": list(mask.shape), "counts": runs}


def polygon(x0, x1, y0, y1):
    return [x0, y0, x1, y0, x1, y1, x0, y1]


def lvis_json(images, annotations, num_categories=1203):
    cats = [{"id": i, "name": MERGE_TARGETS.get(i, f"lvis_{i}"), "frequency": "rcf"[i % 3], "synset": f"s{i}.n.01",
             "image_count": 1, "instance_count": 1} for i in range(1, num_categories + 1)]
    return {"images": images, "annotations": annotations, "categories": cats}


def stuff_json(images, annotations):
    cats = [{"id": i, "name": COCOSTUFF_ID_NAMES[i - 1], "supercategory": "stuff"} for i in range(92, 183)]
    cats.append({"id": 183, "name": "other", "supercategory": "other"})
    return {"images": images, "annotations": annotations, "categories": cats}


def image(image_id, folder, h, w):
    return {"id": image_id, "height": h, "width": w,
            "coco_url": f"http://images.cocodataset.org/{folder}/{image_id:012d}.jpg"}


def ann(ann_id, image_id, category, segmentation):
    return {"id": ann_id, "image_id": image_id, "category_id": category, "segmentation": segmentation}


# image 1 (val2017, 6 x 8), image 2 (train2017, 4 x 5), image 3 (train2017, 3 x 3, no annotations)
IMAGES = [image(1, "val2017", 6, 8), image(2, "train2017", 4, 5), image(3, "train2017", 3, 3)]
LVIS_ANNS = [
    ann(10, 1, 7, [polygon(0, 6, 0, 4)]),                      # A: class 6, 24 px
    ann(11, 1, 20, [polygon(2, 4, 1, 3)]),                     # B: class 19, 4 px, inside A
    ann(12, 1, 30, uncompressed_rle(rect(6, 8, 3, 5, 2, 4))),  # C: class 29, 4 px, ties with B at (x3, y2)
    # D: class 1202, two parts (x6..7 y4..5, x0 y5) after a 4-number "polygon" (no area; pycocotools
    # would read a list starting with 4 numbers as boxes)
    ann(13, 1, 1203, [[0, 0, 8, 6], polygon(6, 8, 4, 6), polygon(0, 1, 5, 6)]),
    ann(20, 2, 181, [polygon(0, 2, 0, 2)]),                    # LVIS cabinet: class 180
]
STUFF_VAL = [
    ann(100, 1, 93, compressed_rle(rect(6, 8, 2, 6, 4, 6))),   # blanket -> LVIS 110 = class 109
    ann(101, 1, 110, compressed_rle(rect(6, 8, 6, 8, 0, 4))),  # desk-stuff -> 1216
    ann(102, 1, 183, uncompressed_rle(rect(6, 8, 0, 2, 3, 5))),  # other -> ignore (under A: A stays)
]
STUFF_TRAIN = [
    ann(200, 2, 98, compressed_rle(rect(4, 5, 0, 5, 0, 2))),     # cabinet -> LVIS 181 = class 180 (LVIS keeps x0..1)
    ann(201, 2, 181, compressed_rle(rect(4, 5, 0, 5, 2, 3))),    # window-other -> 1282
    ann(202, 2, 165, uncompressed_rle(rect(4, 5, 0, 5, 3, 4))),  # table -> LVIS 1050 = class 1049
    ann(203, 99, 94, compressed_rle(rect(2, 2, 0, 2, 0, 2))),    # an image not in LVIS: not built
]

EXPECTED = {
    "000000000001": np.array([
        [6, 6, 6, 6, 6, 6, 1216, 1216],
        [6, 6, 19, 19, 6, 6, 1216, 1216],
        [6, 6, 19, 19, 29, 6, 1216, 1216],
        [6, 6, 6, 29, 29, 6, 1216, 1216],
        [IGN, IGN, 109, 109, 109, 109, 1202, 1202],
        [1202, IGN, 109, 109, 109, 109, 1202, 1202],
    ]),
    "000000000002": np.array([[180] * 5, [180] * 5, [1282] * 5, [1049] * 5]),
    "000000000003": np.full((3, 3), IGN),
}


@pytest.fixture
def coco(tmp_path):
    """(paths dict) LVIS, two stuff files, a COCO images root and an output folder."""
    (tmp_path / "lvis.json").write_text(json.dumps(lvis_json(IMAGES, LVIS_ANNS)))
    (tmp_path / "stuff_val.json").write_text(json.dumps(stuff_json([image(1, "val2017", 6, 8)], STUFF_VAL)))
    (tmp_path / "stuff_train.json").write_text(json.dumps(stuff_json(
        [image(2, "train2017", 4, 5), image(3, "train2017", 3, 3), image(99, "train2017", 2, 2)], STUFF_TRAIN)))
    for im in IMAGES:
        folder = tmp_path / "coco" / im["coco_url"].split("/")[-2]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((im["height"], im["width"], 3), 50, np.uint8)).save(folder / f"{im['id']:012d}.jpg")
    return {"lvis": tmp_path / "lvis.json", "stuff": [tmp_path / "stuff_val.json", tmp_path / "stuff_train.json"],
            "images": tmp_path / "coco", "out": tmp_path / "out", "tmp": tmp_path}


def _build(c, **kw):
    kw = {"split": "train", "progress": False, "workers": 1, **kw}
    return build(c["lvis"], c["stuff"], c["images"], c["out"], **kw)


def _label(out, name, split="train"):
    with Image.open(out / "labels" / split / f"{name}.png") as im:
        assert im.mode == "I;16"
        return np.array(im)


def test_builds_the_hand_painted_labels(coco):
    summary = _build(coco)
    out = coco["out"]
    for name, expected in EXPECTED.items():
        np.testing.assert_array_equal(_label(out, name), expected, err_msg=name)
    # image paths from coco_url: val2017 and train2017 in one split
    assert (out / "train.txt").read_text().splitlines() == [
        "val2017/000000000001.jpg labels/train/000000000001.png",
        "train2017/000000000002.jpg labels/train/000000000002.png",
        "train2017/000000000003.jpg labels/train/000000000003.png",
    ]
    # summary, counted by hand from EXPECTED
    assert (summary["images"], summary["images_built"], summary["images_kept"]) == (3, 3, 0)
    assert (summary["pixels"], summary["pixels_unlabelled"]) == (48 + 20 + 9, 3 + 0 + 9)
    assert summary["fraction_unlabelled"] == pytest.approx(12 / 77)
    hand = {6: 17, 19: 4, 29: 3, 1216: 8, 109: 8, 1202: 5, 180: 10, 1282: 5, 1049: 5}
    per_class = summary["pixels_per_class"]
    assert len(per_class) == 1284 and {c: n for c, n in enumerate(per_class) if n} == hand
    assert {c: n for c, n in enumerate(summary["images_per_class"]) if n} == {c: 1 for c in hand}
    assert summary["classes_present"] == 9 and summary["images_without_stuff"] == 0
    assert json.loads((out / "summary_train.json").read_text()) == summary
    # per-image class lists
    classes = {"000000000001": [6, 19, 29, 109, 1202, 1216], "000000000002": [180, 1049, 1282], "000000000003": []}
    assert json.loads((out / "train_image_classes.json").read_text()) == classes
    assert image_class_lists(out, "train") == classes


def test_class_list(coco):
    _build(coco)
    data = json.loads((coco["out"] / "classes.json").read_text())
    classes = data["classes"]
    assert (data["num_classes"], data["ignore_index"], len(classes)) == (1284, 65535, 1284)
    assert classes[0] == {"id": 0, "name": "lvis_1", "source": "lvis", "lvis_id": 1, "coco_id": None,
                          "frequency": "c", "synset": "s1.n.01"}
    assert classes[109] == {"id": 109, "name": "blanket", "source": "lvis+stuff", "lvis_id": 110, "coco_id": 93,
                            "frequency": "f", "synset": "s110.n.01"}
    assert classes[180]["name"] == "cabinet" and classes[180]["coco_id"] == 98
    assert classes[1203] == {"id": 1203, "name": "branch", "source": "stuff", "lvis_id": None, "coco_id": 94,
                             "frequency": None, "synset": None}
    assert (classes[1216]["name"], classes[1282]["name"], classes[1283]["name"]) == ("desk-stuff", "window-other", "wood")
    merged = sorted(c["coco_id"] for c in classes if c["source"] == "lvis+stuff")
    assert merged == [92, 93, 98, 108, 109, 137, 141, 153, 165, 168]
    assert [c["coco_id"] for c in classes[1203:]] == [i for i in range(92, 183) if i not in merged]


def test_resume_builds_nothing_then_only_what_is_missing(coco):
    first = _build(coco)
    labels = sorted((coco["out"] / "labels" / "train").iterdir())
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in labels}
    second = _build(coco)
    assert (second["images_built"], second["images_kept"]) == (0, 3)
    assert {k: v for k, v in second.items() if not k.startswith("images_")} == \
        {k: v for k, v in first.items() if not k.startswith("images_")}
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in labels} == before
    # an interrupted build: one label missing, one truncated, a stale temporary file
    (coco["out"] / "labels" / "train" / "000000000002.png").unlink()
    path3 = coco["out"] / "labels" / "train" / "000000000003.png"
    path3.write_bytes(path3.read_bytes()[:20])
    (coco["out"] / "labels" / "train" / ".000000000001.png.123.tmp").write_bytes(b"partial")
    third = _build(coco)
    assert (third["images_built"], third["images_kept"]) == (2, 1)
    for name, expected in EXPECTED.items():
        np.testing.assert_array_equal(_label(coco["out"], name), expected)
    assert third["pixels_per_class"] == first["pixels_per_class"]


def test_workers_give_the_same_labels(coco):
    _build(coco, workers=2)
    for name, expected in EXPECTED.items():
        np.testing.assert_array_equal(_label(coco["out"], name), expected)


def test_limit_and_missing_stuff_file(coco):
    with pytest.warns(UserWarning, match=r"1 of 2 images are in none of the --stuff files.*stuff_train2017"):
        summary = build(coco["lvis"], [coco["stuff"][0]], coco["images"], coco["out"], split="val", limit=2,
                        progress=False, workers=1)
    assert (summary["images"], summary["images_without_stuff"]) == (2, 1)
    # image 2 without its stuff: LVIS cabinet only
    expected = np.full((4, 5), IGN)
    expected[0:2, 0:2] = 180
    np.testing.assert_array_equal(_label(coco["out"], "000000000002", "val"), expected)
    np.testing.assert_array_equal(_label(coco["out"], "000000000001", "val"), EXPECTED["000000000001"])
    assert len((coco["out"] / "val.txt").read_text().splitlines()) == 2


def test_cli(coco, capsys):
    from scaleseg.cli import main

    argv = ["prepare", "coco-lvis", "--lvis", str(coco["lvis"]), "--stuff", *map(str, coco["stuff"]),
            "--images", str(coco["images"]), "--out", str(coco["out"]), "--split", "val", "--workers", "1", "--no-progress"]
    assert main(argv) == 0
    assert "3 images (3 built, 0 already complete)" in capsys.readouterr().out
    assert main(argv) == 0
    assert "3 images (0 built, 3 already complete)" in capsys.readouterr().out
    bad = argv[:]
    bad[bad.index("--lvis") + 1] = str(coco["tmp"] / "nope.json")
    assert main(bad) == 2
    assert "nope.json" in capsys.readouterr().err


def test_loader_reads_the_build(coco):
    _build(coco)
    ds = build_dataset(DataConfig(dataset="coco_lvis", root=str(coco["out"]), num_classes=1284), "train")
    assert isinstance(ds, COCOLVIS)
    assert (len(ds), ds.num_classes, ds.ignore_index) == (3, 1284, 65535)
    assert ds.class_names[109] == "blanket" and ds.class_frequency[109] == "f" and ds.class_frequency[1203] is None
    assert ds.samples[0].image == (coco["images"] / "val2017" / "000000000001.jpg").resolve()
    for i, (name, expected) in enumerate(EXPECTED.items()):
        item = ds[i]
        assert item["name"] == name and item["image"].shape[:2] == expected.shape
        np.testing.assert_array_equal(item["label"], expected)
    assert ds.image_classes() == [[6, 19, 29, 109, 1202, 1216], [180, 1049, 1282], []]
    from scaleseg.data.samplers import image_class_sets

    sets = image_class_sets(ds, progress=False)  # the repeat-factor sampler takes the builder's lists
    assert [s.tolist() for s in sets] == ds.image_classes()
    # the COCO images moved: <root>/images overrides the recorded root
    moved = coco["tmp"] / "moved"
    os.rename(coco["images"], moved)
    with pytest.raises(DataError, match=r"images root.*recorded in.*build_train\.json.*not a folder"):
        COCOLVIS(coco["out"], "train")
    os.symlink(moved, coco["out"] / "images")
    assert COCOLVIS(coco["out"], "train").samples[1].image == coco["out"] / "images" / "train2017" / "000000000002.jpg"


def test_loader_bad_files(coco):
    _build(coco)
    out = coco["out"]
    ds = COCOLVIS(out, "train")
    label = out / "labels" / "train" / "000000000002.png"
    Image.fromarray(np.full((4, 5), 3, np.uint8), mode="L").save(label)  # 8-bit: ids above 255 lost
    with pytest.raises(DataError, match=r"000000000002\.png.*8-bit.*16-bit"):
        ds[1]
    Image.fromarray(np.full((4, 5), 2000, np.uint16)).save(label)  # not a class, not ignore
    with pytest.raises(DataError, match=r"000000000002\.png.*20 pixels.*2000"):
        ds[1]
    Image.fromarray(np.zeros((3, 5), np.uint16)).save(label)
    with pytest.raises(DataError, match=r"000000000002\.jpg.*5x4.*000000000002\.png.*5x3"):
        ds[1]
    with pytest.raises(DataError, match=r"val\.txt.*does not exist.*--split val"):
        COCOLVIS(out, "val")
    (out / "classes.json").write_text("{}")
    with pytest.raises(DataError, match=r"classes\.json.*not a.*class list"):
        COCOLVIS(out, "train")
    (out / "classes.json").unlink()
    with pytest.raises(DataError, match=r"classes\.json.*does not exist.*scaleseg prepare coco-lvis"):
        COCOLVIS(out, "train")


def test_builder_bad_inputs(coco):
    tmp = coco["tmp"]

    def write(name, data):
        (tmp / name).write_text(json.dumps(data))
        return tmp / name

    def run(lvis=None, stuff=None):
        return build(lvis or coco["lvis"], stuff or coco["stuff"], coco["images"], tmp / "bad_out", progress=False, workers=1)

    with pytest.raises(DataError, match=r"few\.json.*1202 categories.*LVIS v1 has 1203"):
        run(lvis=write("few.json", lvis_json(IMAGES, LVIS_ANNS, num_categories=1202)))
    bad_size = [ann(10, 1, 7, uncompressed_rle(rect(5, 8, 0, 2, 0, 2)))]
    with pytest.raises(DataError, match=r"image 1 \(--lvis .*size\.json.*LVIS annotation 10: RLE size \[5, 8\].*\[6, 8\]"):
        run(lvis=write("size.json", lvis_json(IMAGES, bad_size)))
    with pytest.raises(DataError, match=r"cat\.json.*annotation 10 has category 1204"):
        run(lvis=write("cat.json", lvis_json(IMAGES, [ann(10, 1, 1204, [polygon(0, 1, 0, 1)])])))
    short = {"size": [6, 8], "counts": [10, 5]}  # runs cover 15 of 48 pixels
    with pytest.raises(DataError, match=r"runs\.json.*LVIS annotation 10: uncompressed RLE counts sum to 15, not.*48"):
        run(lvis=write("runs.json", lvis_json(IMAGES, [ann(10, 1, 7, short)])))
    thing_in_stuff = stuff_json([image(1, "val2017", 6, 8)], [ann(100, 1, 50, compressed_rle(rect(6, 8, 0, 1, 0, 1)))])
    with pytest.raises(DataError, match=r"stuff50\.json.*annotation 100 has category 50"):
        run(stuff=[write("stuff50.json", thing_in_stuff)])
    no_url = [{"id": 1, "height": 6, "width": 8, "file_name": "x.jpg"}]
    with pytest.raises(DataError, match=r"url\.json.*image 1 has no usable coco_url"):
        run(lvis=write("url.json", lvis_json(no_url, [])))
    things = stuff_json([], [])
    things["categories"] = [{"id": i, "name": f"t{i}"} for i in range(1, 92)]
    with pytest.raises(DataError, match=r"things\.json.*91 categories.*92\.\.183"):
        run(stuff=[write("things.json", things)])
    with pytest.raises(DataError, match=r"missing\.json.*does not exist"):
        run(stuff=[tmp / "missing.json"])
    (tmp / "broken.json").write_text("{not json")
    with pytest.raises(DataError, match=r"broken\.json.*cannot be read as JSON"):
        run(lvis=tmp / "broken.json")
    # a second build into the same folder from other categories
    _build(coco)
    renamed = lvis_json(IMAGES, LVIS_ANNS)
    renamed["categories"][0]["name"] = "something_else"
    with pytest.raises(DataError, match=r"classes\.json.*other classes"):
        build(write("renamed.json", renamed), coco["stuff"], coco["images"], coco["out"], progress=False, workers=1)


def test_merge_name_check_warns_on_a_foreign_vocabulary(coco):
    data = lvis_json(IMAGES, LVIS_ANNS)
    data["categories"][109]["name"] = "bed_sheet"  # LVIS id 110 is not "blanket" in this file
    (coco["tmp"] / "other.json").write_text(json.dumps(data))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        build(coco["tmp"] / "other.json", coco["stuff"], coco["images"], coco["out"], progress=False, workers=1)
    assert any("LVIS category 110" in str(w.message) and "bed_sheet" in str(w.message) for w in caught)


# ---------------------------------------------------------------- a resumed build is a build of the same inputs
def test_a_build_from_other_inputs_is_refused_and_rebuilt_with_overwrite(coco, capsys):
    """The builder's own advice (both stuff files for val) after a first build with one: the labels of the
    first build must not be kept as "already complete"."""
    from scaleseg.cli import main

    out = coco["out"]
    with pytest.warns(UserWarning, match="none of the --stuff files"):
        build(coco["lvis"], [coco["stuff"][0]], coco["images"], out, split="val", progress=False, workers=1)
    lvis_only = np.full((4, 5), IGN)
    lvis_only[0:2, 0:2] = 180
    np.testing.assert_array_equal(_label(out, "000000000002", "val"), lvis_only)
    (out / "labels" / "val" / ".000000000002.png.4242.tmp").write_bytes(b"")  # a write killed by SIGKILL

    argv = ["prepare", "coco-lvis", "--lvis", str(coco["lvis"]), "--stuff", *map(str, coco["stuff"]),
            "--images", str(coco["images"]), "--out", str(out), "--split", "val", "--workers", "1", "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "stuff_train.json" in err and "--overwrite" in err and "labels" in err
    np.testing.assert_array_equal(_label(out, "000000000002", "val"), lvis_only)  # nothing was changed

    assert main([*argv, "--overwrite"]) == 0
    assert "3 images (3 built, 0 already complete)" in capsys.readouterr().out
    for name, expected in EXPECTED.items():
        np.testing.assert_array_equal(_label(out, name, "val"), expected)
    assert not list((out / "labels" / "val").glob(".*.tmp"))  # the stale temporary file is gone
    record = json.loads((out / "build_val.json").read_text())
    assert sorted(i["file"] for i in record["inputs"]["stuff"]) == sorted(str(p.resolve()) for p in coco["stuff"])

    # the same inputs (even touched, or under --limit) resume; changed content is refused again
    os.utime(coco["stuff"][1], (1, 1))
    assert main(argv) == 0
    assert "3 images (0 built, 3 already complete)" in capsys.readouterr().out
    data = json.loads(coco["stuff"][1].read_text())
    data["annotations"] = data["annotations"][:1]
    coco["stuff"][1].write_text(json.dumps(data))
    assert main(argv) == 2
    assert "other inputs" in capsys.readouterr().err


def test_a_resume_removes_the_temporary_files_of_a_killed_build(coco):
    _build(coco)
    stale = coco["out"] / "labels" / "train" / ".000000000003.png.999.tmp"
    stale.write_bytes(b"")
    assert _build(coco)["images_built"] == 0
    assert not stale.exists()
