"""What happens around a training step, one concern per hook (in the manner of detectron2's `HookBase`).

The trainer calls, on every process, `before_train()`, `after_step(step)` after each iteration and
`after_train()` once the last iteration is done, in the order of its hook list; `close()` always runs,
also when the run stops early. A hook reads what it needs from the trainer (`trainer.state`,
`trainer.model`, `trainer.records`, ...). Only rank 0 writes files (`trainer.is_main`), but a hook
that talks to the other processes (a log line's all-reduce, an evaluation, a checkpoint's RNG
gather) runs on all of them.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tqdm import tqdm

from scaleseg.engine import distributed
from scaleseg.engine.checkpoint import find_last_checkpoint, write_text_atomic
from scaleseg.engine.evaluator import format_table, summary, write_results
from scaleseg.engine.runtime import peak_memory_mb, show_progress
from scaleseg.engine.workdir import WriteFailed
from scaleseg.errors import CheckpointError, ScalesegError
from scaleseg.viz.curves import plot_training_curves

if TYPE_CHECKING:  # pragma: no cover
    from scaleseg.engine.trainer import Trainer


class NonFiniteLossError(ScalesegError):
    """train.max_nonfinite_steps steps in a row had a NaN/inf loss or gradient."""


@dataclass
class StepResult:
    """One iteration as the hooks see it."""

    iteration: int  # 1-based: the iteration just done
    terms: dict[str, float]  # mean loss terms over the accumulated batches; {} if the step was skipped
    problem: str | None = None  # why the step was skipped (NaN/inf loss or gradient), else None
    grad_norm: float | None = None  # the global gradient norm before clipping
    data_time: float = 0.0  # seconds spent waiting for batches
    step_time: float = 0.0  # seconds of the whole step (data, forward, backward, optimizer)
    skipped_samples: int = 0  # bad samples replaced by the next good one (data.on_bad_sample=skip)


class Hook:
    trainer: "Trainer"

    def before_train(self) -> None: ...

    def after_step(self, step: StepResult) -> None: ...

    def after_train(self) -> None: ...

    def close(self) -> None: ...


class NonFiniteGuard(Hook):
    """A skipped step (NaN/inf loss or gradient; the step itself undid it) is logged; after
    train.max_nonfinite_steps in a row the run stops before anything else of that iteration is
    written, so the last checkpoint stays the last good one."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_a_row = 0

    def after_step(self, step: StepResult) -> None:
        if step.problem is None:
            self.in_a_row = 0
            return
        self.in_a_row += 1
        t = self.trainer
        t.log.warning(
            f"iter {step.iteration}: {step.problem}; step skipped, weights unchanged ({self.in_a_row} in a row, "
            f"the run stops at {self.limit})"
        )
        if self.in_a_row >= self.limit:
            try:
                last = find_last_checkpoint(t.work_dir) if t.is_main else None
            except CheckpointError:
                last = None
            raise NonFiniteLossError(
                f"{self.in_a_row} training steps in a row had a NaN/inf loss or gradient (the last at iteration "
                f"{step.iteration}); stopped without writing a checkpoint. The last good checkpoint is "
                f"{last or 'none (none was written yet)'}"
                + ("; continue from it with --resume" if last else "")
                + ". Lower optim.lr, set optim.clip_grad_norm, use train.amp=none, or check the data "
                "(scaleseg check-data); train.max_nonfinite_steps sets how many skipped steps in a row are tolerated"
            )


class ProgressBar(Hook):
    """A tqdm bar with ETA (rank 0, train.progress, and only on a terminal: piped or redirected output gets
    the log lines alone), the last loss beside it."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.bar = None

    def before_train(self) -> None:
        t = self.trainer
        self.bar = tqdm(total=t.cfg.train.iters, initial=t.state.iteration, desc="train", unit="it",
                        disable=not self.enabled, dynamic_ncols=True)

    def after_step(self, step: StepResult) -> None:
        if step.terms:
            self.bar.set_postfix(loss=f"{step.terms['loss']:.3f}", refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@dataclass
class _Window:
    """The steps since the last log line."""

    steps: int = 0
    good: int = 0  # steps not skipped
    time: float = 0.0
    data: float = 0.0
    grad_norm: float = 0.0
    skipped_samples: int = 0
    sums: dict[str, float] = field(default_factory=lambda: defaultdict(float))


def _training_stats(model) -> dict[str, float]:
    inner = getattr(model, "module", model)  # DistributedDataParallel wraps the Segmentor
    stats = getattr(inner, "training_stats", None)
    return stats() if callable(stats) else {}


class LogWriter(Hook):
    """Every train.log_interval iterations (and at the last): one log line and one scalars.jsonl record
    (and TensorBoard scalars) with the loss terms averaged over the steps not skipped (and over
    processes), the LR of every group, time per iteration, ETA and peak memory."""

    def __init__(self, interval: int) -> None:
        self.interval = interval
        self.window = _Window()

    def after_step(self, step: StepResult) -> None:
        w = self.window
        w.steps += 1
        w.time += step.step_time
        w.data += step.data_time
        w.skipped_samples += step.skipped_samples
        if step.problem is None:
            w.good += 1
            w.grad_norm += step.grad_norm or 0.0
            for k, v in step.terms.items():
                w.sums[k] += v
        if step.iteration % self.interval == 0 or step.iteration == self.trainer.cfg.train.iters:
            self._write(step.iteration)
            self.window = _Window()

    def _write(self, iteration: int) -> None:
        t, w = self.trainer, self.window
        keys = sorted(w.sums)
        sums, bad_samples = dict(w.sums), w.skipped_samples
        if distributed.is_enabled():  # the same keys in every process: the same model and skipped steps
            reduced = distributed.all_reduce_sum(torch.tensor([sums[k] for k in keys], dtype=torch.float64, device=t.device))
            sums = dict(zip(keys, (reduced / t.ctx.world_size).tolist()))
            bad_samples = int(distributed.all_reduce_sum(torch.tensor([bad_samples], device=t.device)))  # all processes
        terms = {k: sums[k] / w.good for k in keys} if w.good else {}
        per_iter = w.time / w.steps
        eta = per_iter * (t.cfg.train.iters - iteration)
        kind, mem = peak_memory_mb(t.device)
        lrs = {g["name"]: g["lr"] for g in t.optimizer.param_groups}
        head_lr = lrs.get("decoder", next(iter(lrs.values())))
        if terms:
            loss_text = f"loss {terms['loss']:.4f}"
            others = [f"{k} {v:.4f}" for k, v in terms.items() if k != "loss"]
            if others:
                loss_text += " (" + ", ".join(others) + ")"
        else:
            loss_text = "no loss (every step skipped)"
        grad_norm = w.grad_norm / w.good if t.cfg.optim.clip_grad_norm is not None and w.good else None
        if grad_norm is not None:
            loss_text += f"  grad norm {grad_norm:.2f}"
        stats = _training_stats(t.model)  # the head's own (the class index's recall, %, last measured)
        for name, value in stats.items():
            loss_text += f"  {name.replace('_', ' ')} {value:.1f}%"
        if w.good < w.steps:
            loss_text += f"  skipped steps {w.steps - w.good}"
        if bad_samples:
            loss_text += f"  skipped bad samples {bad_samples}"
        t.log.info(
            f"iter {iteration}/{t.cfg.train.iters}  lr {head_lr:.3e}  {loss_text}  time {per_iter:.3f}s/it "
            f"(data {w.data / w.steps:.3f}s)  eta {_hms(eta)}  peak mem {mem:.0f} MiB ({kind})"
        )
        record = {"iter": iteration, "split": "train", "lr": lrs, **terms, "time_per_iter": per_iter,
                  "data_time": w.data / w.steps, f"peak_mem_mb_{kind}": mem}
        if grad_norm is not None:
            record["grad_norm"] = grad_norm
        record.update(stats)
        if w.good < w.steps:
            record["skipped_steps"] = w.steps - w.good
        if bad_samples:
            record["skipped_samples"] = bad_samples
        t.records.write(record)
        t.records.scalars("train", {**terms, "lr": head_lr}, iteration)


class Evaluation(Hook):
    """Every train.eval_interval iterations and at the last: evaluate on the val split (all processes,
    each its share), log the summary, record it, and keep best.pth (weights of the best val mIoU)."""

    def __init__(self, interval: int) -> None:
        self.interval = interval

    def after_step(self, step: StepResult) -> None:
        t = self.trainer
        last = step.iteration == t.cfg.train.iters
        if not (last or (self.interval and step.iteration % self.interval == 0)):
            return
        results = t.evaluate()
        s = summary(results)
        t.log.info(f"eval iter {step.iteration}: " + "  ".join(f"{k} {v if v is None else f'{v:.2f}'}" for k, v in s.items()))
        skipped = results.get("skipped_samples", 0)
        if skipped:
            t.log.warning(f"eval iter {step.iteration}: {skipped} bad val samples skipped, not scored "
                          "(data.on_bad_sample=skip): " + "; ".join(results.get("skipped", [])))
        t.records.write({"iter": step.iteration, "split": "val", **s, **({"skipped_samples": skipped} if skipped else {})})
        t.records.scalars("val", {k: v for k, v in s.items() if v is not None}, step.iteration)
        if last:
            t.final_results = results
        best = t.state.best
        miou = s["mIoU"]
        if miou is not None and (best["mIoU"] is None or miou > best["mIoU"]):
            t.state.best = {"mIoU": miou, "iteration": step.iteration}
            if t.is_main:
                t.save_weights(t.work_dir / "best.pth")
            t.log.info(f"new best mIoU {miou:.2f} at iteration {step.iteration}: saved best.pth")


class Checkpointer(Hook):
    """Every train.checkpoint_interval iterations and at the last: iter_NNNNNN.pth (everything a resume
    needs), written atomically, then `last_checkpoint`, then this run's oldest beyond train.keep_checkpoints
    deleted (`Trainer.save_checkpoint`): a kill at any moment leaves last_checkpoint naming a complete file."""

    def __init__(self, interval: int) -> None:
        self.interval = interval

    def after_step(self, step: StepResult) -> None:
        t = self.trainer
        if step.iteration % self.interval and step.iteration != t.cfg.train.iters:
            return
        t.save_checkpoint()


class FinalReport(Hook):
    """After the last iteration (rank 0): the final evaluation's metrics.json and per_class.csv under
    eval/iter_NNNNNN/, curves.png, and the metrics table in the log."""

    def after_train(self) -> None:
        t = self.trainer
        if not t.is_main:
            return
        iters = t.cfg.train.iters
        out_dir = final_report_dir(t.work_dir, iters)
        write_results(t.final_results, t.meta["class_names"], out_dir, extra={"iteration": iters})
        try:
            curves = plot_training_curves(t.work_dir / "scalars.jsonl", t.work_dir / "curves.png")
        except OSError as exc:
            raise WriteFailed(t.work_dir / "curves.png", None, exc) from None
        t.log.info("final evaluation on the val split:\n" + format_table(t.final_results, t.meta["class_names"]))
        t.log.info(f"metrics written to {out_dir}; training curves in {curves}")


def final_report_dir(work_dir: Path, iters: int) -> Path:
    return Path(work_dir) / "eval" / f"iter_{iters:06d}"


def final_report_done(work_dir: Path, iters: int) -> bool:
    """Whether the final report of a run of `iters` iterations was written (its last step: curves.png)."""
    return (final_report_dir(work_dir, iters) / "metrics.json").is_file() and (Path(work_dir) / "curves.png").is_file()


class Records:
    """scalars.jsonl (one JSON object per record) and, with train.tensorboard, TensorBoard scalars; rank 0
    only (elsewhere every call does nothing). Opening drops records past the resumed iteration (left by a
    run that crashed after its last checkpoint), so a resumed run's file reads like an uninterrupted one."""

    def __init__(self, work_dir, start: int, tensorboard: bool, enabled: bool) -> None:
        self.file = self.writer = None
        if not enabled:
            return
        self.path = path = work_dir / "scalars.jsonl"
        if path.exists():
            kept = [line for line in path.read_text().splitlines() if line and _record_iter(line) <= start]
            write_text_atomic(path, "".join(line + "\n" for line in kept))
        try:
            self.file = open(path, "a")
        except OSError as exc:
            raise WriteFailed(path, 0, exc) from None
        if tensorboard:
            # TensorBoard drops the steps a killed run wrote after the checkpoint resumed from (purge_step)
            self.writer = _summary_writer(work_dir / "tensorboard", purge_step=start + 1 if start else None)

    def write(self, record: dict) -> None:
        if self.file is not None:
            line = json.dumps(record) + "\n"
            try:
                self.file.write(line)
                self.file.flush()
            except OSError as exc:
                raise WriteFailed(self.path, len(line.encode()), exc) from None

    def scalars(self, split: str, values: dict[str, float], iteration: int) -> None:
        if self.writer is not None:
            for k, v in values.items():
                self.writer.add_scalar(f"{split}/{k}", v, iteration)

    def close(self) -> None:
        for handle in (self.file, self.writer):
            if handle is not None:
                try:
                    handle.close()
                except OSError:  # the failed write was reported already
                    pass


def _record_iter(line: str) -> float:
    """The iteration of a scalars.jsonl line; a line cut short by a kill counts as past every checkpoint."""
    try:
        return json.loads(line)["iter"]
    except (ValueError, KeyError, TypeError):
        return float("inf")


def _summary_writer(path, purge_step=None):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        from scaleseg.errors import ConfigError

        raise ConfigError(
            "train.tensorboard = true needs the tensorboard package: pip install 'scaleseg[tensorboard]'"
        ) from None
    return SummaryWriter(str(path), purge_step=purge_step)


def default_hooks(cfg, is_main: bool) -> list[Hook]:
    """The hooks of `scaleseg train`, in the order they run after each step."""
    t = cfg.train
    return [
        NonFiniteGuard(t.max_nonfinite_steps),
        ProgressBar(show_progress(t.progress and is_main)),
        LogWriter(t.log_interval),
        Evaluation(t.eval_interval),
        Checkpointer(t.checkpoint_interval),
        FinalReport(),
    ]


def _hms(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
