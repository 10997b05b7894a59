"""The engine's fault contract: each fault a run can meet is either refused before the first iteration or
survived (one message naming what to do, nothing lost, and a resume that continues exactly).

FAULTS lists them with the test that keeps each; README "When a run goes wrong" states how many were tried
and survived, and `test_readme_states_the_fault_figures` keeps the figures equal to this list.

A full disk is simulated by `full_disk`: files whose name matches a pattern raise OSError(ENOSPC) from
`write` once a number of writes went through (the write layer, as the kernel does), and, where this
machine lets us mount a tmpfs (root), on a real 1-file-sized tmpfs as well.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import fnmatch
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from scaleseg.cli import main
from scaleseg.config import load_config
from scaleseg.engine.checkpoint import load_checkpoint
from scaleseg.engine.hooks import final_report_done
from scaleseg.engine.trainer import Trainer

from tests.conftest import TINY

RUN = [*TINY, "train.checkpoint_interval=2", "train.eval_interval=2"]  # 6 iterations, checkpoints and evals at 2, 4, 6
CHILD = Path(__file__).with_name("fault_child.py")
ROOT = Path(__file__).resolve().parents[2]

# fault -> the test(s) that keep it (README "When a run goes wrong" counts these)
FAULTS = {
    "disk full during a checkpoint write": ["test_disk_full_at_a_checkpoint", "test_disk_full_on_a_real_tmpfs"],
    "disk full during a scalars.jsonl write": ["test_disk_full_writing_the_logs[scalars.jsonl]"],
    "disk full during a train.log write": ["test_disk_full_writing_the_logs[train.log]"],
    "disk full during scaleseg prepare": ["test_disk_full_during_prepare"],
    "read-only work dir": ["test_a_read_only_work_dir_is_refused_before_the_first_iteration"],
    "a second training in the same work dir": ["test_a_second_training_is_refused_and_a_killed_runs_lock_taken_over"],
    "a stale lock of a killed run": ["test_a_second_training_is_refused_and_a_killed_runs_lock_taken_over"],
    "SIGINT (Ctrl-C) during training": ["test_ctrl_c_stops_with_a_checkpoint_and_resumes_exactly"],
    "SIGKILL at random moments, repeated": ["test_repeated_sigkill_at_random_moments_resumes_to_the_same_weights"],
    "SIGKILL during an evaluation": ["test_repeated_sigkill_at_random_moments_resumes_to_the_same_weights"],
    "SIGKILL during a checkpoint write": ["test_repeated_sigkill_at_random_moments_resumes_to_the_same_weights",
                                          "test_crash_safety.py::test_sigkill_during_a_checkpoint_write_resumes_exactly"],
    "SIGKILL just after the final checkpoint": ["test_work_dir.py::test_a_kill_after_the_final_checkpoint_is_finished_on_resume"],
    "last_checkpoint naming a missing file": ["test_last_checkpoint_naming_a_missing_file"],
    "a damaged (truncated, overwritten) checkpoint": ["test_crash_safety.py::test_resume_passes_over_a_damaged_newest_checkpoint"],
    "a checkpoint of another class count given to --resume": ["test_resume_refuses_another_model[classes]"],
    "a checkpoint of another head given to --resume": ["test_resume_refuses_another_model[scorer]",
                                                       "test_resume_refuses_another_model[structure]"],
    "NaN/inf loss or gradient steps": ["test_crash_safety.py::test_a_nan_step_is_skipped_and_logged_and_undone",
                                       "test_crash_safety.py::test_non_finite_steps_in_a_row_stop_the_run_with_the_last_good_checkpoint_intact"],
    "a tampered checkpoint (pickled code)": ["test_crash_safety.py::test_loading_a_tampered_checkpoint_never_runs_its_code"],
}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The final weights of RUN trained in one go (deterministic: every fault test must end with these)."""
    work = tmp_path_factory.mktemp("uninterrupted") / "run"
    Trainer(load_config(None, RUN), work_dir=work).run()
    return load_checkpoint(work / "iter_000006.pth")


def assert_same_weights(work: Path, reference: dict) -> None:
    final = load_checkpoint(work / "iter_000006.pth")
    assert final["iteration"] == 6 and final["samples_seen"] == reference["samples_seen"]
    for key, value in reference["model"].items():
        assert torch.equal(final["model"][key], value), key


def no_temporary_files(work: Path) -> bool:
    return not [p for p in work.iterdir() if p.name.startswith(".") and ".tmp" in p.name]


# ------------------------------------------------------------------------------------------------
# a full disk, at the write layer


class _FullFile:
    """A file object whose writes fail with ENOSPC once the shared budget of writes is spent."""

    def __init__(self, file, disk) -> None:
        self._file, self._disk = file, disk

    def write(self, data):
        self._disk.writes += 1
        if self._disk.writes > self._disk.budget:
            self._disk.failures += 1
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self._file.write(data)

    def __getattr__(self, name):
        return getattr(self._file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._file.close()

    def __iter__(self):
        return iter(self._file)


@contextlib.contextmanager
def full_disk(pattern: str, budget: int = 0):
    """Writes to files whose name matches `pattern` (fnmatch) fail with ENOSPC after `budget` writes."""
    real_open = builtins.open

    class Disk:
        writes = failures = 0

    disk = Disk()
    disk.budget = budget

    def fake_open(file, mode="r", *args, **kwargs):
        handle = real_open(file, mode, *args, **kwargs)
        if isinstance(file, (str, os.PathLike)) and any(m in mode for m in "wax+") \
                and fnmatch.fnmatch(Path(file).name, pattern):
            return _FullFile(handle, disk)
        return handle

    builtins.open = fake_open
    try:
        yield disk
    finally:
        builtins.open = real_open


def test_disk_full_at_a_checkpoint(tmp_path, capsys, uninterrupted):
    work = tmp_path / "run"
    with full_disk(".iter_000004.pth.tmp-*") as disk:
        assert main(["train", *RUN, "--work-dir", str(work)]) == 2
    assert disk.failures >= 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("error:") == 1
    assert f"the disk is full in the work dir {work}" in err
    assert re.search(r"could not write iter_000004\.pth \(\d+(\.\d)? (KiB|MiB)\)", err), err
    assert f"The last good checkpoint is {work / 'iter_000002.pth'} (intact)" in err and "--resume" in err
    assert load_checkpoint(work / "iter_000002.pth")["iteration"] == 2  # intact and loadable
    assert (work / "last_checkpoint").read_text().strip() == "iter_000002.pth"
    assert not (work / "iter_000004.pth").exists() and no_temporary_files(work)
    assert not (work / "train.lock").exists()
    # space freed: --resume continues exactly
    assert main(["train", *RUN, "--work-dir", str(work), "--resume"]) == 0
    assert_same_weights(work, uninterrupted)


def _can_mount_tmpfs(path: Path) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(path)], capture_output=True)
    if done.returncode != 0:
        return False
    subprocess.run(["umount", str(path)], check=True)
    return True


def test_disk_full_on_a_real_tmpfs(tmp_path, capsys, uninterrupted):
    mount_point = tmp_path / "disk"
    if os.geteuid() != 0 or not _can_mount_tmpfs(mount_point):
        pytest.skip("mounting a tmpfs needs root; the same fault is injected in test_disk_full_at_a_checkpoint")
    # room for the logs and one checkpoint, not two: the second checkpoint (iter_000004) fills the disk
    one = _checkpoint_bytes(uninterrupted)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={int(one * 1.5) + 256 * 1024}", "tmpfs", str(mount_point)], check=True)
    try:
        work = mount_point / "run"
        assert main(["train", *RUN, "--work-dir", str(work)]) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and "the disk is full" in err and str(work) in err
        last = re.search(r"The last good checkpoint is (\S+) \(intact\)", err)
        assert last, err
        assert load_checkpoint(last.group(1))["iteration"] in (2, 4)
        assert no_temporary_files(work)
        subprocess.run(["mount", "-o", "remount,size=64m", str(mount_point)], check=True)  # space freed
        assert main(["train", *RUN, "--work-dir", str(work), "--resume"]) == 0
        assert_same_weights(work, uninterrupted)
    finally:
        subprocess.run(["umount", str(mount_point)], check=False)


def _checkpoint_bytes(ckpt: dict) -> int:
    from scaleseg.engine.checkpoint import serialized_size

    return serialized_size(ckpt)


@pytest.mark.parametrize("name", ["scalars.jsonl", "train.log"])
def test_disk_full_writing_the_logs(tmp_path, capsys, uninterrupted, name):
    work = tmp_path / "run"
    # train.log and scalars.jsonl get a few writes per iteration: the budget runs out after checkpoint 2
    budget = {"scalars.jsonl": 4, "train.log": 6}[name]
    with full_disk(name, budget) as disk:
        assert main(["train", *RUN, "--work-dir", str(work)]) == 2
    assert disk.failures >= 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "Logging error" not in err
    assert f"the disk is full in the work dir {work}; could not write {name} (" in err, err
    assert f"The last good checkpoint is {work / 'iter_000002.pth'} (intact)" in err, err
    assert main(["train", *RUN, "--work-dir", str(work), "--resume"]) == 0
    assert_same_weights(work, uninterrupted)
    if name == "scalars.jsonl":  # the resumed file reads like an uninterrupted run's
        rows = [json.loads(line) for line in (work / "scalars.jsonl").read_text().splitlines()]
        assert [r["iter"] for r in rows if r["split"] == "train"] == [1, 2, 3, 4, 5, 6]


def test_disk_full_during_prepare(tmp_path, capsys):
    from tests.data.test_cityscapes import expected_train_ids, make_cityscapes

    truth = make_cityscapes(tmp_path)
    with full_disk(".*labelTrainIds.png*", budget=1) as disk:
        assert main(["prepare", "cityscapes", "--root", str(tmp_path), "--no-progress"]) == 2
    assert disk.failures >= 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("error:") == 1
    assert "labelTrainIds.png" in err and "No space left on device" in err and "disk not full" in err
    assert not list(tmp_path.rglob(".*tmp*"))  # no half-written file left
    assert main(["prepare", "cityscapes", "--root", str(tmp_path), "--no-progress"]) == 0  # space freed: finishes
    from PIL import Image
    import numpy as np

    outputs = sorted(tmp_path.glob("gtFine/*/*/*_gtFine_labelTrainIds.png"))
    assert len(outputs) == 4
    for path in outputs:
        stored = np.array(Image.open(path))
        np.testing.assert_array_equal(stored, expected_train_ids(truth[path.name[: -len("_gtFine_labelTrainIds.png")]]))


# ------------------------------------------------------------------------------------------------
# the work dir: read-only, locked


def test_a_read_only_work_dir_is_refused_before_the_first_iteration(tmp_path, capsys, monkeypatch):
    work = tmp_path / "run"
    work.mkdir()
    mounted = False
    if os.geteuid() != 0:
        work.chmod(0o555)
    elif subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(work)], capture_output=True).returncode == 0:
        mounted = True
    else:  # root without mount rights: the kernel's answer to a write in a read-only folder, injected
        real_open = builtins.open

        def read_only(file, mode="r", *args, **kwargs):
            if any(m in mode for m in "wax+") and Path(file).parent == work:
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(file))
            return real_open(file, mode, *args, **kwargs)

        monkeypatch.setattr(builtins, "open", read_only)
    steps = []
    monkeypatch.setattr(Trainer, "run_step", lambda self: steps.append(1))
    try:
        assert main(["train", *RUN, "--work-dir", str(work)]) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err
        assert f"the work dir {work} is not writable" in err and "nothing was run" in err, err
        assert steps == [] and list(work.iterdir()) == []
    finally:
        if mounted:
            subprocess.run(["umount", str(work)], check=False)
        work.chmod(0o755)


def _start(tmp_path: Path, work: Path, plan: str, *extra: str, marker_name: str = "marker") -> tuple[subprocess.Popen, Path]:
    marker = tmp_path / marker_name
    child = subprocess.Popen(
        [sys.executable, str(CHILD), str(marker), plan, "train", *RUN, *extra, "--work-dir", str(work)],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True,
        env={**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")},
    )
    return child, marker


def _wait_for(child: subprocess.Popen, marker: Path) -> bool:
    """True once the child touched its marker; False if it finished first."""
    deadline = time.monotonic() + 300
    while not marker.exists():
        if child.poll() is not None:
            assert child.returncode == 0, child.stderr.read()[-3000:]
            return False
        assert time.monotonic() < deadline, "the child never reached its marker"
        time.sleep(0.02)
    return True


def _kill(child: subprocess.Popen) -> None:
    child.send_signal(signal.SIGKILL)
    assert child.wait(timeout=60) == -signal.SIGKILL
    child.stderr.close()


def test_a_second_training_is_refused_and_a_killed_runs_lock_taken_over(tmp_path, capsys, uninterrupted):
    work = tmp_path / "run"
    child, marker = _start(tmp_path, work, "wait:3")  # trains, then waits inside iteration 3
    try:
        assert _wait_for(child, marker)
        for extra in ([], ["--resume"]):
            assert main(["train", *RUN, *extra, "--work-dir", str(work)]) == 2
            err = capsys.readouterr().err
            assert f"another training is running in {work} (pid {child.pid} on" in err, err
            assert "Traceback" not in err
        _kill(child)  # killed: its train.lock stays behind, held by nobody
    finally:
        if child.poll() is None:
            child.kill()
    assert f"pid {child.pid}" in (work / "train.lock").read_text()
    assert main(["train", *RUN, "--work-dir", str(work), "--resume"]) == 0
    log = (work / "train.log").read_text()
    assert f"took over the lock train.lock of a training that is no longer running (pid {child.pid}" in log
    assert not (work / "train.lock").exists()  # released at the end
    assert_same_weights(work, uninterrupted)


# ------------------------------------------------------------------------------------------------
# signals


def test_ctrl_c_stops_with_a_checkpoint_and_resumes_exactly(tmp_path, uninterrupted):
    work = tmp_path / "run"
    # with DataLoader workers, which get the Ctrl-C too (the same process group) and must not die of it
    child, marker = _start(tmp_path, work, "wait:3", "data.num_workers=2")
    try:
        assert _wait_for(child, marker)
        os.killpg(child.pid, signal.SIGINT)  # as a terminal's Ctrl-C: to the process and its loader workers
        time.sleep(0.2)
        Path(str(marker) + ".go").touch()
        assert child.wait(timeout=120) == 130
        err = child.stderr.read()
    finally:
        if child.poll() is None:
            child.kill()
        child.stderr.close()
    assert "Traceback" not in err
    assert f"stopped after iteration 3 of 6 and saved {work / 'iter_000003.pth'}" in err and "--resume" in err, err
    assert load_checkpoint(work / "iter_000003.pth")["iteration"] == 3  # 3 is no checkpoint_interval multiple
    assert (work / "last_checkpoint").read_text().strip() == "iter_000003.pth"
    assert not (work / "train.lock").exists()
    assert main(["train", *RUN, "--work-dir", str(work), "--resume"]) == 0
    assert_same_weights(work, uninterrupted)


def test_repeated_sigkill_at_random_moments_resumes_to_the_same_weights(tmp_path, uninterrupted):
    """Killed five times (mid-iteration at random points, in an evaluation, half-way through a checkpoint write),
    resumed each time; the weights at the end are the uninterrupted run's, bit for bit."""
    rng = random.Random(1920)
    work = tmp_path / "run"
    plans = [f"iter:{rng.randint(2, 3)}", f"eval:{rng.randint(2, 4)}", "save:1", f"iter:{rng.randint(5, 6)}",
             f"eval:{rng.randint(1, 4)}"]
    killed = []
    for n, plan in enumerate(plans):
        if final_report_done(work, 6):
            break  # the last kill came after the run's end (its random delay outlasted iteration 6): none can land
        child, marker = _start(tmp_path, work, plan, *(["--resume"] if n else []), marker_name=f"marker{n}")
        try:
            if _wait_for(child, marker):
                time.sleep(rng.uniform(0, 0.3))  # a random moment after the marker
                _kill(child)
                killed.append(plan)
        finally:
            if child.poll() is None:
                child.kill()
    assert len(killed) >= 4, killed  # the plans land inside the run
    assert main(["train", *RUN, "--work-dir", str(work), "--resume"]) in (0, 2)  # 2: the last kill was after the end
    final = work / "iter_000006.pth"
    if not (work / "eval" / "iter_000006" / "metrics.json").exists():
        assert main(["train", *RUN, "--work-dir", str(work), "--resume"]) == 0
    assert final.exists() and no_temporary_files(work)
    assert_same_weights(work, uninterrupted)
    log = (work / "train.log").read_text()
    assert log.count("resumed from") >= 3 and "took over the lock" in log


# ------------------------------------------------------------------------------------------------
# checkpoints that cannot be resumed from


def test_last_checkpoint_naming_a_missing_file(tmp_path, capsys, uninterrupted):
    work = tmp_path / "run"
    assert main(["train", *RUN, "--work-dir", str(work)]) == 0
    (work / "iter_000006.pth").unlink()  # lost, with the final report
    (work / "curves.png").unlink()
    (work / "last_checkpoint").write_text("iter_000099.pth\n")  # a hand edit, a lost file
    (work / "best.pth").unlink()
    capsys.readouterr()
    assert main(["eval", str(work), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "last_checkpoint names iter_000099.pth, which does not exist" in err and "Traceback" not in err
    # --resume warns and continues from the newest checkpoint of the run (iter_000004), exactly
    assert main(["train", *RUN, "--work-dir", str(work), "--resume"]) == 0
    log = (work / "train.log").read_text()
    assert "iter_000099.pth, which does not exist" in log and "at iteration 4" in log
    assert_same_weights(work, uninterrupted)


@pytest.mark.parametrize("change", ["data.num_classes=41", "model.head.scorer=embedding",
                                    "model.head.structure=pyramid"], ids=["classes", "scorer", "structure"])
def test_resume_refuses_another_model(tmp_path, capsys, change):
    work = tmp_path / "run"
    cut = [*RUN, "train.iters=2"]
    assert main(["train", *cut, "--work-dir", str(work)]) == 0
    key = change.split("=")[0]
    other = [*cut, "train.iters=4", change, "model.head.pyramid.semantic_channels=16",
             "model.head.pyramid.unity_channels=8"]
    for resume in (["--resume"], ["--resume", str(work / "iter_000002.pth")]):
        capsys.readouterr()
        assert main(["train", *other, "--work-dir", str(work), *resume]) == 2
        err = capsys.readouterr().err
        assert "is a checkpoint of another model or task than this config" in err and "Traceback" not in err
        assert re.search(rf"{re.escape(key)}: checkpoint \S+, config \S+", err), err
    assert not (work / "iter_000004.pth").exists()


# ------------------------------------------------------------------------------------------------


def test_readme_states_the_fault_figures():
    """README "When a run goes wrong" states the counts of FAULTS and of the bad config values refused."""
    from tests.test_config_values import BAD_FLOAT_VALUES, FLOAT_KEYS, OUT_OF_RANGE

    section = (ROOT / "README.md").read_text().split("### When a run goes wrong", 1)[1].split("\n### ", 1)[0]
    section = " ".join(section.replace("**", "").split())
    tried = len(FAULTS)
    assert f"{tried} faults tried, {tried} survived" in section, section
    assert f"{len(BAD_FLOAT_VALUES) + len(OUT_OF_RANGE)} bad values refused" in section
    assert f"every one of the {len(FLOAT_KEYS)} float keys" in section
    here = Path(__file__).read_text() + (Path(__file__).with_name("test_crash_safety.py")).read_text() \
        + (Path(__file__).with_name("test_work_dir.py")).read_text()
    for fault, tests in FAULTS.items():
        for test in tests:
            name = test.split("::")[-1].split("[")[0]
            assert f"def {name}(" in here, f"{fault}: no test {name}"
