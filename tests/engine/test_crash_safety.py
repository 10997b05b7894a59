"""Crash safety: SIGKILL in the middle of a checkpoint write, damaged checkpoints, NaN/inf steps."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from scaleseg.config import load_config
from scaleseg.engine import trainer as trainer_module
from scaleseg.engine.checkpoint import load_checkpoint
from scaleseg.engine.trainer import NonFiniteLossError, Trainer
from scaleseg.models.segmentor import Segmentor

from tests.conftest import TINY

RUN = [*TINY, "train.checkpoint_interval=2"]  # 6 iterations, checkpoints at 2, 4, 6

# Runs `scaleseg train` with torch.save replaced: its second call (iter_000004.pth) writes half the
# bytes, fsyncs, touches the marker file and hangs there until the test kills the process.
KILLED_CHILD = r"""
import io, os, sys, time
import torch
marker, argv = sys.argv[1], sys.argv[2:]
real_save, calls = torch.save, []
def half_then_hang(obj, f, *args, **kwargs):
    calls.append(1)
    if len(calls) == 2:
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        data = buffer.getvalue()
        f.write(data[: len(data) // 2]); f.flush(); os.fsync(f.fileno())
        open(marker, "w").close()
        time.sleep(600)
    return real_save(obj, f, *args, **kwargs)
torch.save = half_then_hang
from scaleseg.cli import main
sys.exit(main(argv))
"""


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    work = tmp_path_factory.mktemp("uninterrupted")
    Trainer(load_config(None, RUN), work_dir=work).run()
    return load_checkpoint(work / "iter_000006.pth")


def assert_same_state(a: dict, b: dict) -> None:
    assert a["iteration"] == b["iteration"] and a["samples_seen"] == b["samples_seen"]
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key


def test_sigkill_during_a_checkpoint_write_resumes_exactly(tmp_path, uninterrupted):
    work, marker = tmp_path / "run", tmp_path / "writing"
    child = subprocess.Popen(
        [sys.executable, "-c", KILLED_CHILD, str(marker), "train", *RUN, "--work-dir", str(work)],
        cwd=os.getcwd(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 240
        while not marker.exists():
            assert child.poll() is None, child.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "the child never reached its second checkpoint write"
            time.sleep(0.05)
        child.send_signal(signal.SIGKILL)
        assert child.wait(timeout=30) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
        child.stderr.close()

    # killed half-way through writing iter_000004: only a temporary file holds those bytes
    partial = list(work.glob(".iter_000004.pth.tmp-*"))
    assert len(partial) == 1 and partial[0].stat().st_size > 0
    assert not (work / "iter_000004.pth").exists()
    assert (work / "last_checkpoint").read_text().strip() == "iter_000002.pth"
    assert load_checkpoint(work / "iter_000002.pth")["iteration"] == 2

    Trainer(load_config(None, RUN), work_dir=work, resume=True).run()
    assert not list(work.glob(".*.tmp-*"))
    log = (work / "train.log").read_text()
    assert "removed 1 unfinished checkpoint write" in log and "resumed from" in log and "at iteration 2" in log
    assert_same_state(load_checkpoint(work / "iter_000006.pth"), uninterrupted)
    iters = [json.loads(line)["iter"] for line in (work / "scalars.jsonl").read_text().splitlines()]
    assert iters == [1, 2, 3, 4, 5, 6, 6]  # the killed run's records past iteration 2 were replaced


def test_resume_passes_over_a_damaged_newest_checkpoint(tmp_path, uninterrupted):
    work = tmp_path / "run"
    Trainer(load_config(None, RUN), work_dir=work).run()
    # damaged after they were written (a failing disk, a bad copy, a hand edit): truncated, overwritten
    newest = work / "iter_000006.pth"
    newest.write_bytes(newest.read_bytes()[:50_000])
    (work / "iter_000004.pth").write_bytes(b"not a checkpoint at all")
    Trainer(load_config(None, RUN), work_dir=work, resume=True).run()
    log = (work / "train.log").read_text()
    assert "passing over iter_000006.pth" in log and "passing over iter_000004.pth" in log
    assert "cannot be read safely" in log and "at iteration 2" in log
    assert_same_state(load_checkpoint(work / "iter_000006.pth"), uninterrupted)


def nan_images_at(monkeypatch, iterations: set[int]) -> None:
    """Batches of the given (1-based) iterations get a NaN pixel: NaN flows through the whole network."""
    build = trainer_module.build_train_loader

    def patched(*args, **kwargs):
        loader = build(*args, **kwargs)

        class Poisoned:
            def __iter__(self):
                for i, batch in enumerate(loader, start=1 + kwargs["start"] // 4):
                    if i in iterations:
                        batch["image"][0, 0, 5, 5] = float("nan")
                    yield batch

        return Poisoned()

    monkeypatch.setattr(trainer_module, "build_train_loader", patched)


def test_a_nan_step_is_skipped_and_logged_and_undone(tmp_path, monkeypatch):
    nan_images_at(monkeypatch, {3})
    work = tmp_path / "run"
    result = Trainer(load_config(None, [*TINY, "train.checkpoint_interval=1"]), work_dir=work).run()
    states = {i: load_checkpoint(work / f"iter_{i:06d}.pth")["model"] for i in (2, 3, 4)}
    for key, value in states[2].items():  # the skipped step changed nothing, BatchNorm statistics included
        assert torch.equal(states[3][key], value), key
        assert torch.isfinite(states[3][key].float()).all(), key
    assert any(not torch.equal(states[4][k], v) for k, v in states[3].items())  # training went on
    log = (work / "train.log").read_text()
    assert "iter 3: non-finite loss" in log and "step skipped, weights unchanged (1 in a row" in log
    rows = {r["iter"]: r for r in map(json.loads, (work / "scalars.jsonl").read_text().splitlines()) if r["split"] == "train"}
    assert rows[3]["skipped_steps"] == 1 and "loss" not in rows[3]
    assert "skipped_steps" not in rows[4] and rows[4]["loss"] > 0
    assert result["mIoU"] is not None and (work / "curves.png").exists()


ESS_INDEX = ["model.head.scorer=embedding", "model.head.embedding.search_index=ivf", "model.head.embedding.index_clusters=4",
             "model.head.embedding.index_probes=2", "model.head.embedding.index_refresh=2",
             "model.head.embedding.margin_refresh=2"]


def test_a_skipped_step_of_the_ess_head_undoes_its_index_and_regulariser_state(tmp_path, monkeypatch):
    """The checkpointed buffers (BatchNorm, the class index's lists and counters, the regulariser's
    pairs) are copied before a step and put back when it is skipped; the index's derived assignment
    state is not copied but rebuilt at the next step, whose lists equal a brute-force assignment."""
    from scaleseg.engine.trainer import restore_buffers, snapshot_buffers
    from scaleseg.models import build_model

    cfg = load_config(None, [*TINY, *ESS_INDEX])
    model = build_model(cfg.model, 40, 255)
    index = model.head.scorer.class_index
    copied = {id(b) for b, _ in snapshot_buffers(model)}
    assert {id(index.order), id(index.steps), id(model.head.scorer.margin_cache.partners)} <= copied
    assert not {id(index.anchors), id(index.assigned), id(index.slack)} & copied  # derived: not copied
    E = model.head.scorer.classes().detach()
    index.step(E)
    saved = snapshot_buffers(model)
    index.step(E + 0.5)  # a step that will be undone: refresh and re-assignment against other rows
    restore_buffers(model, saved)
    assert int(index.steps) == 1 and torch.isinf(index.slack).all()
    assert index.assign(E) == 40  # every class searched again: the lists match the restored centroids
    nearest = torch.cdist(E, index.centroids).argmin(1)
    for c in range(4):
        members = index.order[index.offsets[c] : index.offsets[c + 1]].long()
        assert (nearest[members] == c).all()

    nan_images_at(monkeypatch, {3})
    work = tmp_path / "run"
    Trainer(load_config(None, [*TINY, *ESS_INDEX, "train.checkpoint_interval=1"]), work_dir=work).run()
    states = {i: load_checkpoint(work / f"iter_{i:06d}.pth")["model"] for i in (2, 3, 4)}
    assert "head.scorer.class_index.order" in states[2] and "head.scorer.margin_cache.partners" in states[2]
    for key, value in states[2].items():  # the skipped step changed nothing, the index and pairs included
        assert torch.equal(states[3][key], value), key
    assert int(states[4]["head.scorer.class_index.steps"]) == 3  # two steps before the skip, one after
    assert "step skipped" in (work / "train.log").read_text()


def test_non_finite_steps_in_a_row_stop_the_run_with_the_last_good_checkpoint_intact(tmp_path, monkeypatch):
    nan_images_at(monkeypatch, {4, 5, 6})
    work = tmp_path / "run"
    cfg = load_config(None, [*TINY, "train.checkpoint_interval=2", "train.max_nonfinite_steps=2"])
    with pytest.raises(NonFiniteLossError) as info:
        Trainer(cfg, work_dir=work).run()
    message = str(info.value)
    assert "2 training steps in a row" in message and "iteration 5" in message
    assert "iter_000004.pth" in message and "--resume" in message
    assert not (work / "iter_000006.pth").exists() and not (work / "best.pth").exists()
    last = load_checkpoint(work / "iter_000004.pth")  # written after the skipped step 4: its weights are step 3's
    assert all(torch.isfinite(v.float()).all() for v in last["model"].values())
    monkeypatch.undo()  # the data is fixed: the run continues from the last good checkpoint
    Trainer(cfg, work_dir=work, resume=True).run()
    assert load_checkpoint(work / "iter_000006.pth")["iteration"] == 6


def test_a_non_finite_gradient_with_a_finite_loss_is_skipped(tmp_path, monkeypatch):
    loss = Segmentor.loss

    def nan_gradient(self, outputs, target):
        terms = loss(self, outputs, target)
        w = self.decoder.fuse[0].weight
        terms["loss"] = terms["loss"] + 0.0 * torch.sqrt(w - w.detach()).sum()  # value 0, gradient 0 * inf = NaN
        return terms

    monkeypatch.setattr(Segmentor, "loss", nan_gradient)
    work = tmp_path / "run"
    with pytest.raises(NonFiniteLossError, match="3 training steps in a row"):
        Trainer(load_config(None, [*TINY, "train.max_nonfinite_steps=3"]), work_dir=work).run()
    assert "non-finite gradient norm (nan)" in (work / "train.log").read_text()


class _RunsCodeWhenUnpickled:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):  # unpickling calls Path.touch(marker): what a tampered checkpoint could do
        return (type(self.marker).touch, (self.marker,))


def test_loading_a_tampered_checkpoint_never_runs_its_code(tmp_path):
    from scaleseg.errors import CheckpointError

    marker = tmp_path / "code_ran"
    tampered = tmp_path / "iter_000002.pth"
    torch.save({"format": "scaleseg-checkpoint", "iteration": 2, "payload": _RunsCodeWhenUnpickled(marker)}, tampered)
    with pytest.raises(CheckpointError, match="iter_000002.pth.*cannot be read safely"):
        load_checkpoint(tampered)
    assert not marker.exists()
