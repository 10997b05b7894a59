"""A work dir holds one run: a new run never destroys another's files, pruning deletes only the run's own
checkpoints, --resume continues only the same run, and each config file gets its own default work dir."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from scaleseg.cli import main
from scaleseg.config import load_config
from scaleseg.engine import trainer as trainer_module
from scaleseg.engine.checkpoint import load_checkpoint
from scaleseg.engine.hooks import FinalReport
from scaleseg.engine.trainer import Trainer, default_work_dir
from scaleseg.errors import CheckpointError

from tests.conftest import TINY

ROOT = Path(__file__).resolve().parents[2]
RUN = [*TINY, "train.checkpoint_interval=2"]  # 6 iterations, checkpoints at 2, 4, 6


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_new_run_in_a_work_dir_holding_another_run_is_refused_and_changes_nothing(tmp_path, capsys):
    work = tmp_path / "X"
    assert main(["train", *RUN, "train.iters=8", "--work-dir", str(work)]) == 0
    before = snapshot(work)
    capsys.readouterr()
    # the repro: another (shorter) run in the same work dir
    assert main(["train", *RUN, "train.iters=4", "--work-dir", str(work)]) == 2
    err = capsys.readouterr().err
    assert f"the work dir {work} holds another run (iter_000008.pth" in err and "nothing was changed" in err
    assert "--resume" in err and "--work-dir" in err and "Traceback" not in err
    assert snapshot(work) == before  # no checkpoint, pointer, best.pth, log or config touched
    assert (work / "last_checkpoint").read_text().strip() == "iter_000008.pth"


def test_a_work_dir_without_checkpoints_can_be_reused(tmp_path):
    work = tmp_path / "X"
    work.mkdir()
    (work / "train.log").write_text("a run that failed before its first checkpoint\n")
    Trainer(load_config(None, [*RUN, "train.iters=2"]), work_dir=work).run()
    assert (work / "iter_000002.pth").exists()


def test_pruning_deletes_only_the_runs_own_checkpoints(tmp_path):
    other = tmp_path / "other"
    Trainer(load_config(None, [*RUN, "train.seed=1"]), work_dir=other).run()
    work = tmp_path / "run"
    Trainer(load_config(None, RUN), work_dir=work).run()
    foreign = work / "iter_000001.pth"  # another run's checkpoint, copied in by hand
    shutil.copy(other / "iter_000002.pth", foreign)
    # the run goes on with keep_checkpoints=2: its own 2, 4 and 6 may go, the foreign file must stay
    Trainer(load_config(None, [*RUN, "train.iters=10", "train.keep_checkpoints=2"]), work_dir=work, resume=True).run()
    names = sorted(p.name for p in work.glob("iter_*.pth"))
    assert names == ["iter_000001.pth", "iter_000008.pth", "iter_000010.pth"]
    assert (work / "last_checkpoint").read_text().strip() == "iter_000010.pth"
    assert load_checkpoint(foreign)["run_id"] != load_checkpoint(work / "iter_000010.pth")["run_id"]


def test_resume_never_continues_another_runs_checkpoint(tmp_path, capsys):
    other = tmp_path / "other"
    Trainer(load_config(None, [*RUN, "train.seed=1", "train.iters=12", "train.checkpoint_interval=12"]),
            work_dir=other).run()
    work = tmp_path / "run"
    Trainer(load_config(None, RUN), work_dir=work).run()
    shutil.copy(other / "iter_000012.pth", work / "iter_000012.pth")  # newer, another run
    (work / "last_checkpoint").unlink()
    with pytest.raises(CheckpointError, match=r"belong to 2 runs.*iter_000012.pth.*iter_000006.pth.*--resume CKPT"):
        Trainer(load_config(None, [*RUN, "train.iters=14"]), work_dir=work, resume=True).run()
    # with the pointer, the run's own newest is taken and the other run's file is passed over
    (work / "last_checkpoint").write_text("iter_000006.pth\n")
    Trainer(load_config(None, [*RUN, "train.iters=8"]), work_dir=work, resume=True).run()
    assert "resumed from" in (work / "train.log").read_text() and (work / "iter_000008.pth").exists()
    assert load_checkpoint(work / "iter_000012.pth")["iteration"] == 12  # untouched


def test_resume_refuses_a_changed_model_and_logs_changed_settings(tmp_path):
    work = tmp_path / "run"
    Trainer(load_config(None, [*RUN, "train.iters=2"]), work_dir=work).run()
    with pytest.raises(CheckpointError, match=r"model.decoder.dropout: checkpoint 0.1, config 0.3"):
        Trainer(load_config(None, [*RUN, "train.iters=4", "model.decoder.dropout=0.3"]), work_dir=work, resume=True).run()
    # the README's advice after NaN steps: lower optim.lr and --resume
    Trainer(load_config(None, [*RUN, "train.iters=4", "optim.lr=0.01"]), work_dir=work, resume=True).run()
    log = (work / "train.log").read_text()
    assert "resuming with changed settings: optim.lr: 0.05 -> 0.01; train.iters: 2 -> 4" in log


def test_each_config_file_gets_its_own_default_work_dir():
    files = sorted((ROOT / "configs").rglob("*.yaml"))
    files = [f for f in files if "_base_" not in f.parts]
    names = {}
    for f in files:
        cfg = load_config(f, ["model.pretrained=null"])
        names.setdefault(default_work_dir(cfg, f.relative_to(ROOT)), []).append(f)
    shared = {str(d): [str(f.relative_to(ROOT)) for f in fs] for d, fs in names.items() if len(fs) > 1}
    assert not shared, shared
    assert len(names) == len(files) > 20
    ess = load_config(ROOT / "configs/ess/ade20k_r50.yaml", ["model.pretrained=null"])
    assert default_work_dir(ess, "configs/ess/ade20k_r50.yaml") == Path("work_dirs/ess_ade20k_r50")
    assert default_work_dir(ess, ROOT / "configs/baseline/ade20k_r50.yaml") == Path("work_dirs/baseline_ade20k_r50")
    assert default_work_dir(load_config(), None) == Path("work_dirs/default")
    assert default_work_dir(load_config(None, ["work_dir=mine"]), "configs/ess/ade20k_r50.yaml") == Path("mine")


def test_train_cli_uses_the_config_files_default_work_dir(tmp_path, monkeypatch):
    from tests.conftest import TINY as tiny

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for folder in ("a", "b"):
        (tmp_path / folder / "run.yaml").write_text("train:\n  iters: 1\n  checkpoint_interval: 1\n")
    monkeypatch.chdir(tmp_path)
    rest = [o for o in tiny if not o.startswith(("train.iters", "train.checkpoint"))]
    assert main(["train", "a/run.yaml", *rest]) == 0
    assert main(["train", "b/run.yaml", *rest]) == 0
    assert (tmp_path / "work_dirs/a_run/iter_000001.pth").exists() and (tmp_path / "work_dirs/b_run/iter_000001.pth").exists()


def test_data_root_is_stored_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    from tests.test_folder_runs import make_folder_dataset

    make_folder_dataset(tmp_path / "mine")
    work = tmp_path / "run"
    cfg = load_config(None, [*RUN, "train.iters=2", "data.dataset=folder", "data.root=mine", "data.num_classes=3"])
    Trainer(cfg, work_dir=work).run()
    saved = load_config(work / "config.yaml")
    assert saved.data.root == str(tmp_path / "mine")
    assert load_checkpoint(work / "iter_000002.pth")["config"]["data"]["root"] == str(tmp_path / "mine")
    monkeypatch.chdir(ROOT)  # eval from another directory finds the data
    assert main(["eval", str(work), "--no-progress"]) == 0


# ------------------------------------------------------------------------------------------------
# the end of a run


def test_a_kill_after_the_final_checkpoint_is_finished_on_resume(tmp_path, monkeypatch):
    work = tmp_path / "run"
    cfg = load_config(None, RUN)

    def killed(self):
        raise KeyboardInterrupt  # as if the process died here: after the final checkpoint, before the report

    monkeypatch.setattr(FinalReport, "after_train", killed)
    with pytest.raises(KeyboardInterrupt):
        Trainer(cfg, work_dir=work).run()
    monkeypatch.undo()
    assert (work / "iter_000006.pth").exists() and not (work / "curves.png").exists()
    assert not (work / "eval" / "iter_000006" / "metrics.json").exists()
    result = Trainer(cfg, work_dir=work, resume=True).run()  # no "raise train.iters": finishes the report
    metrics = json.loads((work / "eval" / "iter_000006" / "metrics.json").read_text())
    assert metrics["mIoU"] == result["mIoU"] and (work / "curves.png").exists()
    rows = [json.loads(line) for line in (work / "scalars.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in rows if r["split"] == "val"] == [6]  # the final eval is recorded once
    assert "the run stopped before its final report" in (work / "train.log").read_text()
    with pytest.raises(Exception, match="nothing left to train .the run is complete"):
        Trainer(cfg, work_dir=work, resume=True).run()


def test_tensorboard_steps_are_not_repeated_after_a_resume(tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    work = tmp_path / "run"
    overrides = [*TINY, "train.tensorboard=true", "train.checkpoint_interval=3"]
    real_set_lr = trainer_module.set_poly_lr

    def crash_at_6(optimizer, it, total, warmup=0):
        if it == 5:  # iterations 4 and 5 were logged after the checkpoint at 3
            raise KeyboardInterrupt
        real_set_lr(optimizer, it, total, warmup)

    monkeypatch.setattr(trainer_module, "set_poly_lr", crash_at_6)
    with pytest.raises(KeyboardInterrupt):
        Trainer(load_config(None, overrides), work_dir=work).run()
    monkeypatch.undo()
    Trainer(load_config(None, overrides), work_dir=work, resume=True).run()
    acc = EventAccumulator(str(work / "tensorboard"))
    acc.Reload()
    steps = [e.step for e in acc.Scalars("train/loss")]
    assert steps == [1, 2, 3, 4, 5, 6]
    rows = [json.loads(line) for line in (work / "scalars.jsonl").read_text().splitlines()]
    assert [e.value for e in acc.Scalars("train/loss")] == pytest.approx([r["loss"] for r in rows if r["split"] == "train"])


def test_resume_ckpt_into_another_runs_work_dir_is_refused(tmp_path):
    from scaleseg.engine.workdir import WorkDirError

    a, b = tmp_path / "a", tmp_path / "b"
    cfg = load_config(None, [*RUN, "train.iters=2"])
    Trainer(cfg, work_dir=a).run()
    Trainer(cfg, work_dir=b).run()
    before = snapshot(a)
    longer = load_config(None, [*RUN, "train.iters=4"])
    with pytest.raises(WorkDirError, match=r"--resume .*iter_000002.pth: the work dir .*a holds another run"):
        Trainer(longer, work_dir=a, resume=b / "iter_000002.pth").run()
    assert snapshot(a) == before
    Trainer(longer, work_dir=a, resume=a / "iter_000002.pth").run()  # its own checkpoint: fine
    assert (a / "iter_000004.pth").exists()
