"""The `cityscapes` loader on a real Cityscapes frame (val, Frankfurt, downscaled) with its official
`labelIds` and `labelTrainIds`, read from `../shared/data/` relative to the project root (never copied
into the project: the test links the files into a Cityscapes layout under tmp_path)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from scaleseg.cli import main
from scaleseg.data.datasets.cityscapes import Cityscapes

FRAME = "frankfurt_000000_000294"
SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data" / f"cityscapes_{FRAME}"
pytestmark = pytest.mark.skipif(
    not SHARED.is_dir(), reason=f"the real Cityscapes frame is not here: {SHARED} (../shared/data/ beside the project)"
)

# labelId -> trainId from the Cityscapes documentation (cityscapesScripts labels.py), written out here
TRAIN_ID = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12,
            26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
# the fixture's labelIds and labelTrainIds were resized separately: they disagree on this many pixels
DISAGREEING_PIXELS = 77


def read(suffix: str) -> np.ndarray:
    with Image.open(SHARED / f"{FRAME}_{suffix}") as im:
        return np.array(im)


def link_tree(root: Path, with_train_ids: bool = False) -> Path:
    """The frame as the only image of both splits, linked into leftImg8bit/<split>/frankfurt/ and gtFine/."""
    names = ["leftImg8bit.png", "gtFine_labelIds.png"] + (["gtFine_labelTrainIds.png"] if with_train_ids else [])
    for split in ("train", "val"):
        for name in names:
            folder = root / ("leftImg8bit" if name.startswith("left") else "gtFine") / split / "frankfurt"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{FRAME}_{name}").symlink_to(SHARED / f"{FRAME}_{name}")
    return root


def official_train_ids(ids: np.ndarray) -> np.ndarray:
    out = np.full(ids.shape, 255, np.int64)
    for label_id, train_id in TRAIN_ID.items():
        out[ids == label_id] = train_id
    return out


def test_labels_equal_the_official_train_ids_except_where_the_fixture_disagrees(tmp_path):
    ids, train_ids = read("gtFine_labelIds.png"), read("gtFine_labelTrainIds.png").astype(np.int64)
    reference = official_train_ids(ids)
    item = Cityscapes(link_tree(tmp_path / "a"), "val")[0]
    assert item["name"] == FRAME and item["image"].shape == (128, 256, 3)
    np.testing.assert_array_equal(item["label"], reference)  # the id table, pixel for pixel
    differs = item["label"] != train_ids
    np.testing.assert_array_equal(differs, reference != train_ids)
    assert int(differs.sum()) == DISAGREEING_PIXELS
    # with the official labelTrainIds beside it, that file is read as it is
    prepared = Cityscapes(link_tree(tmp_path / "b", with_train_ids=True), "val")[0]
    np.testing.assert_array_equal(prepared["label"], train_ids)


def test_check_data_is_clean_and_a_short_run_trains_and_evaluates(tmp_path, capsys):
    root = link_tree(tmp_path / "cityscapes")
    common = [f"data.root={root}", "data.num_workers=0"]
    config = Path(__file__).resolve().parents[2] / "configs" / "_base_" / "datasets" / "cityscapes.yaml"
    assert main(["check-data", str(config), *common, "--no-progress"]) == 0
    assert "no problems found" in capsys.readouterr().out
    work = tmp_path / "run"
    assert main(["train", "data.dataset=cityscapes", "data.num_classes=19", *common, "data.batch_size=2",
                 "data.train_pipeline.crop_size=[64,128]", "model.decoder.channels=16", "model.decoder.low_level_channels=8",
                 "train.iters=20", "train.log_interval=10", "train.eval_interval=0", "train.checkpoint_interval=20",
                 "train.progress=false", "--work-dir", str(work)]) == 0
    metrics = json.loads((work / "eval" / "iter_000020" / "metrics.json").read_text())
    assert metrics["iteration"] == 20 and metrics["skipped_samples"] == 0 and metrics["mIoU"] is not None
    rows = (work / "eval" / "iter_000020" / "per_class.csv").read_text().splitlines()[1:]
    label_area = np.array([int(r.split(",")[-1]) for r in rows])
    reference = official_train_ids(read("gtFine_labelIds.png"))
    np.testing.assert_array_equal(label_area, np.bincount(reference[reference != 255], minlength=19))
