"""Iteration-based training with exact resume.

A run's state is: model weights, optimizer state (momentum buffers), GradScaler state, the
iteration, the position in the sample stream (iteration x batch x accumulation) and the torch RNG
states. All of it goes into every checkpoint, so `--resume` continues exactly: same LR schedule,
same batches in the same order with the same augmentations, same dropout masks.

Several processes (`torchrun --nproc_per_node=N -m scaleseg train ...`): DistributedDataParallel,
SyncBatchNorm (train.sync_bn), each process a slice of every global batch (data.batch_size per
process), evaluation split across processes with the counts summed; rank 0 alone logs and writes.

A step whose loss or gradient is NaN/inf is skipped and logged; train.max_nonfinite_steps of them in
a row stop the run before it writes anything, so the last checkpoint stays the last good one.
Checkpoints are written atomically; a run killed at any moment resumes from the newest complete one.

A work dir holds one run. Before the first iteration the work dir is checked writable and locked
(`train.lock`, naming the pid of the training; a killed run's lock is taken over); a new run (no
--resume) in a work dir that holds another run's checkpoints is refused, and --resume only continues
the run of the work dir (its `run_id`), with the same model and classes. Pruning deletes only this
run's own checkpoints. A write that fails (disk full, ...) ends the run with one message naming the
work dir, the size it tried to write and the last good checkpoint; Ctrl-C stops after the current
iteration and writes a checkpoint there.

Work directory layout:
    config.yaml          the resolved config of the run (data.root made absolute)
    train.lock           while a training runs: its pid
    train.log            human log (iter, lr, loss terms, time/iter, ETA, peak memory)
    scalars.jsonl        one JSON object per log step and per evaluation
    tensorboard/         with train.tensorboard=true
    iter_NNNNNN.pth      checkpoints (the newest `keep_checkpoints` are kept)
    last_checkpoint      name of the newest checkpoint
    best.pth             weights with the best validation mIoU so far
    eval/iter_NNNNNN/    metrics.json and per_class.csv of the final evaluation
    curves.png           training loss and validation metrics against iteration
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import sys
import threading
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

import scaleseg
from scaleseg.config import Config, config_yaml
from scaleseg.data import build_dataset, build_eval_loader, build_train_loader, log_skipped
from scaleseg.engine import distributed
from scaleseg.engine.checkpoint import (
    LAST_POINTER,
    find_last_checkpoint,
    load_checkpoint,
    load_model_state,
    save_checkpoint,
    write_last_pointer,
    write_text_atomic,
)
from scaleseg.engine.evaluator import evaluate, summary
from scaleseg.engine.hooks import Hook, NonFiniteLossError, Records, StepResult, default_hooks, final_report_done
from scaleseg.engine.optim import build_optimizer, set_poly_lr
from scaleseg.engine.runtime import amp_dtype, configure_determinism, log_to, seed_all, show_progress
from scaleseg.engine.workdir import WorkDirError, WorkDirLock, WriteFailed, check_writable, describe_size
from scaleseg.errors import CheckpointError, ConfigError

__all__ = ["NonFiniteLossError", "TrainState", "Trainer", "TrainingInterrupted", "dataset_meta", "default_work_dir"]


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) stopped the run; the message says which checkpoint to --resume from (exit status 130).
    A KeyboardInterrupt, so code that catches those still does."""


def default_work_dir(cfg: Config, config_file: str | Path | None = None) -> Path:
    """cfg.work_dir, else work_dirs/default for the built-in run and work_dirs/<folder>_<stem> for a config
    file <folder>/<stem>.yaml (configs/ess/ade20k_r50.yaml -> work_dirs/ess_ade20k_r50), so that config files
    of one name in two folders (configs/ess/ and configs/baseline/) do not share a work dir; a file in the
    current folder: work_dirs/<stem>. Without the file: work_dirs/<cfg.name>."""
    if cfg.work_dir:
        return Path(cfg.work_dir)
    if config_file is None:
        return Path("work_dirs") / cfg.name
    path = Path(config_file).expanduser()
    folder = path.resolve().parent.name if path.parent != Path(".") else ""
    return Path("work_dirs") / (f"{folder}_{path.stem}" if folder else path.stem)


def _iteration_of(path: Path) -> int:
    try:
        return int(path.stem.split("_", 1)[1])
    except (IndexError, ValueError):
        return -1


def own_checkpoints(work_dir: Path) -> list[Path]:
    """iter_*.pth files of a work dir, newest iteration first."""
    return sorted(Path(work_dir).glob("iter_*.pth"), key=_iteration_of, reverse=True)


# keys that make a checkpoint another model or another task: a resume with any of them changed is refused
# (others, e.g. optim.lr or train.iters, may change on resume and are logged)
RUN_IDENTITY = ("data.dataset", "data.num_classes", "data.ignore_index")


def dataset_meta(dataset, cfg: Config) -> dict:
    """num_classes, ignore_index, class names and palette of the run (checked against the config)."""
    if dataset.num_classes != cfg.data.num_classes:
        raise ConfigError(
            f"data.num_classes = {cfg.data.num_classes} but dataset {cfg.data.dataset!r} has "
            f"{dataset.num_classes} classes; set data.num_classes={dataset.num_classes}"
        )
    ignore = cfg.data.ignore_index if cfg.data.ignore_index is not None else dataset.ignore_index
    return {
        "num_classes": dataset.num_classes,
        "ignore_index": int(ignore),
        "class_names": list(dataset.class_names),
        "palette": torch.as_tensor(np.asarray(dataset.palette, dtype=np.uint8)),
    }


@dataclass
class TrainState:
    """Where a run stands, beyond weights, optimizer and RNG: saved in every checkpoint."""

    iteration: int = 0  # optimizer steps done
    samples_seen: int = 0  # position in the training sample stream (all processes)
    best: dict = field(default_factory=lambda: {"mIoU": None, "iteration": None})  # best val mIoU so far
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex)  # which run a checkpoint belongs to
    checkpoints: list = field(default_factory=list)  # this run's iter_*.pth names, oldest first (for pruning)

    def state_dict(self) -> dict:
        return {"iteration": self.iteration, "samples_seen": self.samples_seen, "best": dict(self.best),
                "run_id": self.run_id, "checkpoints": list(self.checkpoints)}

    def load_state_dict(self, state: dict, per_step: int) -> None:
        self.iteration = int(state["iteration"])
        self.samples_seen = int(state.get("samples_seen", self.iteration * per_step))
        self.best = dict(state["best"])
        self.run_id = state.get("run_id") or self.run_id  # checkpoints of earlier versions have none
        self.checkpoints = list(state.get("checkpoints", []))


def snapshot_buffers(model: torch.nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(buffer, copy) for every buffer a checkpoint holds, to undo a skipped step. Non-persistent
    buffers are state derived from the rest (the class index's anchors, 46 MiB at 10^6 classes): not
    copied every step, but rebuilt after an undo (`restore_buffers`), as after loading a checkpoint."""
    return [(b, b.detach().clone()) for m in model.modules() for name, b in m._buffers.items()
            if b is not None and name not in m._non_persistent_buffers_set]


@torch.no_grad()
def restore_buffers(model: torch.nn.Module, saved: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Undo a skipped step: the copied buffers back, and every module's derived state marked for a
    rebuild (`reset_derived_state`, e.g. the class index re-assigns every class at its next step)."""
    for buffer, copy in saved:
        buffer.copy_(copy)
    for module in model.modules():
        reset = getattr(module, "reset_derived_state", None)
        if callable(reset):
            reset()


class Trainer:
    """`run()`: set up (data, model, optimizer, resume), then `run_step()` per iteration with the hooks
    (engine/hooks.py) after each: NaN guard, progress bar, log, evaluation, checkpoint, final report."""

    def __init__(
        self, cfg: Config, work_dir: str | Path | None = None, resume: bool | str | Path = False,
        hooks: list[Hook] | None = None,
    ) -> None:
        self.cfg = cfg
        self.work_dir = Path(work_dir) if work_dir else default_work_dir(cfg)
        self.resume = resume
        self.hooks = hooks
        self.records: Records | None = None  # scalars.jsonl / TensorBoard, opened by _setup
        self.final_results: dict = {}
        self.lock: WorkDirLock | None = None
        self.state: TrainState | None = None

    # ---------------------------------------------------------------------------------------
    def run(self) -> dict:
        """Train, evaluate, checkpoint; return the final evaluation summary (percent).

        Started by torchrun (WORLD_SIZE > 1), every process runs this: DistributedDataParallel over
        the process group, each process its share of every batch; only rank 0 logs and writes files."""
        owns_group = not distributed.is_enabled()
        self.ctx = distributed.env_context()
        self.is_main = self.ctx.is_main
        try:
            _, self.device = distributed.init_distributed(self.cfg.train.device)
            self._prepare_work_dir()
            with log_to(self.work_dir / "train.log" if self.is_main else None, console=self.is_main) as log:
                self.log = log
                try:
                    return self._train()
                except WriteFailed as exc:
                    raise self._write_failure(exc) from None
        finally:
            if self.lock is not None:
                self.lock.release()
            if owns_group:
                distributed.shutdown()

    def _train(self) -> dict:
        hooks = self.hooks if self.hooks is not None else default_hooks(self.cfg, self.is_main)
        # installed before the DataLoader workers are forked, so that they ignore Ctrl-C (the main process
        # stops them); until the first iteration Ctrl-C interrupts at once, as usual
        with _StopOnInterrupt(self.ctx) as stop:
            try:
                self._setup()
                for hook in hooks:
                    hook.trainer = self
                    hook.before_train()
                if self.state.iteration < self.cfg.train.iters:
                    self.model.train()
                    stop.deferred = True
                    try:
                        while self.state.iteration < self.cfg.train.iters:
                            step = self.run_step()
                            for hook in hooks:
                                hook.after_step(step)
                            if stop.requested() and self.state.iteration < self.cfg.train.iters:
                                self._stop_at_interrupt()
                    except KeyboardInterrupt as exc:
                        if isinstance(exc, TrainingInterrupted):
                            raise
                        raise TrainingInterrupted(self._interrupted_message()) from None
                    stop.deferred = False
                else:  # resumed from the final checkpoint of a run killed before its final report
                    self.final_results = self.evaluate()
                for hook in hooks:
                    hook.after_train()
            finally:
                for hook in hooks:
                    hook.close()
                if self.records is not None:
                    self.records.close()
        return summary(self.final_results)

    def _prepare_work_dir(self) -> None:
        """Before anything is written: the work dir must be writable, not in use by another training
        (train.lock) and, for a new run, hold no other run. Rank 0 checks; every process gets the verdict."""
        problem = None
        if self.is_main:
            try:
                check_writable(self.work_dir)
                self.lock = WorkDirLock(self.work_dir).acquire()
                if not self.resume:
                    self._refuse_another_run()
            except WorkDirError as exc:
                if self.lock is not None:
                    self.lock.release()
                    self.lock = None
                problem = exc
        verdict = distributed.all_gather_objects(str(problem) if problem else None)[0]
        if problem is not None:
            raise problem
        if verdict is not None:
            raise WorkDirError(verdict)

    def _refuse_another_run(self) -> None:
        """A new run must not mix its checkpoints with another run's (pruning, last_checkpoint, best.pth)."""
        found = [p.name for p in own_checkpoints(self.work_dir)[:3]]
        found += [n for n in ("best.pth", LAST_POINTER) if (self.work_dir / n).exists()]
        if found:
            raise WorkDirError(
                f"the work dir {self.work_dir} holds another run ({', '.join(found)}); nothing was changed. "
                "Continue that run with --resume, train in another work dir with --work-dir, or delete the folder "
                "to start over"
            )

    def _write_failure(self, exc: WriteFailed) -> WorkDirError:
        """One message for a write that failed mid-run: the work dir, what and how much it tried to write,
        and the last good checkpoint to --resume from."""
        last = None
        if self.is_main:
            with contextlib.suppress(CheckpointError, OSError):
                last = find_last_checkpoint(self.work_dir)
        cause = "the disk is full" if exc.disk_full else "a write failed"
        where = f"{exc.path.name} ({describe_size(exc.size)})"
        if last is not None:
            tail = (f"The last good checkpoint is {last} (intact): free space (or move the work dir), then run the "
                    "same command with --resume to continue from it")
        else:
            tail = "No checkpoint was written yet: free space (or use another --work-dir) and start the run again"
        return WorkDirError(
            f"training stopped at iteration {self.state.iteration if self.state else 0}: {cause} in the work dir "
            f"{self.work_dir}; could not write {where}: {exc.error.strerror or exc.error}. {tail}"
        )

    def _stop_at_interrupt(self) -> None:
        """Ctrl-C arrived during the iteration just done: write a checkpoint at it and stop."""
        iteration = self.state.iteration
        last = None
        if self.is_main:
            with contextlib.suppress(CheckpointError):
                last = find_last_checkpoint(self.work_dir)
        # every process must agree (saving gathers the RNG states of all)
        written = distributed.all_gather_objects(last is not None and _iteration_of(last) == iteration)[0]
        path = last if written else self.save_checkpoint()
        raise TrainingInterrupted(
            f"interrupted (Ctrl-C): stopped after iteration {iteration} of {self.cfg.train.iters} and saved "
            f"{path}; run the same command with --resume to continue from it"
        )

    def _interrupted_message(self) -> str:
        last = None
        with contextlib.suppress(CheckpointError):
            last = find_last_checkpoint(self.work_dir) if self.is_main else None
        at = self.state.iteration if self.state else 0
        if last is None:
            return f"interrupted at iteration {at} before any checkpoint was written; start the run again"
        return (f"interrupted at once (second Ctrl-C) during iteration {at + 1}; the last checkpoint is {last}: "
                "run the same command with --resume to continue from it")

    def _setup(self) -> None:
        cfg, tcfg, ctx = self.cfg, self.cfg.train, self.ctx
        self.amp = amp_dtype(tcfg, self.device)
        configure_determinism(tcfg.deterministic)
        seed_all(tcfg.seed)
        if self.lock is not None and self.lock.took_over:
            self.log.info(f"took over the lock {self.lock.path.name} of a training that is no longer running "
                          f"({self.lock.took_over})")
        _make_root_absolute(cfg)

        train_set = build_dataset(cfg.data, "train")
        val_set = build_dataset(cfg.data, "val")
        self.meta = meta = dataset_meta(train_set, cfg)
        _check_crop_fits(train_set, cfg)
        from scaleseg.models import build_model

        model = build_model(cfg.model, meta["num_classes"], meta["ignore_index"]).to(self.device)
        if ctx.enabled and tcfg.sync_bn:
            model = distributed.convert_sync_batchnorm(model, self.device)
        self.model = model
        self.optimizer = build_optimizer(model, cfg.optim)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp == torch.float16)
        self.per_step = cfg.data.batch_size * tcfg.grad_accum * ctx.world_size  # samples per iteration, all processes
        self.state = TrainState()
        if self.is_main:
            self._remove_unfinished_writes()
        checkpoint_path, checkpoint = self._resume_checkpoint()
        if checkpoint is not None:
            self._restore(checkpoint_path, checkpoint)
        elif ctx.enabled:
            torch.manual_seed(tcfg.seed + 1_000_003 * ctx.rank)  # dropout: each process its own masks
        self.state.run_id = distributed.all_gather_objects(self.state.run_id)[0]  # rank 0's for a new run
        start = self.state.iteration
        if start > tcfg.iters or (start == tcfg.iters and final_report_done(self.work_dir, tcfg.iters)):
            raise ConfigError(
                f"the checkpoint is at iteration {start} and train.iters = {tcfg.iters}: nothing left to train"
                + (" (the run is complete)" if start == tcfg.iters else "") + "; raise train.iters to continue"
            )
        if self.is_main:
            write_text_atomic(self.work_dir / "config.yaml", config_yaml(cfg))
        self.records = Records(self.work_dir, start, tcfg.tensorboard, enabled=self.is_main)

        with distributed.main_process_first(ctx):  # rank 0 scans and caches class sets, the others read them
            loader = build_train_loader(
                cfg.data, train_set, meta["ignore_index"], tcfg.seed, start=self.state.samples_seen,
                work_dir=self.work_dir, progress=show_progress(tcfg.progress and self.is_main), rank=ctx.rank,
                world_size=ctx.world_size,
            )
        self.data_iter = iter(loader) if start < tcfg.iters else None
        self.val_loader = build_eval_loader(cfg.data, val_set, meta["ignore_index"], ctx.rank, ctx.world_size)
        self.step_module = distributed.TrainStep(model)
        if ctx.enabled:
            from torch.nn.parallel import DistributedDataParallel

            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.step_module = DistributedDataParallel(self.step_module, device_ids=device_ids)
        n_params = sum(p.numel() for p in model.parameters())
        processes = (
            f"; {ctx.world_size} processes ({'SyncBatchNorm' if tcfg.sync_bn else 'per-process BatchNorm'}), "
            f"batch {cfg.data.batch_size} each"
            if ctx.enabled else ""
        )
        self.log.info(
            f"scaleseg {scaleseg.__version__}: {_architecture(cfg.model)}, "
            f"head {cfg.model.head.structure}/{cfg.model.head.scorer}, {n_params / 1e6:.2f}M parameters; "
            f"{meta['num_classes']} classes on {cfg.data.dataset} ({len(train_set)} train / {len(val_set)} val images); "
            f"{tcfg.iters} iterations of batch {cfg.data.batch_size * ctx.world_size} x {tcfg.grad_accum}; "
            f"device {self.device}{processes}; work dir {self.work_dir}"
        )
        if start:
            self.log.info(f"resumed from {checkpoint_path} at iteration {start}")
        if start == tcfg.iters:
            self.log.info(f"{checkpoint_path.name} is the final checkpoint but the run stopped before its final "
                          "report: running the final evaluation and writing the report")

    def evaluate(self) -> dict:
        """The model on the val split (every process its share), as the hooks and the final report use it."""
        return evaluate(
            self.model, self.val_loader, self.meta["num_classes"], self.meta["ignore_index"], self.cfg.eval,
            self.device, self.amp, show_progress(self.cfg.train.progress and self.is_main),
        )

    # ---------------------------------------------------------------------------------------
    def run_step(self) -> StepResult:
        """One optimizer step over train.grad_accum batches. A NaN/inf loss (on any process) or gradient
        norm skips it: no update, BatchNorm statistics restored; the NonFiniteGuard hook counts."""
        t0 = time.perf_counter()
        model, optimizer, scaler = self.model, self.optimizer, self.scaler
        iteration = self.state.iteration + 1
        set_poly_lr(optimizer, self.state.iteration, self.cfg.train.iters, self.cfg.optim.warmup_iters)
        # BatchNorm running statistics (and the ESS head's index and regulariser state) change in the
        # forward pass: kept to undo a skipped step's
        buffers = snapshot_buffers(model)
        terms, problem, data_time, skipped = self._accumulate()
        grad_norm = None
        if problem is None:
            if scaler.is_enabled():
                scaler.unscale_(optimizer)
            # the norm before clipping; with no clipping configured the factor is 1 (grads unchanged)
            grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), self.cfg.optim.clip_grad_norm or math.inf))
            if not math.isfinite(grad_norm) and not scaler.is_enabled():  # fp16: the scaler skips the step
                problem = f"non-finite gradient norm ({grad_norm}) with loss {terms}"
        if problem is not None:
            optimizer.zero_grad(set_to_none=True)
            restore_buffers(model, buffers)
            terms = {}
        else:
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            getattr(model, "module", model).after_optimizer_step()  # e.g. the sphere table's rows to unit norm
        self.state.iteration = iteration
        self.state.samples_seen += self.per_step
        return StepResult(iteration, terms, problem, grad_norm, data_time, time.perf_counter() - t0, skipped)

    def _accumulate(self) -> tuple[dict, str | None, float, int]:
        """Forward and backward over train.grad_accum batches; -> (mean loss terms, None, data time, bad
        samples skipped), or ({}, what was wrong, ...) as soon as any process's loss is NaN/inf (the step's
        remaining batches are drawn but not used, so the sample stream stays aligned with the iteration count)."""
        accum = self.cfg.train.grad_accum
        values: dict[str, float] = defaultdict(float)
        data_time, skipped = 0.0, 0
        for j in range(accum):
            t = time.perf_counter()
            batch = next(self.data_iter)
            data_time += time.perf_counter() - t
            skipped += log_skipped(batch, self.log, "training")  # data.on_bad_sample=skip: replaced, counted
            images = batch["image"].to(self.device, non_blocking=True)  # (B, 3, h, w)
            labels = batch["label"].to(self.device, non_blocking=True)  # (B, h, w)
            # with several processes, gradients are all-reduced on the step's last batch only
            sync = j == accum - 1 or not hasattr(self.step_module, "no_sync")
            with contextlib.nullcontext() if sync else self.step_module.no_sync():
                with torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
                    terms = self.step_module(images, labels)
                loss = terms["loss"].detach().float()
                finite = torch.isfinite(loss).to(torch.int64).reshape(1)
                if distributed.is_enabled():  # every process must agree to skip, or the all-reduce would hang
                    finite = distributed.all_reduce_sum(finite) == self.ctx.world_size
                if not bool(finite.all()):
                    for _ in range(accum - 1 - j):
                        next(self.data_iter)
                    local = {k: float(v.detach()) for k, v in terms.items()}
                    return {}, f"non-finite loss at batch {j + 1} of {accum} (this process: {local})", data_time, skipped
                self.scaler.scale(terms["loss"] / accum).backward()
            for k, v in terms.items():
                values[k] += float(v.detach()) / accum
        return dict(values), None, data_time, skipped

    # ---------------------------------------------------------------------------------------
    def _remove_unfinished_writes(self) -> None:
        """Delete temporary files of checkpoint writes that a killed run left (never a finished file)."""
        stale = [p for p in self.work_dir.glob(".*.tmp-*") if p.is_file()]
        for path in stale:
            path.unlink()
        if stale:
            self.log.info(f"removed {len(stale)} unfinished checkpoint write(s) of an interrupted run: "
                          + ", ".join(p.name for p in stale[:3]))

    def _resume_checkpoint(self) -> tuple[Path | None, dict | None]:
        """(path, loaded checkpoint) to resume from, or (None, None).

        `--resume CKPT` loads CKPT (any problem is an error). `--resume` alone takes the checkpoint
        `last_checkpoint` names; should that one not load (a damaged disk, a hand-edited file), the newest
        iter_*.pth of the same run that does, saying which files were passed over. A checkpoint of another
        run (another run_id) is never taken."""
        if not self.resume:
            return None, None
        if self.resume is not True:
            path = Path(self.resume)
            ckpt = load_checkpoint(path)
            self._refuse_another_runs_work_dir(path, ckpt)
            return path, ckpt
        candidates: list[Path] = []
        try:
            pointed = find_last_checkpoint(self.work_dir)
        except CheckpointError as exc:
            self.log.warning(f"--resume: {exc}; taking the newest checkpoint of the run that loads")
            pointed = None
        if pointed is not None:
            candidates.append(pointed)
        candidates += [p for p in own_checkpoints(self.work_dir) if p not in candidates]
        if not candidates:
            self.log.info(f"--resume: no checkpoint in {self.work_dir} yet, starting from scratch")
            return None, None
        newest: tuple[Path, dict] | None = None
        runs: list[tuple[Path, object]] = []  # (checkpoint, its run_id) of every checkpoint that loads
        for path in candidates:
            try:
                ckpt = load_checkpoint(path)
            except CheckpointError as exc:
                self.log.warning(f"--resume: passing over {path.name}: {exc}")
                continue
            if path == pointed:  # the run's own newest: the common case, nothing else is read
                return path, ckpt
            runs.append((path, ckpt.get("run_id")))
            if newest is None:
                newest = (path, ckpt)
            del ckpt  # only the newest is kept in memory
        if newest is None:
            raise CheckpointError(
                f"--resume: none of the checkpoints in {self.work_dir} can be read "
                f"({', '.join(p.name for p in candidates)}); start a new run in another work dir"
            )
        # no usable last_checkpoint: the newest that loads, provided every checkpoint there is of one run
        if len({run for _, run in runs}) > 1:
            listing = ", ".join(f"{p.name} (run {str(run)[:8]})" for p, run in runs)
            raise CheckpointError(
                f"--resume: the checkpoints in {self.work_dir} belong to {len({r for _, r in runs})} runs ({listing}) "
                f"and {LAST_POINTER} does not say which is this run's; give the one to continue with --resume CKPT"
            )
        return newest

    def _refuse_another_runs_work_dir(self, path: Path, ckpt: dict) -> None:
        """`--resume CKPT` into a work dir that holds another run would mix the two runs' files (pruning is
        safe, but last_checkpoint and best.pth are one per work dir)."""
        try:
            pointed = find_last_checkpoint(self.work_dir)
        except CheckpointError:
            return
        if pointed is None or pointed.resolve() == path.expanduser().resolve():
            return
        try:
            theirs = load_checkpoint(pointed).get("run_id")
        except CheckpointError:
            return
        if theirs is not None and theirs != ckpt.get("run_id"):
            raise WorkDirError(
                f"--resume {path}: the work dir {self.work_dir} holds another run (its last checkpoint is "
                f"{pointed.name}); continue {path.name} in its own work dir or in a new one with --work-dir"
            )

    def _check_same_run(self, path: Path, ckpt: dict) -> None:
        """A resume continues the run the checkpoint belongs to: the same model and classes (else refused,
        naming the keys that differ); other settings may change (a lower optim.lr after NaN steps, more
        train.iters), and what changed is logged."""
        saved = ckpt.get("config") or {}
        now = self.cfg.to_dict()
        refused = []
        for key, value in _flatten_dict(now):
            if (key.startswith("model.") and key != "model.pretrained") or key in RUN_IDENTITY:
                present, before = _lookup(saved, key)
                if present and before != value:  # a key the checkpoint's version did not have is not a change
                    refused.append(f"{key}: checkpoint {before!r}, config {value!r}")
        if refused:
            raise CheckpointError(
                f"--resume: {path} is a checkpoint of another model or task than this config:\n"
                + "".join(f"  {r}\n" for r in refused)
                + "  resume with the config it was trained with (the config.yaml in its work dir), or start a new "
                "run in another work dir"
            )
        changed = [f"{k}: {a!r} -> {b!r}" for k, a, b in _changed_keys(saved, now)
                   if not k.startswith(("model.", "work_dir", "name")) and k not in ("data.root",)]
        if changed:
            self.log.info("resuming with changed settings: " + "; ".join(changed))

    def _restore(self, path: Path, ckpt: dict) -> None:
        """Load weights, optimizer, scaler, RNG state and the TrainState from a checkpoint."""
        if "optimizer" not in ckpt:
            raise CheckpointError(
                f"{path} holds weights only (no optimizer state), so training cannot resume from it exactly; "
                "resume from an iter_*.pth checkpoint"
            )
        self._check_same_run(path, ckpt)
        load_model_state(self.model, ckpt, path, self.cfg.to_dict())
        try:
            self.optimizer.load_state_dict(ckpt["optimizer"])
        except (ValueError, KeyError) as exc:
            raise CheckpointError(f"{path}: the optimizer state does not fit this model's parameter groups ({exc})")
        if ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.state.load_state_dict(ckpt, self.per_step)
        rng, ctx = ckpt["rng"], self.ctx
        ranks = rng.get("ranks") or []
        if ctx.enabled and len(ranks) != ctx.world_size:
            self.log.info(
                f"the checkpoint was written by {max(len(ranks), 1)} process(es), this run has {ctx.world_size}: "
                "the per-process random streams (dropout) restart from the seed"
            )
            torch.manual_seed(self.cfg.train.seed + 1_000_003 * ctx.rank + self.state.iteration)
            own = {"torch": torch.get_rng_state(), "cuda": []}
        else:
            own = ranks[ctx.rank] if ctx.enabled else rng
        torch.set_rng_state(own["torch"])
        if self.device.type == "cuda" and own.get("cuda"):
            torch.cuda.set_rng_state_all(own["cuda"])

    # ---------------------------------------------------------------------------------------
    def _weights_state(self) -> dict:
        meta = self.meta
        return {
            **self.state.state_dict(),
            "model": self.model.state_dict(),
            "config": self.cfg.to_dict(),
            "num_classes": meta["num_classes"],
            "ignore_index": meta["ignore_index"],
            "class_names": meta["class_names"],
            "palette": meta["palette"],
            "scaleseg_version": scaleseg.__version__,
        }

    def save_weights(self, path: Path) -> None:
        """Weights, config and classes (what eval / predict / export need), atomically; rank 0 only."""
        save_checkpoint(self._weights_state(), path)

    def save_checkpoint(self) -> Path | None:
        """iter_NNNNNN.pth with everything a resume needs, then `last_checkpoint` pointing at it, then this
        run's oldest checkpoints beyond train.keep_checkpoints deleted (never a file of another run); every
        process's RNG state goes in (gathered from all: call it on every process). -> the path (rank 0)."""
        own = {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        }
        ranks = distributed.all_gather_objects(own)
        if not self.is_main:
            return None
        path = self.work_dir / f"iter_{self.state.iteration:06d}.pth"
        if path.name not in self.state.checkpoints:
            self.state.checkpoints.append(path.name)
        state = self._weights_state()
        state.update(
            optimizer=self.optimizer.state_dict(),
            scaler=self.scaler.state_dict() if self.scaler.is_enabled() else None,
            world_size=self.ctx.world_size,
            rng={**own, "ranks": ranks if self.ctx.enabled else []},
        )
        save_checkpoint(state, path)
        write_last_pointer(self.work_dir, path)
        keep = self.cfg.train.keep_checkpoints
        if keep:
            old, self.state.checkpoints = self.state.checkpoints[:-keep], self.state.checkpoints[-keep:]
            for name in old:  # the checkpoint just written lists them too: a resume deletes what is left over
                with contextlib.suppress(FileNotFoundError):
                    (self.work_dir / name).unlink()
        return path


def _lookup(d: dict, key: str) -> tuple[bool, object]:
    for part in key.split("."):
        if not isinstance(d, dict) or part not in d:
            return False, None
        d = d[part]
    return True, d


def _flatten_dict(d: dict, prefix: str = ""):
    for key, value in d.items():
        if isinstance(value, dict):
            yield from _flatten_dict(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _changed_keys(a: dict, b: dict, prefix: str = ""):
    for key in sorted(set(a) | set(b)):
        x, y = a.get(key), b.get(key)
        dotted = f"{prefix}{key}"
        if isinstance(x, dict) and isinstance(y, dict):
            yield from _changed_keys(x, y, dotted + ".")
        elif x != y:
            yield dotted, x, y


def _make_root_absolute(cfg: Config) -> None:
    """data.root as an absolute path, so the config.yaml and checkpoints of the run work from any folder."""
    if cfg.data.root:
        root = Path(cfg.data.root).expanduser()
        if not root.is_absolute():
            cfg.data.root = str(root.resolve())


def _check_crop_fits(dataset, cfg: Config) -> None:
    """A file dataset's training crop must fit in at least one image resized by the largest scale (the synthetic
    set's sizes are known and checked by the config): otherwise every crop would be mostly padding. Reads image
    headers only, and stops at the first image that fits (the first, as a rule)."""
    samples = getattr(dataset, "samples", None)
    if not samples or cfg.data.dataset == "synthetic":
        return
    from PIL import Image

    crop, high = cfg.data.train_pipeline.crop_size, cfg.data.train_pipeline.scale_range[1]
    largest = (0, 0)
    for sample in samples:
        try:
            with Image.open(sample.image) as im:
                w, h = im.size
        except (OSError, AttributeError, ValueError):  # unreadable: the loader reports it, naming the file
            return
        if crop[0] <= int(h * high) and crop[1] <= int(w * high):
            return
        largest = max(largest, (h, w), key=lambda s: s[0] * s[1])
    raise ConfigError(
        f"data.train_pipeline.crop_size = {list(crop)} is larger than every training image resized by "
        f"data.train_pipeline.scale_range high {high} (largest {largest[0]}x{largest[1]} (height x width) -> "
        f"{int(largest[0] * high)}x{int(largest[1] * high)}); every crop would be mostly padding: lower the crop "
        "size or raise the scale range"
    )


class _StopOnInterrupt:
    """While training: the first Ctrl-C (SIGINT) asks the run to stop after the current iteration (the
    trainer then writes a checkpoint); a second one interrupts at once. DataLoader workers (forked with
    this handler) ignore it: the main process stops them. Several processes agree on the iteration to
    stop at (one all-reduce per step). Outside the main thread nothing is installed."""

    def __init__(self, ctx) -> None:
        self.ctx = ctx
        self.flag = False
        self.deferred = False  # True while iterating: Ctrl-C asks for a stop after the iteration
        self.previous = None
        self.pid = os.getpid()

    def __enter__(self) -> "_StopOnInterrupt":
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)

    def _handle(self, signum, frame) -> None:
        if os.getpid() != self.pid:  # a forked DataLoader worker: the main process decides
            return
        if self.flag or not self.deferred:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        self.flag = True
        print("\nCtrl-C: stopping after this iteration and saving a checkpoint (Ctrl-C again to stop at once)",
              file=sys.stderr, flush=True)

    def requested(self) -> bool:
        if not self.ctx.enabled:
            return self.flag
        flag = torch.tensor([1 if self.flag else 0], dtype=torch.int64)
        if torch.distributed.get_backend() == "nccl":
            flag = flag.cuda()
        return bool(distributed.all_reduce_sum(flag).item())


def _architecture(model_cfg) -> str:
    """A one-line name of the network for the log, e.g. "DeepLabV3+ resnet50 (output stride 16)"."""
    norm = f", GroupNorm ({model_cfg.group_norm_channels} channels per group)" if model_cfg.norm == "group" else ""
    if model_cfg.decoder.type == "hrnet_fusion":
        return f"{model_cfg.backbone} with the stride-4 HRNetV2 fusion decoder{norm}"
    return f"DeepLabV3+ {model_cfg.backbone} (output stride {model_cfg.output_stride}){norm}"
