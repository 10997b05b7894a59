"""End to end on files in a published layout: the repository's dataset configs drive the loaders,
training (with photometric distortion and repeat-factor sampling) and evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from scaleseg.cli import main
from scaleseg.config import load_config
from scaleseg.data import FILE_DATASETS, dataset_class

CONFIGS = Path(__file__).parents[2] / "configs"

# the tiny run of tests/conftest.py, minus its synthetic-only keys
TINY_FILE_RUN = [
    "data.batch_size=2",
    "data.num_workers=0",
    "data.train_pipeline.crop_size=32",
    "model.decoder.channels=16",
    "model.decoder.low_level_channels=8",
    "train.iters=4",
    "train.log_interval=1",
    "train.eval_interval=0",
    "train.checkpoint_interval=4",
    "train.progress=false",
    "eval.mode=slide",
    "eval.crop_size=32",
    "eval.stride=24",
]


def _ade20k_tree(root: Path, n_train: int = 4, n_val: int = 2) -> dict[str, np.ndarray]:
    """ADEChallengeData2016 with JPEG images and uint8 annotations 0..150 (0 = other)."""
    rng = np.random.default_rng(0)
    labels = {}
    for split, n in (("training", n_train), ("validation", n_val)):
        (root / "images" / split).mkdir(parents=True)
        (root / "annotations" / split).mkdir(parents=True)
        for i in range(n):
            name = f"ADE_{split[:5]}_{i:08d}"
            label = rng.integers(0, 151, size=(40, 48)).astype(np.uint8)
            label[:8] = 150  # the last class
            label[-4:] = 0  # "other" -> ignore
            Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(root / "images" / split / f"{name}.jpg")
            Image.fromarray(label, mode="L").save(root / "annotations" / split / f"{name}.png")
            labels[name] = label
    return labels


def test_dataset_configs_name_real_loaders_with_their_class_counts():
    fixed = {"cityscapes": 19, "voc_aug": 21, "ade20k": 150, "cocostuff164k": 171}
    seen = set()
    for path in sorted((CONFIGS / "_base_" / "datasets").glob("*.yaml")):
        cfg = load_config(path)
        assert cfg.data.dataset in FILE_DATASETS, path
        seen.add(cfg.data.dataset)
        assert cfg.data.train_pipeline.photometric, path
        if cfg.data.dataset in fixed:
            assert cfg.data.num_classes == fixed[cfg.data.dataset] == len(dataset_class(cfg.data.dataset).CLASS_NAMES), path
    assert {"cityscapes", "voc_aug", "ade20k", "cocostuff10k", "coco_lvis"} <= seen  # the ESS paper's five
    assert load_config(CONFIGS / "_base_" / "datasets" / "cocostuff10k.yaml").data.num_classes == 182  # paper setting
    assert load_config(CONFIGS / "_base_" / "datasets" / "cocolvis.yaml").data.num_classes == 1284
    assert load_config(CONFIGS / "_base_" / "datasets" / "pascal_context.yaml").data.num_classes == 59  # the benchmark
    for name in ("hrnet48", "r101"):  # Specialize and Fuse 5.1.1: LR 0.001, 200 epochs of 4,998 images, batch 16, crop 512
        cfg = load_config(CONFIGS / "pyramid" / f"pascal_context_{name}.yaml")
        assert (cfg.data.dataset, cfg.optim.lr, cfg.data.batch_size, cfg.data.train_pipeline.crop_size) == \
            ("pascal_context", 0.001, 16, (512, 512))
        assert cfg.train.iters == 200 * 4998 // 16 and cfg.model.head.structure == "pyramid"


def test_paper_config_trains_and_evaluates_on_ade20k_files(tmp_path):
    root = tmp_path / "ADEChallengeData2016"
    labels = _ade20k_tree(root)
    work = tmp_path / "run"
    overrides = [f"data.root={root}", "data.train_pipeline.photometric=true", "data.repeat_factor_threshold=0.5"]
    assert main(["train", str(CONFIGS / "ess" / "ade20k_r50.yaml"), *overrides, *TINY_FILE_RUN,
                 "model.backbone=resnet_tiny", "data.batch_size=2", "--work-dir", str(work)]) == 0
    assert json.loads((work / "eval" / "iter_000004" / "metrics.json").read_text())["iteration"] == 4
    # the evaluation counted the val images' pixels per class after reduce-zero-label (0 -> ignore, k -> k - 1)
    rows = (work / "eval" / "iter_000004" / "per_class.csv").read_text().splitlines()[1:]
    label_area = np.array([int(r.split(",")[-1]) for r in rows])
    val = np.concatenate([lab.ravel() for name, lab in labels.items() if name.startswith("ADE_valid")])
    expected = np.bincount(val[val > 0].astype(np.int64) - 1, minlength=150)
    np.testing.assert_array_equal(label_area, expected)
    assert (work / "cache").is_dir()  # repeat-factor class sets cached in the work dir


def test_check_data_reports_a_clean_tree_and_a_broken_one(tmp_path, capsys):
    root = tmp_path / "ADEChallengeData2016"
    _ade20k_tree(root)
    args = ["check-data", str(CONFIGS / "_base_" / "datasets" / "ade20k.yaml"), f"data.root={root}", "data.num_workers=0", "--no-progress"]
    assert main(args) == 0
    bad = root / "annotations" / "validation" / "ADE_valid_00000001.png"
    Image.fromarray(np.full((40, 48), 151, np.uint8), mode="L").save(bad)
    assert main(args) == 1
    assert "ADE_valid_00000001.png" in capsys.readouterr().out
