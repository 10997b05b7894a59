import json
import math

import pytest
import torch

from scaleseg.cli import main
from scaleseg.config import load_config
from scaleseg.data.datasets import SyntheticSegmentation
from scaleseg.data.transforms import EvalTransform
from scaleseg.engine import trainer as trainer_module
from scaleseg.engine.checkpoint import load_checkpoint
from scaleseg.engine.trainer import Trainer
from scaleseg.errors import CheckpointError, ConfigError
from scaleseg.models import build_model


def read_scalars(work_dir):
    rows = [json.loads(line) for line in (work_dir / "scalars.jsonl").read_text().splitlines()]
    return [r for r in rows if r["split"] == "train"], [r for r in rows if r["split"] == "val"]


def test_a_few_steps_lower_the_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    cfg = load_config(None, ["model.decoder.channels=16", "model.decoder.low_level_channels=8"])
    model = build_model(cfg.model, 20, 255)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    data = SyntheticSegmentation(num_classes=20, image_size=(48, 48), length=4)
    samples = [EvalTransform()(data[i]) for i in range(4)]
    images = torch.stack([s["image"] for s in samples])
    target = torch.stack([s["label"] for s in samples])
    target[target == data.ignore_index] = 255
    losses = []
    for _ in range(25):
        loss = model.loss(model(images), target)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_training_run_writes_the_work_dir(tmp_path, tiny_overrides):
    work = tmp_path / "run"
    cfg = load_config(None, tiny_overrides + ["train.iters=12", "train.eval_interval=6"])
    result = Trainer(cfg, work_dir=work).run()
    assert set(result) == {"mIoU", "aAcc", "mAcc", "fwIoU", "mDice", "mFscore", "mPrecision", "mRecall"}
    train_rows, val_rows = read_scalars(work)
    assert [r["iter"] for r in train_rows] == list(range(1, 13))
    assert [r["iter"] for r in val_rows] == [6, 12]
    # the poly schedule: lr_t = 0.05 (1 - t/12)^0.9 for the decoder, 0.1x for the backbone
    for r in train_rows:
        t = r["iter"] - 1
        assert r["lr"]["decoder"] == pytest.approx(0.05 * (1 - t / 12) ** 0.9)
        assert r["lr"]["backbone"] == pytest.approx(0.005 * (1 - t / 12) ** 0.9)
    first = sum(r["loss"] for r in train_rows[:3])
    last = sum(r["loss"] for r in train_rows[-3:])
    assert last < first
    for name in ("config.yaml", "train.log", "best.pth", "iter_000012.pth", "last_checkpoint", "curves.png"):
        assert (work / name).exists(), name
    assert (work / "last_checkpoint").read_text().strip() == "iter_000012.pth"
    metrics = json.loads((work / "eval" / "iter_000012" / "metrics.json").read_text())
    assert metrics["mIoU"] == result["mIoU"]
    log = (work / "train.log").read_text()
    assert "iter 12/12" in log and "eta" in log and "peak mem" in log
    assert load_config(work / "config.yaml").to_dict() == cfg.to_dict()


def test_checkpoints_are_tensors_and_plain_types_only(tmp_path, tiny_overrides):
    work = tmp_path / "run"
    Trainer(load_config(None, tiny_overrides), work_dir=work).run()
    for name in ("iter_000006.pth", "best.pth"):
        state = torch.load(work / name, weights_only=True)  # raises if anything but tensors/plain types
        assert state["format"] == "scaleseg-checkpoint"
        assert state["num_classes"] == 40 and len(state["class_names"]) == 40
        assert state["config"]["data"]["num_classes"] == 40
    full = torch.load(work / "iter_000006.pth", weights_only=True)
    assert {"optimizer", "rng", "samples_seen"} <= set(full)
    assert full["samples_seen"] == 6 * 4


@pytest.mark.parametrize("extra", [
    [],
    ["data.num_workers=2", "train.grad_accum=2", "model.decoder.dropout=0.3"],
    ["model.head.scorer=embedding", "model.head.embedding.negatives=random"],
    ["data.repeat_factor_threshold=0.3", "data.train_pipeline.photometric=true"],
    ["model.head.structure=pyramid", "model.head.pyramid.semantic_channels=16", "model.head.pyramid.unity_channels=8",
     "model.head.pyramid.tau=0.5"],
])
def test_resume_continues_exactly(tmp_path, tiny_overrides, monkeypatch, extra):
    overrides = tiny_overrides + extra
    straight = tmp_path / "straight"
    Trainer(load_config(None, overrides), work_dir=straight).run()

    # the same run, interrupted at the start of iteration 4 (after the checkpoint at 3) ...
    crashed = tmp_path / "crashed"
    real_set_lr = trainer_module.set_poly_lr

    def crash_at_4(optimizer, it, total, warmup=0):
        if it == 3:
            raise KeyboardInterrupt
        real_set_lr(optimizer, it, total, warmup)

    monkeypatch.setattr(trainer_module, "set_poly_lr", crash_at_4)
    with pytest.raises(KeyboardInterrupt):
        Trainer(load_config(None, overrides), work_dir=crashed).run()
    monkeypatch.setattr(trainer_module, "set_poly_lr", real_set_lr)
    assert (crashed / "last_checkpoint").read_text().strip() == "iter_000003.pth"

    # ... and resumed in a fresh Trainer: same losses, same weights
    Trainer(load_config(None, overrides), work_dir=crashed, resume=True).run()
    a, _ = read_scalars(straight)
    b, _ = read_scalars(crashed)
    assert [r["iter"] for r in b] == list(range(1, 7))
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    wa = load_checkpoint(straight / "iter_000006.pth")["model"]
    wb = load_checkpoint(crashed / "iter_000006.pth")["model"]
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def test_resume_refuses_a_checkpoint_of_another_model(tmp_path, tiny_overrides):
    work = tmp_path / "run"
    Trainer(load_config(None, tiny_overrides), work_dir=work).run()
    other = load_config(None, tiny_overrides + ["data.num_classes=41", "train.iters=9"])
    with pytest.raises(CheckpointError, match=r"data.num_classes: checkpoint 40, config 41"):
        Trainer(other, work_dir=work, resume=work / "iter_000006.pth").run()
    finished = load_config(None, tiny_overrides)
    with pytest.raises(ConfigError, match="nothing left to train"):
        Trainer(finished, work_dir=work, resume=True).run()


def test_corrupt_and_foreign_checkpoints_get_clear_errors(tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="bad.pth.*cannot be read"):
        load_checkpoint(bad)
    foreign = tmp_path / "foreign.pth"
    torch.save({"conv1.weight": torch.zeros(1)}, foreign)
    with pytest.raises(CheckpointError, match="not a scaleseg checkpoint"):
        load_checkpoint(foreign)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pth")


def test_fp16_on_cpu_is_refused(tmp_path, tiny_overrides):
    cfg = load_config(None, tiny_overrides + ["train.amp=fp16", "train.device=cpu"])
    with pytest.raises(ConfigError, match="fp16.*needs a CUDA device"):
        Trainer(cfg, work_dir=tmp_path / "run").run()


def test_tensorboard_scalars(tmp_path, tiny_overrides):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    work = tmp_path / "run"
    Trainer(load_config(None, tiny_overrides + ["train.tensorboard=true"]), work_dir=work).run()
    acc = EventAccumulator(str(work / "tensorboard"))
    acc.Reload()
    losses = [e.value for e in acc.Scalars("train/loss")]
    train_rows, _ = read_scalars(work)
    assert losses == pytest.approx([r["loss"] for r in train_rows])
    assert [e.step for e in acc.Scalars("val/mIoU")] == [6]


def test_tensorboard_missing_is_a_clear_error(tmp_path, tiny_overrides, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails
    with pytest.raises(ConfigError, match=r"pip install 'scaleseg\[tensorboard\]'"):
        Trainer(load_config(None, tiny_overrides + ["train.tensorboard=true"]), work_dir=tmp_path / "r").run()


def test_bf16_autocast_on_cpu_trains(tmp_path, tiny_overrides):
    work = tmp_path / "run"
    Trainer(load_config(None, tiny_overrides + ["train.amp=bf16"]), work_dir=work).run()
    train_rows, _ = read_scalars(work)
    assert all(0 < r["loss"] < 10 for r in train_rows)


def test_atomic_writes_leave_no_temporary_files(tmp_path, tiny_overrides):
    work = tmp_path / "run"
    Trainer(load_config(None, tiny_overrides + ["train.keep_checkpoints=1"]), work_dir=work).run()
    assert sorted(p.name for p in work.iterdir() if p.name.startswith(".")) == []
    assert sorted(p.name for p in work.glob("iter_*.pth")) == ["iter_000006.pth"]  # older one pruned


@pytest.mark.parametrize("loss", ["knn", "full"])
def test_embedding_scorer_trains(tmp_path, tiny_overrides, loss):
    work = tmp_path / "run"
    cfg = load_config(None, tiny_overrides + ["model.head.scorer=embedding", f"model.head.embedding.loss={loss}",
                                              "train.iters=16", "train.checkpoint_interval=16"])
    Trainer(cfg, work_dir=work).run()
    rows, _ = read_scalars(work)
    assert {"ce", "margin", "loss"} <= set(rows[0])
    assert sum(r["ce"] for r in rows[-4:]) < sum(r["ce"] for r in rows[:4])
    assert rows[0]["lr"]["class_embeddings"] == pytest.approx(0.05)
    assert rows[-1]["lr"]["class_embeddings"] == pytest.approx(0.05 * (1 - 15 / 16) ** 0.95)


def test_gradient_clipping_bounds_the_first_update(tmp_path, tiny_overrides):
    from scaleseg.engine.checkpoint import load_checkpoint

    overrides = tiny_overrides + ["optim.momentum=0", "optim.weight_decay=0", "optim.groups.backbone.lr_mult=1",
                                  "optim.clip_grad_norm=0.01", "train.iters=1", "train.checkpoint_interval=1"]
    cfg = load_config(None, overrides)
    torch.manual_seed(cfg.train.seed)
    before = build_model(cfg.model, 40, 255).state_dict()  # the trainer builds the same initial weights
    work = tmp_path / "run"
    Trainer(cfg, work_dir=work).run()
    after = load_checkpoint(work / "iter_000001.pth")["model"]
    step = torch.sqrt(sum(((after[k].float() - before[k].float()) ** 2).sum()
                          for k in before if before[k].is_floating_point() and "running" not in k))
    assert 0 < step <= 0.05 * 0.01 * 1.001  # lr x clip
    rows, _ = read_scalars(work)
    assert rows[0]["grad_norm"] > 0.01  # the norm before clipping is logged


PYRAMID = ["model.head.structure=pyramid", "model.head.pyramid.semantic_channels=16",
           "model.head.pyramid.unity_channels=8", "train.iters=12", "train.checkpoint_interval=12"]


@pytest.mark.parametrize("scorer", ["linear", "embedding"])
def test_pyramid_head_trains_and_reports_the_pixels_of_each_level(tmp_path, tiny_overrides, scorer):
    work = tmp_path / "run"
    cfg = load_config(None, tiny_overrides + PYRAMID + [f"model.head.scorer={scorer}"])
    result = Trainer(cfg, work_dir=work).run()
    rows, val = read_scalars(work)
    assert {"ce", "unity", "loss"} <= set(rows[0])
    assert all(math.isfinite(r["loss"]) for r in rows)  # learning itself: test_pyramid.py's fixed-batch test
    levels = {k: v for k, v in result.items() if k.startswith("level_stride_")}
    assert set(levels) == {"level_stride_32", "level_stride_16", "level_stride_8", "level_stride_4"}
    assert sum(levels.values()) == pytest.approx(100.0, abs=0.05)
    metrics = json.loads((work / "eval" / "iter_000012" / "metrics.json").read_text())
    assert metrics["level_stride_4"] == levels["level_stride_4"]
    assert val[-1]["level_stride_32"] == levels["level_stride_32"]
    assert "pixels decided per pyramid level: stride 32:" in (work / "train.log").read_text()
    # S&F Table 9 (the columns of the levels that decided pixels) and the unity head's recall, printed and
    # in metrics.json (their values: test_pyramid.py's per-pixel reference)
    deciding = [s for s in (32, 16, 8, 4) if levels[f"level_stride_{s}"] > 0]
    assert {f"table9_pixels{s}_level{s2}" for s in deciding for s2 in (32, 16, 8, 4)} <= set(metrics)
    assert "unity_recall_stride_8" in metrics  # (no stride-32 cell of the tiny images need be unity)
    log = (work / "train.log").read_text()
    assert "S&F Table 9" in log and "unity head precision / recall" in log
    # eval.pyramid_diagnostics=false: the same metrics without them
    assert main(["eval", str(work), "eval.pyramid_diagnostics=false", "--out", str(tmp_path / "plain"), "--no-progress"]) == 0
    plain = json.loads((tmp_path / "plain" / "metrics.json").read_text())
    assert not any(k.startswith(("table9_", "unity_")) for k in plain)
    assert {k: plain[k] for k in ("mIoU", "aAcc", "level_stride_4")} == {k: metrics[k] for k in ("mIoU", "aAcc", "level_stride_4")}
