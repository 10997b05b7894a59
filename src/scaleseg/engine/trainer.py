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

Work directory layout:
    config.yaml          the resolved config of the run
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
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

import scaleseg
from scaleseg.config import Config, save_config
from scaleseg.data import build_dataset, build_eval_loader, build_train_loader, log_skipped
from scaleseg.engine import distributed
from scaleseg.engine.checkpoint import (
    find_last_checkpoint,
    load_checkpoint,
    load_model_state,
    save_checkpoint,
    write_last_pointer,
)
from scaleseg.engine.evaluator import summary
from scaleseg.engine.hooks import Hook, NonFiniteLossError, Records, StepResult, default_hooks
from scaleseg.engine.optim import build_optimizer, set_poly_lr
from scaleseg.engine.runtime import amp_dtype, configure_determinism, log_to, seed_all
from scaleseg.errors import CheckpointError, ConfigError

__all__ = ["NonFiniteLossError", "TrainState", "Trainer", "dataset_meta", "default_work_dir"]


def default_work_dir(cfg: Config) -> Path:
    return Path(cfg.work_dir) if cfg.work_dir else Path("work_dirs") / cfg.name


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

    def state_dict(self) -> dict:
        return {"iteration": self.iteration, "samples_seen": self.samples_seen, "best": dict(self.best)}

    def load_state_dict(self, state: dict, per_step: int) -> None:
        self.iteration = int(state["iteration"])
        self.samples_seen = int(state.get("samples_seen", self.iteration * per_step))
        self.best = dict(state["best"])


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

    # ---------------------------------------------------------------------------------------
    def run(self) -> dict:
        """Train, evaluate, checkpoint; return the final evaluation summary (percent).

        Started by torchrun (WORLD_SIZE > 1), every process runs this: DistributedDataParallel over
        the process group, each process its share of every batch; only rank 0 logs and writes files."""
        owns_group = not distributed.is_enabled()
        self.ctx = distributed.env_context()
        self.is_main = self.ctx.is_main
        self.work_dir.mkdir(parents=True, exist_ok=True)
        try:
            with log_to(self.work_dir / "train.log" if self.is_main else None, console=self.is_main) as log:
                self.log = log
                hooks = self.hooks if self.hooks is not None else default_hooks(self.cfg, self.is_main)
                try:
                    self._setup()
                    for hook in hooks:
                        hook.trainer = self
                        hook.before_train()
                    self.model.train()
                    while self.state.iteration < self.cfg.train.iters:
                        step = self.run_step()
                        for hook in hooks:
                            hook.after_step(step)
                    for hook in hooks:
                        hook.after_train()
                finally:
                    for hook in hooks:
                        hook.close()
                    if self.records is not None:
                        self.records.close()
                return summary(self.final_results)
        finally:
            if owns_group:
                distributed.shutdown()

    def _setup(self) -> None:
        cfg, tcfg, ctx = self.cfg, self.cfg.train, self.ctx
        _, self.device = distributed.init_distributed(tcfg.device)
        self.amp = amp_dtype(tcfg, self.device)
        configure_determinism(tcfg.deterministic)
        seed_all(tcfg.seed)

        train_set = build_dataset(cfg.data, "train")
        val_set = build_dataset(cfg.data, "val")
        self.meta = meta = dataset_meta(train_set, cfg)
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
        start = self.state.iteration
        if start >= tcfg.iters:
            raise ConfigError(
                f"the checkpoint is at iteration {start} and train.iters = {tcfg.iters}: nothing left to train; "
                "raise train.iters to continue"
            )
        if self.is_main:
            save_config(cfg, self.work_dir / "config.yaml")
        self.records = Records(self.work_dir, start, tcfg.tensorboard, enabled=self.is_main)

        with distributed.main_process_first(ctx):  # rank 0 scans and caches class sets, the others read them
            loader = build_train_loader(
                cfg.data, train_set, meta["ignore_index"], tcfg.seed, start=self.state.samples_seen,
                work_dir=self.work_dir, progress=tcfg.progress and self.is_main, rank=ctx.rank,
                world_size=ctx.world_size,
            )
        self.data_iter = iter(loader)
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

    # ---------------------------------------------------------------------------------------
    def run_step(self) -> StepResult:
        """One optimizer step over train.grad_accum batches. A NaN/inf loss (on any process) or gradient
        norm skips it: no update, BatchNorm statistics restored; the NonFiniteGuard hook counts."""
        t0 = time.perf_counter()
        model, optimizer, scaler = self.model, self.optimizer, self.scaler
        iteration = self.state.iteration + 1
        set_poly_lr(optimizer, self.state.iteration, self.cfg.train.iters, self.cfg.optim.warmup_iters)
        # BatchNorm running statistics change in the forward pass: kept to undo a skipped step's
        buffers = [b.detach().clone() for b in model.buffers()]
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
            with torch.no_grad():
                for buffer, saved in zip(model.buffers(), buffers):
                    buffer.copy_(saved)
            terms = {}
        else:
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
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
        iter_*.pth that does, saying which files were passed over."""
        if not self.resume:
            return None, None
        if self.resume is not True:
            path = Path(self.resume)
            return path, load_checkpoint(path)
        candidates: list[Path] = []
        try:
            pointed = find_last_checkpoint(self.work_dir)
        except CheckpointError as exc:
            self.log.warning(str(exc))
            pointed = None
        if pointed is not None:
            candidates.append(pointed)
        candidates += [p for p in sorted(self.work_dir.glob("iter_*.pth"), reverse=True) if p not in candidates]
        if not candidates:
            self.log.info(f"--resume: no checkpoint in {self.work_dir} yet, starting from scratch")
            return None, None
        for path in candidates:
            try:
                return path, load_checkpoint(path)
            except CheckpointError as exc:
                self.log.warning(f"--resume: passing over {path.name}: {exc}")
        raise CheckpointError(
            f"--resume: none of the checkpoints in {self.work_dir} can be read "
            f"({', '.join(p.name for p in candidates)}); start a new run in another work dir"
        )

    def _restore(self, path: Path, ckpt: dict) -> None:
        """Load weights, optimizer, scaler, RNG state and the TrainState from a checkpoint."""
        if "optimizer" not in ckpt:
            raise CheckpointError(
                f"{path} holds weights only (no optimizer state), so training cannot resume from it exactly; "
                "resume from an iter_*.pth checkpoint"
            )
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
        """iter_NNNNNN.pth with everything a resume needs, then `last_checkpoint` pointing at it; every
        process's RNG state goes in (gathered from all: call it on every process). -> the path (rank 0)."""
        own = {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        }
        ranks = distributed.all_gather_objects(own)
        if not self.is_main:
            return None
        state = self._weights_state()
        state.update(
            optimizer=self.optimizer.state_dict(),
            scaler=self.scaler.state_dict() if self.scaler.is_enabled() else None,
            world_size=self.ctx.world_size,
            rng={**own, "ranks": ranks if self.ctx.enabled else []},
        )
        path = self.work_dir / f"iter_{self.state.iteration:06d}.pth"
        save_checkpoint(state, path)
        write_last_pointer(self.work_dir, path)
        return path


def _architecture(model_cfg) -> str:
    """A one-line name of the network for the log, e.g. "DeepLabV3+ resnet50 (output stride 16)"."""
    norm = f", GroupNorm ({model_cfg.group_norm_channels} channels per group)" if model_cfg.norm == "group" else ""
    if model_cfg.decoder.type == "hrnet_fusion":
        return f"{model_cfg.backbone} with the stride-4 HRNetV2 fusion decoder{norm}"
    return f"DeepLabV3+ {model_cfg.backbone} (output stride {model_cfg.output_stride}){norm}"
