"""Every command line shown in README.md and docs/*.md runs, on tiny data.

The commands are read from the fenced blocks of the documents (`scaleseg ...`, `torchrun ... -m
scaleseg ...`, `python -m scaleseg ...`; `\\` continuations joined, `# comments` dropped) and looked up
in COMMANDS, the table below, which says for each exactly what is substituted to run it here: tiny
overrides appended (a few iterations, small images and crops), smaller benchmark settings, the user's
own files (a photo, a weights file, `configs/my.yaml`) made in the workspace in the real formats, and
datasets written in their published layouts where the configs expect them (`data/ade/...`,
`lvis_v1_train.json`, ...). Every command runs in one temporary workspace (a copy of `configs/`, the
data, `HOME` for `~`), in the order of the documents; a command that reads another's output (e.g.
`scaleseg eval work_dirs/default`) names it in `needs`, which is run first.

A command in the documents that the table does not cover fails `test_every_documented_command_is_covered`,
so no documented command can break unseen; an entry whose command left the documents fails it too.
Kinds: "run" (in this process, `scaleseg.cli.main`), "torchrun" (a subprocess under
`python -m torch.distributed.run`), "parse" (cannot run here: the reason is given; the command line
and its config are parsed and loaded), "synopsis" (a usage line: every option it names must exist),
"exempt" (with the reason). `bench memory` and `bench speed` measure their configurations in this
process rather than one fresh process each (see `bench_children_in_process`).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from PIL import Image

from scaleseg.cli import build_parser, main, parse_args
from scaleseg.config import load_config

REPO = Path(__file__).resolve().parents[1]
DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]

# ------------------------------------------------------------------------------- reading the documents
_COMMAND = re.compile(r"(^|&&\s*|\s)(\S*/)?(scaleseg|torchrun)(\s|$)|python3? -m scaleseg")
_SHELL_BLOCKS = ("", "bash", "sh", "shell", "console")


def documented_commands() -> dict[str, list[str]]:
    """{command, normalised: [where it is shown, "README.md:57", ...]} over the fenced shell blocks."""
    found: dict[str, list[str]] = {}

    def add(item):
        if item is not None:
            text = " ".join(re.sub(r"\s+#\s.*$", "", item[1]).split())
            found.setdefault(text, []).append(item[0])

    for path in DOCUMENTS:
        inside, lang, pending = False, "", None
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if line.lstrip().startswith("```"):
                add(pending)
                pending = None
                inside, lang = (False, "") if inside else (True, line.strip()[3:].strip())
                continue
            if not inside or lang not in _SHELL_BLOCKS:
                continue
            if pending is not None and (pending[1].endswith("\\") or (line[:1].isspace() and line.strip())):
                pending = (pending[0], pending[1].rstrip("\\").rstrip() + " " + line.strip())  # a continuation
                continue
            add(pending)
            pending = (f"{path.name}:{number}", line.strip()) if _COMMAND.search(line) else None
        add(pending)
    return found


# ------------------------------------------------------------------------------- the substitutions
# A run of the built-in default that takes seconds (tests/conftest.py): 40 classes, 64x64, 6 iterations
# with checkpoints at 3 and 6.
from conftest import TINY  # noqa: E402

TINY2 = [*TINY, "train.iters=2", "train.checkpoint_interval=2"]  # the same, 2 iterations
# A config of the paper's settings on a tiny dataset tree: 2 iterations of batch 2 on 32x32 crops
FILE_TINY = ["data.batch_size=2", "data.num_workers=0", "data.train_pipeline.crop_size=32", "model.decoder.channels=16",
             "model.decoder.low_level_channels=8", "train.iters=2", "train.log_interval=1", "train.eval_interval=0",
             "train.checkpoint_interval=2", "train.progress=false", "eval.crop_size=32", "eval.stride=24"]
PYRAMID_TINY = ["model.head.pyramid.unity_channels=8", "model.head.pyramid.semantic_channels=16"]
BENCH_TINY = ["--backbone", "resnet_tiny", "--crop", "32", "--batch", "2", "--no-progress"]
# the ResNet-50 benchmarks of the docs, on the tiny ResNet at 32x32 crops
TINY_NET = [("--backbone resnet50", "--backbone resnet_tiny"), ("--crop 256", "--crop 32")]
BENCH_SET = [a for o in ["data.synthetic.image_size=48", "data.train_pipeline.crop_size=32", "data.synthetic.train_length=16",
                         "data.synthetic.val_length=2", "model.decoder.channels=16", "model.decoder.low_level_channels=8",
                         "data.num_workers=0", "data.batch_size=2", "train.deterministic=true"] for a in ("--set", o)]


@dataclass
class Case:
    how: str = "run"  # run | torchrun | parse | synopsis | exempt
    replace: list[tuple[str, str]] = field(default_factory=list)  # exact substrings of the command, each once
    append: list[str] = field(default_factory=list)  # arguments added at the end (overrides are accepted anywhere)
    needs: list[str] = field(default_factory=list)  # documented commands, or "data:<name>" / "file:<name>", made first
    why: str = ""  # what cannot run here and why (parse / exempt), or what a substitution stands for
    check: Callable | None = None  # (workspace) -> None, more assertions after the command
    rc: int = 0


def metrics(path: str):
    def check(ws: Path) -> None:
        data = json.loads((ws / path / "metrics.json").read_text())
        assert data["mIoU"] is not None and data["skipped_samples"] == 0, data
    return check


def _assert(condition: bool) -> None:
    assert condition


def table9_in(path: str):
    """metrics.json of a pyramid evaluation holds S&F Table 9's cells for the levels that decided pixels."""
    def check(ws: Path) -> None:
        data = json.loads((ws / path / "metrics.json").read_text())
        deciding = [s for s in (32, 16, 8, 4) if (data.get(f"level_stride_{s}") or 0) > 0]
        assert deciding and all(f"table9_pixels{s}_level4" in data for s in deciding), data
    return check


def files(*paths: str):
    def check(ws: Path) -> None:
        for p in paths:
            assert (ws / p).exists(), p
    return check


def all_ok(path: str, key: str = "results"):
    def check(ws: Path) -> None:
        records = json.loads((ws / path).read_text())
        records = records[key] if isinstance(records, dict) else records
        assert records and all(r.get("status") == "ok" for r in records), records
    return check


def quiet_accuracy_run(out_dir: str) -> dict:
    """Case fields of a documented `bench accuracy` run: BENCH_SET's tiny data appended, no progress bar,
    and every record of bench_results/<out_dir>/accuracy.json ok."""
    return {"append": [*BENCH_SET, "--no-progress"], "check": all_ok(f"bench_results/{out_dir}/accuracy.json", "records")}


def resumable(path: str):
    """A `bench accuracy --resume` output: every run ok, its batch searches kept, each run's checkpoints."""
    def check(ws: Path) -> None:
        all_ok(f"{path}/accuracy.json", "records")(ws)
        searched = json.loads((ws / path / "batch_search.json").read_text())["batches"]
        records = json.loads((ws / path / "accuracy.json").read_text())["records"]
        assert {(b["variant"], b["num_classes"]) for b in searched} == {(r["variant"], r["num_classes"]) for r in records}
        assert all(list((ws / r["work_dir"]).glob("iter_*.pth")) for r in records), records
    return check


def speed_ok(path: str):
    """speed.json: every (head, C) measured, each part (training step, inference) with status ok."""
    def check(ws: Path) -> None:
        records = json.loads((ws / path).read_text())["results"]
        parts = [(k, v) for r in records for k, v in r.items() if isinstance(v, dict) and "status" in v]
        no_inference = "--no-inference" in json.loads((ws / path).read_text())["settings"]["command"]
        assert records and parts and all(v["status"] == "ok" or (k == "inference" and no_inference and v["status"] == "skipped")
                                         for k, v in parts), records
    return check


def resumed(path: str):
    def check(ws: Path) -> None:
        assert "resumed from" in (ws / path / "train.log").read_text()
    return check


COMMANDS: dict[str, Case] = {
    # ---- README: set-up
    "python3 -m venv .venv && .venv/bin/pip install torch==2.13.0 -e . && .venv/bin/scaleseg train": Case(
        "exempt", why="creates a virtual environment and installs the package from the network (minutes); .ci/run "
        "does exactly this on a clean checkout, and its `scaleseg train` is the `scaleseg train` entry below"),
    # ---- README: Train
    "scaleseg train": Case(append=TINY, check=metrics("work_dirs/default/eval/iter_000006")),
    "scaleseg train configs/synthetic/resnet50.yaml": Case(append=TINY2, check=metrics("work_dirs/synthetic_resnet50/eval/iter_000002")),
    "scaleseg train configs/synthetic/resnet50.yaml model.backbone=mobilenet_v2 train.iters=200": Case(
        append=[*TINY2, "--work-dir", "work_dirs/mnv2"], check=metrics("work_dirs/mnv2/eval/iter_000002"),
        why="train.iters=2 after the documented 200 (the last value wins); its own work dir"),
    "scaleseg train configs/synthetic/resnet50.yaml --work-dir runs/r50 --resume": Case(
        append=[*TINY2, "train.iters=4", "train.checkpoint_interval=2"], needs=["file:runs/r50"],
        check=resumed("runs/r50"), why="runs/r50 first holds a 2-iteration run of the config, which this continues to 4"),
    # ---- README: Several GPUs (torchrun)
    "torchrun --standalone --nproc_per_node=2 -m scaleseg train data.batch_size=4": Case(
        "torchrun", append=[*TINY2, "--work-dir", "work_dirs/ddp2"], check=metrics("work_dirs/ddp2/eval/iter_000002")),
    "torchrun --nproc_per_node=4 -m scaleseg train configs/ess/ade20k_r50.yaml data.batch_size=4": Case(
        "torchrun", append=[*FILE_TINY, "data.batch_size=2", "model.backbone=resnet_tiny", "--work-dir", "work_dirs/ddp4"],
        needs=["data:ade20k"], check=metrics("work_dirs/ddp4/eval/iter_000002"),
        why="4 CPU processes (Gloo); resnet_tiny for resnet50, batch 2 per process for the 2 ADE20K images"),
    "torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --master_addr=host0 --master_port=29500 -m scaleseg train "
    "configs/ess/cocolvis_r50.yaml data.batch_size=2": Case(
        "parse", needs=["data:coco_lvis"],
        why="two nodes (host0 and a second machine) with 8 GPUs each cannot run here; torchrun's own parser takes "
        "the launcher options, and the command after -m scaleseg is parsed, its config loaded and its dataset read"),
    "torchrun --nproc_per_node=4 -m scaleseg train ... --work-dir runs/a --resume": Case(
        "torchrun", replace=[("...", "configs/ess/ade20k_r50.yaml")],
        append=[*FILE_TINY, "model.backbone=resnet_tiny", "train.iters=4"], needs=["data:ade20k", "file:runs/a"],
        check=resumed("runs/a"),
        why="`...` is the run's own config and overrides (here ade20k_r50 on tiny data); runs/a first holds a "
        "2-iteration run of it by one process, which 4 processes continue to 4 iterations"),
    # ---- README: Evaluate
    "scaleseg eval work_dirs/default": Case(needs=["scaleseg train"], check=metrics("work_dirs/default/eval/best")),
    "scaleseg eval work_dirs/default --checkpoint work_dirs/default/iter_000600.pth": Case(
        replace=[("iter_000600.pth", "iter_000003.pth")], needs=["scaleseg train"],
        check=metrics("work_dirs/default/eval/iter_000003"),
        why="the tiny run's half-way checkpoint (iteration 3 of 6) stands for iteration 600 of 1200"),
    "scaleseg eval configs/my.yaml --checkpoint my.pth eval.mode=slide eval.crop_size=512 eval.stride=341": Case(
        needs=["scaleseg train", "file:my"], check=metrics("eval/my"),
        why="configs/my.yaml and my.pth, the user's own, are the default run's config.yaml and best.pth"),
    "scaleseg eval work_dirs/default eval.scales=[0.5,0.75,1.0,1.25,1.5,1.75] eval.flip=true": Case(
        needs=["scaleseg train"], append=["--out", "eval/multiscale"], check=metrics("eval/multiscale")),
    # ---- README: Predict
    "scaleseg predict work_dirs/default/best.pth photo.jpg --out preds/": Case(
        needs=["scaleseg train", "file:photos"], check=files("preds/photo.png", "preds/photo_overlay.png")),
    "scaleseg predict work_dirs/default/best.pth images/ --out preds/ eval.mode=slide": Case(
        needs=["scaleseg train", "file:photos"], check=files("preds/a.png", "preds/sub/c.png")),
    "scaleseg predict work_dirs/default/best.pth images/ --out preds/ --batch-size 16 --workers 4": Case(
        needs=["scaleseg train", "file:photos"], check=files("preds/b.png", "preds/sub/c_overlay.png")),
    # ---- README: Export
    "scaleseg export work_dirs/default/best.pth --format onnx": Case(
        needs=["scaleseg train"], check=files("work_dirs/default/best.onnx", "work_dirs/default/best.json")),
    "scaleseg export work_dirs/default/best.pth --format safetensors --out served/model.safetensors": Case(
        needs=["scaleseg train"], check=files("served/model.safetensors", "served/model.json")),
    # ---- README: The embedding scorer
    "scaleseg train model.head.scorer=embedding": Case(
        append=[*TINY, "--work-dir", "work_dirs/synthetic_ess"], check=metrics("work_dirs/synthetic_ess/eval/iter_000006"),
        why="into work_dirs/synthetic_ess (the work dir of configs/synthetic/ess.yaml), not work_dirs/default (which the eval/predict/export lines read); analyze reads it"),
    "scaleseg train configs/ess/ade20k_r50.yaml": Case(
        append=FILE_TINY, needs=["data:ade20k"], check=metrics("work_dirs/ess_ade20k_r50/eval/iter_000002")),
    "scaleseg train model.head.scorer=embedding model.head.embedding.loss=full": Case(
        append=[*TINY2, "--work-dir", "work_dirs/ess_full"], check=metrics("work_dirs/ess_full/eval/iter_000002")),
    "scaleseg bench memory --classes 19,1284,20000 --heads baseline,ess-knn": Case(
        replace=[("19,1284,20000", "10,300")], append=[*BENCH_TINY, "--out", "bench/mem_a"],
        check=all_ok("bench/mem_a/memory.json"), why="C = 10 and 300 on resnet_tiny 32x32 crops"),
    # ---- README: The pyramidal output
    "scaleseg train configs/synthetic/pyramid.yaml": Case(append=TINY, check=metrics("work_dirs/synthetic_pyramid/eval/iter_000006")),
    "scaleseg train configs/synthetic/pyramid_ess.yaml": Case(
        append=TINY2, check=metrics("work_dirs/synthetic_pyramid_ess/eval/iter_000002")),
    "scaleseg train configs/pyramid/ade20k_hrnet48.yaml": Case(
        append=[*FILE_TINY, *PYRAMID_TINY, "model.backbone=hrnet_tiny"], needs=["data:ade20k"],
        check=metrics("work_dirs/pyramid_ade20k_hrnet48/eval/iter_000002"),
        why="hrnet_tiny for HRNetV2-W48 (65 M parameters) and narrow pyramid heads"),
    "scaleseg train configs/synthetic/single_semantic.yaml": Case(
        append=TINY2, check=metrics("work_dirs/synthetic_single_semantic/eval/iter_000002")),
    "scaleseg analyze work_dirs/synthetic_pyramid --loss-gradients 8": Case(
        needs=["scaleseg train configs/synthetic/pyramid.yaml"], replace=[("--loss-gradients 8", "--loss-gradients 2")],
        append=["--no-progress"], check=files("work_dirs/synthetic_pyramid/analysis/summary.json"),
        why="2 training batches instead of 8"),
    "scaleseg bench accuracy --variants single-semantic-noctx,single-semantic-anl,pyramid-noctx,pyramid-anl,pyramid-anl-multi "
    "--classes 1000 --seeds 0 --iters 1200": Case(
        replace=[("--classes 1000", "--classes 10"), ("--iters 1200", "--iters 2")],
        append=[*BENCH_SET, "--set", "model.head.pyramid.semantic_channels=16", "--set", "model.head.pyramid.unity_channels=8",
                "--no-progress", "--out", "bench/acc_t6_columns"],
        check=all_ok("bench/acc_t6_columns/accuracy.json", "records"),
        why="C = 10, 2 iterations per run on 48x48 images, narrow pyramid heads"),
    "scaleseg bench accuracy --variants single,single-semantic,single-semantic-noctx,pyramid,pyramid-noctx "
    "--classes 1000 --seeds 0,1 --iters 1200": Case(
        replace=[("--classes 1000", "--classes 10"), ("--seeds 0,1", "--seeds 0"), ("--iters 1200", "--iters 2")],
        append=[*BENCH_SET, "--no-progress", "--out", "bench/acc_t6"], check=all_ok("bench/acc_t6/accuracy.json", "records"),
        why="C = 10, one seed, 2 iterations per run on 48x48 images"),
    "scaleseg eval work_dirs/synthetic_pyramid": Case(
        needs=["scaleseg train configs/synthetic/pyramid.yaml"], append=["--out", "eval/table9"],
        check=lambda ws: (metrics("eval/table9")(ws), table9_in("eval/table9")(ws))),
    "scaleseg eval work_dirs/synthetic_pyramid eval.pyramid_readout=finest": Case(
        needs=["scaleseg train configs/synthetic/pyramid.yaml"], append=["--out", "eval/finest"],
        check=lambda ws: (metrics("eval/finest")(ws),
                          _assert(json.loads((ws / "eval/finest/metrics.json").read_text())["level_stride_4"] == 100.0))),
    "scaleseg eval work_dirs/synthetic_pyramid model.head.pyramid.tau=1.0": Case(
        needs=["scaleseg train configs/synthetic/pyramid.yaml"], append=["--out", "eval/tau1"], check=metrics("eval/tau1")),
    # ---- README: Benchmarks and analyses
    "scaleseg bench memory --classes 19,1284,20000 --heads baseline,ess-knn,ess-full": Case(
        replace=[("19,1284,20000", "10")], append=[*BENCH_TINY, "--out", "bench/mem_b"], check=all_ok("bench/mem_b/memory.json")),
    "scaleseg bench memory ... --max-batch 8": Case(
        replace=[("...", "--classes 10 --heads baseline")], append=[*BENCH_TINY, "--max-batch-limit", "4", "--out", "bench/mem_c"],
        check=all_ok("bench/mem_c/memory.json"), why="`...` is the run's classes and heads; batches tried up to 4"),
    "scaleseg bench speed --classes 19,1284,20000": Case(
        replace=[("19,1284,20000", "10")],
        append=[*BENCH_TINY, "--repeats", "1", "--warmup", "0", "--knn-pixels", "64", "--out", "bench/speed_a"],
        check=speed_ok("bench/speed_a/speed.json")),
    "scaleseg bench accuracy --classes 150,1000 --seeds 0,1": Case(
        replace=[("150,1000", "10")], append=["--iters", "2", *BENCH_SET, "--no-progress", "--out", "bench/acc_a"],
        check=all_ok("bench/acc_a/accuracy.json", "records"), why="C = 10, 2 iterations per run on 48x48 images"),
    "scaleseg analyze work_dirs/synthetic_ess --compare work_dirs/default": Case(
        needs=["scaleseg train model.head.scorer=embedding", "scaleseg train"], append=["--images", "1", "--no-progress"],
        check=files("work_dirs/synthetic_ess/analysis/summary.json")),
    # ---- README: Datasets
    "scaleseg prepare coco-lvis --lvis lvis_v1_train.json --stuff stuff_train2017.json --images data/coco "
    "--out data/coco_lvis --split train": Case(
        append=["--workers", "1", "--no-progress"], needs=["data:coco_json"], check=files("data/coco_lvis/train.txt")),
    "scaleseg prepare coco-lvis --lvis lvis_v1_val.json --stuff stuff_val2017.json stuff_train2017.json --images data/coco "
    "--out data/coco_lvis --split val": Case(
        append=["--workers", "1", "--no-progress"], needs=["data:coco_json"], check=files("data/coco_lvis/val.txt")),
    "scaleseg prepare pascal-context --voc data/voc2010/VOCdevkit/VOC2010 --json data/voc2010/trainval_merged.json": Case(
        append=["--no-progress"], needs=["data:pascal_context"],
        check=files("data/voc2010/VOCdevkit/VOC2010/ImageSets/SegmentationContext/val.txt")),
    "scaleseg train configs/pyramid/pascal_context_hrnet48.yaml": Case(
        append=[*FILE_TINY, *PYRAMID_TINY, "model.backbone=hrnet_tiny"],
        needs=["scaleseg prepare pascal-context --voc data/voc2010/VOCdevkit/VOC2010 --json data/voc2010/trainval_merged.json"],
        check=metrics("work_dirs/pyramid_pascal_context_hrnet48/eval/iter_000002"),
        why="hrnet_tiny for HRNetV2-W48 and narrow pyramid heads"),
    "scaleseg train configs/ess/ade20k_r50.yaml data.root=/data/ADEChallengeData2016 "
    "model.pretrained=~/weights/resnet50-11ad3fa6.pth": Case(
        replace=[("data.root=/data/ADEChallengeData2016", "data.root=data/ade/ADEChallengeData2016")],
        append=[*FILE_TINY, "--work-dir", "work_dirs/ade20k_r50_imagenet"], needs=["data:ade20k", "file:resnet50_weights"],
        check=metrics("work_dirs/ade20k_r50_imagenet/eval/iter_000002"),
        why="the tiny ADE20K tree for /data/...; ~ is the workspace's HOME, where weights/resnet50-11ad3fa6.pth is "
        "a torchvision-format ResNet-50 state dict (random values, classifier included)"),
    # ---- docs/analysis.md
    "scaleseg analyze WORK_DIR | CKPT.pth [key=value ...] [--out DIR] [--images N] [--clusters K] "
    "[--compare OTHER_WORK_DIR] [--leaves N] [--top-classes N] [--frequency-split train|val] [--frequency-images N] "
    "[--no-progress]": Case("synopsis", why="the usage line of `scaleseg analyze`; its run is the next entry"),
    "scaleseg analyze /tmp/exp/final_ess_s0 train.device=cpu --out docs/img/analysis --compare /tmp/exp/final_base_s0 "
    "--top-classes 60 --images 2": Case(
        replace=[("/tmp/exp/final_ess_s0", "work_dirs/synthetic_ess"), ("/tmp/exp/final_base_s0", "work_dirs/default"),
                 ("--top-classes 60", "--top-classes 30")],
        append=["--no-progress"], needs=["scaleseg train model.head.scorer=embedding", "scaleseg train"],
        check=files("docs/img/analysis/summary.json"),
        why="the two 1000-class runs of docs/ess.md are the tiny 40-class ESS and baseline runs (30 of their classes)"),
    # ---- docs/benchmarks.md
    "scaleseg bench memory --classes 19,150,1284,20000,100000 --heads baseline,ess-knn,ess-full --backbone resnet50 "
    "--batch 2 --crop 256 --limit-gb 20 --out bench_results/memory": Case(
        replace=[("19,150,1284,20000,100000", "10"), *TINY_NET],
        append=["--no-progress"], check=all_ok("bench_results/memory/memory.json")),
    "scaleseg bench memory --classes 19,1284,20000,100000 --heads pyramid-linear,pyramid-ess --backbone resnet50 "
    "--batch 2 --crop 256 --limit-gb 20 --out bench_results/memory_pyramid": Case(
        replace=[("19,1284,20000,100000", "10"), *TINY_NET],
        append=["--set", "model.head.pyramid.semantic_channels=16", "--no-progress"],
        check=all_ok("bench_results/memory_pyramid/memory.json")),
    "scaleseg bench memory --classes 19,1284 --heads baseline,ess-knn --backbone resnet50 --batch 2 --crop 256 "
    "--limit-gb 20 --max-batch 4 --max-batch-limit 32 --out bench_results/max_batch": Case(
        replace=[("19,1284", "10"), *TINY_NET,
                 ("--max-batch-limit 32", "--max-batch-limit 4")],
        append=["--no-progress"], check=all_ok("bench_results/max_batch/memory.json")),
    "scaleseg bench speed --classes 19,1284,20000 --heads baseline,ess-knn,ess-full --backbone resnet50 --batch 2 "
    "--crop 256 --device auto --loss-resolution full --warmup 1 --repeats 3 --knn-pixels 8192 --limit-gb 20 "
    "--out bench_results/speed": Case(
        replace=[("19,1284,20000", "10"), *TINY_NET,
                 ("--repeats 3", "--repeats 1"), ("--knn-pixels 8192", "--knn-pixels 64")],
        append=["--no-progress"], check=speed_ok("bench_results/speed/speed.json")),
    # ---- docs/benchmarks.md: issue 14, ESS supplementary C's remedies
    "scaleseg bench speed --classes 19,20000,100000,1000000 --heads baseline@19,ess-knn-cached@20000,ess-full-cached@20000,"
    "ess-knn-cached-ivf,ess-knn-fast --backbone resnet50 --batch 2 --crop 256 --loss-resolution full --warmup 1 --repeats 2 "
    "--rounds 2 --knn-pixels 1024 --limit-gb 12 --out bench_results/speed_remedies --no-progress": Case(
        replace=[("19,20000,100000,1000000", "10,300"), ("baseline@19,", "baseline,"), *TINY_NET, ("--repeats 2", "--repeats 1"),
                 ("--knn-pixels 1024", "--knn-pixels 64")],
        check=speed_ok("bench_results/speed_remedies/speed.json"),
        why="C = 10 and 300 on resnet_tiny 32x32 crops; the baseline at both (HEAD@C would leave a skipped record)"),
    "scaleseg bench speed --classes 19,100000,1000000 --heads baseline@19,ess-knn-fast --backbone resnet50 --batch 2 --crop 256 "
    "--loss-resolution full --warmup 1 --repeats 2 --rounds 2 --knn-pixels 0 --no-inference --limit-gb 12 "
    "--out bench_results/speed_fast --no-progress": Case(
        replace=[("19,100000,1000000", "10,300"), ("baseline@19,", "baseline,"), *TINY_NET, ("--repeats 2", "--repeats 1")],
        check=speed_ok("bench_results/speed_fast/speed.json"),
        why="C = 10 and 300 on resnet_tiny 32x32 crops; the baseline at both (HEAD@C would leave a skipped record)"),
    "scaleseg bench speed --classes 20000 --heads ess-knn-cached,ess-full-cached --backbone resnet50 --batch 2 --crop 256 "
    "--loss-resolution full --warmup 1 --repeats 2 --rounds 3 --knn-pixels 0 --no-inference --limit-gb 12 "
    "--out bench_results/speed_exact_loss --no-progress": Case(
        replace=[("--classes 20000", "--classes 300"), *TINY_NET,
                 ("--repeats 2", "--repeats 1"), ("--rounds 3", "--rounds 1")],
        check=speed_ok("bench_results/speed_exact_loss/speed.json"),
        why="C = 300 on resnet_tiny 32x32 crops, one round"),
    "scaleseg bench speed --classes 1284,20000,100000 --heads baseline@1 --backbone resnet50 --batch 2 --crop 256 "
    "--knn-pixels 8192 --no-inference --out bench_results/search_methods --no-progress": Case(
        replace=[("1284,20000,100000", "50,300"), *TINY_NET,
                 ("--knn-pixels 8192", "--knn-pixels 256")],
        check=lambda ws: _assert(len(json.loads((ws / "bench_results/search_methods/speed.json").read_text())["knn_backends"]) == 2),
        why="C = 50 and 300, 256 queries (the search methods alone: baseline@1 trains nothing)"),
    "scaleseg bench memory --classes 19,1000000 --heads ess-knn-fast --backbone resnet50 --batch 2 --crop 256 --steps 2 "
    "--loss-resolution full --limit-gb 12 --out bench_results/memory_fast --no-progress": Case(
        replace=[("19,1000000", "10,300"), *TINY_NET],
        check=all_ok("bench_results/memory_fast/memory.json"), why="C = 10 and 300 on resnet_tiny 32x32 crops"),
    "scaleseg bench memory --classes 19,1000000 --heads ess-knn-fast --backbone resnet50 --batch 2 --crop 512 --steps 2 "
    "--loss-resolution full --limit-gb 16 --out bench_results/memory_fast_crop512 --no-progress": Case(
        replace=[("19,1000000", "10,300"), ("--backbone resnet50", "--backbone resnet_tiny"), ("--crop 512", "--crop 32")],
        check=all_ok("bench_results/memory_fast_crop512/memory.json"), why="C = 10 and 300 on resnet_tiny 32x32 crops"),
    "scaleseg bench accuracy --variants ess-exact,ess-cached,ess-block4,ess-ivf,ess-fast,ess-block2 --classes 1000 --seeds 0,1 "
    "--iters 300 --set data.batch_size=4 --set data.train_pipeline.crop_size=64 --out bench_results/accuracy_C1000 --no-progress": Case(
        replace=[("--classes 1000", "--classes 10"), ("--iters 300", "--iters 2"), ("--seeds 0,1", "--seeds 0")],
        append=BENCH_SET, check=all_ok("bench_results/accuracy_C1000/accuracy.json", "records"),
        why="C = 10, one seed, 2 iterations per run on 48x48 images"),
    "scaleseg bench accuracy --variants baseline,ess-knn,ess-full --classes 1000,5000,20000 --seeds 0,1 --iters 1200 "
    "--memory-budget-gb 1 --max-batch-limit 32 --out bench_results/accuracy_budget": Case(
        replace=[("--classes 1000,5000,20000", "--classes 10"), ("--iters 1200", "--iters 2"), ("--seeds 0,1", "--seeds 0"),
                 ("--max-batch-limit 32", "--max-batch-limit 2")],
        **quiet_accuracy_run("accuracy_budget"),
        why="C = 10, one seed, 2 iterations at 48x48, the batch search limited to 2 (each trial a fresh process)"),
    "scaleseg bench accuracy --variants baseline --classes 5000 --seeds 0 --iters 1200 --memory-budget-gb 1 "
    "--max-batch-limit 32 --set train.grad_accum=4 --out bench_results/accuracy_budget_ga": Case(
        replace=[("--classes 5000", "--classes 10"), ("--iters 1200", "--iters 4"), ("--max-batch-limit 32", "--max-batch-limit 2")],
        **quiet_accuracy_run("accuracy_budget_ga"),
        why="C = 10, 4 iterations' images (one step of 2 x 4) at 48x48, the batch search limited to 2"),
    "scaleseg bench accuracy --variants baseline --classes 5000 --seeds 0 --iters 1200 --memory-budget-gb 1 "
    "--max-batch-limit 32 --set model.norm=group --set model.group_norm_channels=8 --out bench_results/accuracy_budget_gn": Case(
        replace=[("--classes 5000", "--classes 10"), ("--iters 1200", "--iters 2"), ("--max-batch-limit 32", "--max-batch-limit 2")],
        **quiet_accuracy_run("accuracy_budget_gn"),
        why="C = 10, 2 iterations at 48x48, the batch search limited to 2 (each trial a fresh process)"),
    "scaleseg bench accuracy --variants baseline,ess-knn,ess-full --classes 20000 --seeds 0,1 --iters 1200 --memory-budget-gb 1 "
    "--max-batch-limit 32 --set train.checkpoint_interval=250 --out bench_results/accuracy_budget_20k --resume": Case(
        replace=[("--classes 20000", "--classes 10"), ("--iters 1200", "--iters 2"), ("--seeds 0,1", "--seeds 0"),
                 ("--max-batch-limit 32", "--max-batch-limit 2"), ("checkpoint_interval=250", "checkpoint_interval=1")],
        append=[*BENCH_SET, "--no-progress"], check=resumable("bench_results/accuracy_budget_20k"),
        why="C = 10, one seed, 2 iterations at 48x48 with a checkpoint every iteration, the batch search limited to 2"),
    "scaleseg bench accuracy --variants single-semantic,pyramid --classes 1000 --seeds 0,1 --iters 1200 --set "
    "data.synthetic.image_size=320 --set data.train_pipeline.crop_size=256 --set data.batch_size=4 "
    "--out bench_results/pyramid_crop256": Case(
        replace=[("--classes 1000", "--classes 10"), ("--iters 1200", "--iters 2"), ("--seeds 0,1", "--seeds 0")],
        **quiet_accuracy_run("pyramid_crop256"),
        why="C = 10, one seed, 2 iterations (BENCH_SET's 48x48 images, 32x32 crops and batch 2, given last, win)"),
    "scaleseg bench accuracy --variants ess-knn,ess-sphere,ess-sphere-x3 --classes 1000 --seeds 0 --iters 1200 "
    "--out bench_results/accuracy_lr": Case(
        replace=[("--classes 1000", "--classes 10"), ("--iters 1200", "--iters 2")],
        **quiet_accuracy_run("accuracy_lr"),
        why="C = 10, 2 iterations per run on 48x48 images"),
    "scaleseg bench accuracy --variants ess-ivf,ess-fast --classes 1000 --seeds 0,1 --iters 300 --set data.batch_size=4 "
    "--set data.train_pipeline.crop_size=64 --out bench_results/accuracy_index --no-progress": Case(
        replace=[("--classes 1000", "--classes 10"), ("--iters 300", "--iters 2"), ("--seeds 0,1", "--seeds 0")],
        append=BENCH_SET, check=all_ok("bench_results/accuracy_index/accuracy.json", "records"),
        why="C = 10, one seed, 2 iterations per run on 48x48 images"),
    "scaleseg bench accuracy --variants ess-exact,ess-cached,ess-block4,ess-ivf,ess-fast,ess-block2 --classes 5000 --seeds 0,1 "
    "--iters 300 --set data.batch_size=4 --set data.train_pipeline.crop_size=64 --out bench_results/accuracy_C5000 --no-progress": Case(
        replace=[("--classes 5000", "--classes 10"), ("--iters 300", "--iters 2"), ("--seeds 0,1", "--seeds 0")],
        append=BENCH_SET, check=all_ok("bench_results/accuracy_C5000/accuracy.json", "records"),
        why="C = 10, one seed, 2 iterations per run on 48x48 images"),
    "scaleseg bench accuracy --out bench_results/accuracy": Case(
        append=["--classes", "10", "--iters", "2", *BENCH_SET, "--no-progress"],
        check=all_ok("bench_results/accuracy/accuracy.json", "records"),
        why="every variant, C = 10 instead of 150 and 1000, 2 iterations per run on 48x48 images"),
}


# ------------------------------------------------------------------------------- the workspace
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ade20k(root: Path) -> None:
    """ADEChallengeData2016: 4 training and 2 validation JPEGs (40x48) with uint8 annotations 0..150."""
    rng = np.random.default_rng(0)
    for split, n in (("training", 4), ("validation", 2)):
        for i in range(n):
            name = f"ADE_{split[:5]}_{i:08d}"
            label = rng.integers(0, 151, size=(40, 48)).astype(np.uint8)
            for folder, array in (("images", rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)), ("annotations", label)):
                (root / folder / split).mkdir(parents=True, exist_ok=True)
                Image.fromarray(array).save(root / folder / split / f"{name}.{'jpg' if folder == 'images' else 'png'}")


def _coco_json(ws: Path) -> None:
    """lvis_v1_{train,val}.json, stuff_{train,val}2017.json in the published formats, and data/coco images."""
    from tests.data import test_coco_lvis as c

    for name, data in (("lvis_v1_train.json", c.lvis_json(c.IMAGES, c.LVIS_ANNS)),
                       ("lvis_v1_val.json", c.lvis_json(c.IMAGES, c.LVIS_ANNS)),
                       ("stuff_val2017.json", c.stuff_json([c.image(1, "val2017", 6, 8)], c.STUFF_VAL)),
                       ("stuff_train2017.json", c.stuff_json([c.image(2, "train2017", 4, 5), c.image(3, "train2017", 3, 3)],
                                                             c.STUFF_TRAIN[:3]))):
        (ws / name).write_text(json.dumps(data))
    for im in c.IMAGES:
        folder = ws / "data" / "coco" / im["coco_url"].split("/")[-2]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((im["height"], im["width"], 3), 50, np.uint8)).save(folder / f"{im['id']:012d}.jpg")


def _pascal_context(ws: Path) -> None:
    """VOCdevkit/VOC2010/JPEGImages (4 train, 2 val images of 40x48) and a Detail-API trainval_merged.json."""
    from pycocotools import mask as mask_utils

    root = ws / "data" / "voc2010"
    (root / "VOCdevkit" / "VOC2010" / "JPEGImages").mkdir(parents=True)
    rng = np.random.default_rng(1)
    images, annotations = [], []
    for k in range(6):
        name = f"2008_{k:06d}"
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(
            root / "VOCdevkit" / "VOC2010" / "JPEGImages" / f"{name}.jpg")
        images.append({"image_id": 2008000000 + k, "file_name": f"{name}.jpg", "height": 40, "width": 48,
                       "phase": "val" if k >= 4 else "train"})
        for j, category in enumerate((360, 440, 284)):  # sky, wall, person
            mask = np.zeros((40, 48), np.uint8)
            mask[j * 12 + k: j * 12 + k + 14, : 40 - 4 * j] = 1
            rle = mask_utils.encode(np.asfortranarray(mask))
            annotations.append({"id": len(annotations) + 1, "image_id": 2008000000 + k, "category_id": category,
                                "segmentation": {"size": [40, 48], "counts": rle["counts"].decode("ascii")}})
    (root / "trainval_merged.json").write_text(json.dumps({"images": images, "annos_segmentation": annotations,
                                                           "categories": [], "info": {}}))


class Workspace:
    """A temporary folder with a copy of configs/ in which the documented commands run; makes what a
    command needs on first use."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.status: dict[str, str] = {}  # command or need -> "running", "ok" or "failed"
        shutil.copytree(REPO / "configs", root / "configs")
        (root / "home").mkdir()

    def need(self, name: str) -> None:
        """Make `name` (run a documented command, or write a file or dataset) unless already done."""
        state = self.status.get(name)
        assert state != "failed", f"{name!r} failed earlier (see its own test)"
        if state is not None:
            return
        self.status[name] = "running"
        try:
            self._make(name)
        except BaseException:
            self.status[name] = "failed"
            raise
        self.status[name] = "ok"

    def _make(self, name: str) -> None:
        ws = self.root
        if name in COMMANDS:
            run(self, name)
        elif name == "data:ade20k":
            _ade20k(ws / "data" / "ade" / "ADEChallengeData2016")
        elif name == "data:coco_json":
            _coco_json(ws)
        elif name == "data:coco_lvis":
            for command in COMMANDS:
                if command.startswith("scaleseg prepare coco-lvis"):
                    self.need(command)
        elif name == "data:pascal_context":
            _pascal_context(ws)
        elif name == "file:my":  # the user's own config and checkpoint
            shutil.copy(ws / "work_dirs" / "default" / "config.yaml", ws / "configs" / "my.yaml")
            shutil.copy(ws / "work_dirs" / "default" / "best.pth", ws / "my.pth")
        elif name == "file:photos":  # photos of several sizes and kinds, one in a subfolder
            rng = np.random.default_rng(2)
            (ws / "images" / "sub").mkdir(parents=True)
            Image.fromarray(rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)).save(ws / "photo.jpg")
            Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(ws / "images" / "a.jpg")
            Image.fromarray(rng.integers(0, 256, (48, 64), dtype=np.uint8)).save(ws / "images" / "b.png")
            Image.fromarray(rng.integers(0, 256, (40, 40, 4), dtype=np.uint8)).save(ws / "images" / "sub" / "c.png")
        elif name == "file:runs/r50":  # a first, shorter run of the same config for --resume to continue
            assert main(["train", "configs/synthetic/resnet50.yaml", *TINY2, "--work-dir", "runs/r50"]) == 0
        elif name == "file:runs/a":
            assert main(["train", "configs/ess/ade20k_r50.yaml", *FILE_TINY, "model.backbone=resnet_tiny",
                         "--work-dir", "runs/a"]) == 0
        elif name == "file:resnet50_weights":  # torchvision's file format: the backbone's keys and fc
            from scaleseg.models.backbones import resnet50

            state = resnet50().state_dict()
            state.update({"fc.weight": torch.zeros(1000, 2048), "fc.bias": torch.zeros(1000)})
            (ws / "home" / "weights").mkdir()
            torch.save(state, ws / "home" / "weights" / "resnet50-11ad3fa6.pth")
        else:
            raise AssertionError(f"unknown need {name!r}")


@contextlib.contextmanager
def bench_children_in_process(argv: list[str]):
    """`bench memory` and `bench speed` measure each configuration in a fresh interpreter; here in this one
    (seconds instead of a minute per command; the one-process-per-configuration path is run by
    tests/test_bench.py and tests/test_bench_speed.py)."""
    if argv[1:2] != ["bench"]:
        yield
        return
    from scaleseg.bench import memory, speed

    def measure_here(head, num_classes, args, limit_gb, batch=None):
        batch = args.batch if batch is None else batch
        return {"head": head, "num_classes": num_classes, **memory.measure(
            head, num_classes, args.backbone, batch, args.crop, args.device, args.steps, args.loss_resolution,
            list(args.set or []))}

    patch = pytest.MonkeyPatch()
    patch.setattr(memory, "run_one_subprocess", measure_here)
    patch.setattr(speed, "run_child", lambda job: json.loads(json.dumps(speed.run_job(job))))
    try:
        yield
    finally:
        patch.undo()


def substituted(command: str, case: Case) -> list[str]:
    text = command
    for old, new in case.replace:
        assert text.count(old) == 1, f"substitution {old!r} must occur once in {command!r}"
        text = text.replace(old, new)
    return [*shlex.split(text), *case.append]


def run(ws: Workspace, command: str) -> None:
    case = COMMANDS[command]
    for need in case.needs:
        ws.need(need)
    argv = substituted(command, case)
    if case.how == "run":
        assert argv[0] == "scaleseg", argv
        with bench_children_in_process(argv):
            assert main(argv[1:]) == case.rc, f"{command!r} as {shlex.join(argv)}"
    elif case.how == "torchrun":
        assert argv[0] == "torchrun", argv
        env = {**os.environ, "HOME": str(ws.root / "home"), "PET_MASTER_PORT": str(_free_port()),
               "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", *argv[1:]], cwd=ws.root, env=env,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == case.rc, f"{shlex.join(argv)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    elif case.how == "parse":
        from torch.distributed.run import get_args_parser

        launcher = get_args_parser().parse_args(argv[1:])
        assert launcher.module and launcher.training_script == "scaleseg", launcher
        args = parse_args(launcher.training_script_args)
        cfg = load_config(args.args[0], args.args[1:])
        from scaleseg.data import build_dataset

        assert len(build_dataset(cfg.data, "train")) > 0
    elif case.how == "synopsis":
        program = argv[1]
        parser = build_parser()
        action = next(a for a in parser._subparsers._group_actions if a.dest == "command")  # noqa: SLF001
        options = set(action.choices[program]._option_string_actions)  # noqa: SLF001
        named = set(re.findall(r"(--[a-z][a-z-]*)", command))
        assert named and named <= options, f"{sorted(named - options)} are not options of `scaleseg {program}`"
    elif case.how == "exempt":
        assert case.why
    else:
        raise AssertionError(case.how)
    if case.check is not None:
        case.check(ws.root)


# ------------------------------------------------------------------------------- the tests
def coverage(documented: dict[str, list[str]]) -> tuple[dict[str, list[str]], list[str]]:
    """(documented commands COMMANDS lacks, COMMANDS entries no longer documented)."""
    return {c: w for c, w in documented.items() if c not in COMMANDS}, [c for c in COMMANDS if c not in documented]


def test_a_new_documented_command_is_caught(tmp_path, monkeypatch):
    """The extractor on a document of its own: shell blocks only, continuations joined, comments dropped."""
    doc = tmp_path / "new.md"
    doc.write_text("Run `scaleseg train` inline (not a block).\n```\nscaleseg train   model.backbone=resnet18  # new\n"
                   "scaleseg eval \\\n    work_dirs/x --out y\n\n```\n```python\nscaleseg = 1\n```\n"
                   "```bash\ntorchrun --standalone -m scaleseg train\n```\n")
    monkeypatch.setattr(sys.modules[__name__], "DOCUMENTS", [doc])
    found = documented_commands()
    assert found == {"scaleseg train model.backbone=resnet18": ["new.md:3"], "scaleseg eval work_dirs/x --out y": ["new.md:4"],
                     "torchrun --standalone -m scaleseg train": ["new.md:12"]}
    missing, stale = coverage(found)
    assert set(missing) == set(found) and "scaleseg train" in stale


def test_every_documented_command_is_covered():
    documented = documented_commands()
    missing, stale = coverage(documented)
    assert not missing, (
        "documented commands that tests/test_doc_commands.py does not run; add each to COMMANDS with what is "
        "substituted to run it on tiny data:\n" + "\n".join(f"  {w[0]}: {c}" for c, w in missing.items()))
    assert not stale, "COMMANDS entries no longer in the documents (remove them): " + "; ".join(stale)
    for command, case in COMMANDS.items():
        if case.how in ("parse", "exempt", "synopsis"):
            assert case.why, f"say why {command!r} is not run"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: two threads on a shared 2-core machine only wait for each other
    try:
        yield Workspace(tmp_path_factory.mktemp("docs"))
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("command", list(COMMANDS), ids=lambda c: c[:60])
def test_documented_command_runs(command, workspace, monkeypatch):
    monkeypatch.chdir(workspace.root)
    monkeypatch.setenv("HOME", str(workspace.root / "home"))
    workspace.need(command)  # unless it already ran (and was checked) as an earlier command's need
