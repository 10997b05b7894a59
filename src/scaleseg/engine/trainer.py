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
import json
import math
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

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
from scaleseg.engine.evaluator import evaluate, format_table, summary, write_results
from scaleseg.engine.optim import build_optimizer, set_poly_lr
from scaleseg.engine.runtime import (
    amp_dtype,
    configure_determinism,
    log_to,
    peak_memory_mb,
    seed_all,
)
from scaleseg.errors import CheckpointError, ConfigError, ScalesegError
from scaleseg.models import build_model
from scaleseg.viz.curves import plot_training_curves


class NonFiniteLossError(ScalesegError):
    """train.max_nonfinite_steps steps in a row had a NaN/inf loss or gradient."""


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


class Trainer:
    def __init__(self, cfg: Config, work_dir: str | Path | None = None, resume: bool | str | Path = False) -> None:
        self.cfg = cfg
        self.work_dir = Path(work_dir) if work_dir else default_work_dir(cfg)
        self.resume = resume

    # ---------------------------------------------------------------------------------------
    def run(self) -> dict:
        """Train, evaluate, checkpoint; return the final evaluation summary (percent).

        Started by torchrun (WORLD_SIZE > 1), every process runs this: DistributedDataParallel over
        the process group, each process its share of every batch; only rank 0 logs and writes files."""
        owns_group = not distributed.is_enabled()
        self.ctx = distributed.env_context()
        self.work_dir.mkdir(parents=True, exist_ok=True)
        main = self.ctx.is_main
        try:
            with log_to(self.work_dir / "train.log" if main else None, console=main) as log:
                self.log = log
                return self._run()
        finally:
            if owns_group:
                distributed.shutdown()

    def _run(self) -> dict:
        cfg, tcfg = self.cfg, self.cfg.train
        ctx = self.ctx
        _, device = distributed.init_distributed(tcfg.device)
        main = ctx.is_main
        amp = amp_dtype(tcfg, device)
        configure_determinism(tcfg.deterministic)
        seed_all(tcfg.seed)
        writer = self._open_tensorboard() if tcfg.tensorboard and main else None

        train_set = build_dataset(cfg.data, "train")
        val_set = build_dataset(cfg.data, "val")
        meta = dataset_meta(train_set, cfg)
        model = build_model(cfg.model, meta["num_classes"], meta["ignore_index"], cfg.optim.backbone_lr_mult).to(device)
        if ctx.enabled and tcfg.sync_bn:
            model = distributed.convert_sync_batchnorm(model, device)
        optimizer = build_optimizer(model, cfg.optim)
        scaler = torch.amp.GradScaler("cuda", enabled=amp == torch.float16)

        per_step = cfg.data.batch_size * tcfg.grad_accum * ctx.world_size  # samples per iteration, all processes
        start, best, position = 0, {"mIoU": None, "iteration": None}, 0
        if main:
            self._remove_unfinished_writes()
        checkpoint_path, checkpoint = self._resume_checkpoint()
        if checkpoint is not None:
            start, best, position = self._restore(checkpoint_path, checkpoint, model, optimizer, scaler, device, per_step)
        elif ctx.enabled:
            torch.manual_seed(tcfg.seed + 1_000_003 * ctx.rank)  # dropout: each process its own masks
        if start >= tcfg.iters:
            raise ConfigError(
                f"the checkpoint is at iteration {start} and train.iters = {tcfg.iters}: nothing left to train; "
                "raise train.iters to continue"
            )
        if main:
            save_config(cfg, self.work_dir / "config.yaml")
        scalars = self._open_scalars(start) if main else None

        with distributed.main_process_first(ctx):  # rank 0 scans and caches class sets, the others read them
            loader = build_train_loader(
                cfg.data, train_set, meta["ignore_index"], tcfg.seed, start=position,
                work_dir=self.work_dir, progress=tcfg.progress and main, rank=ctx.rank, world_size=ctx.world_size,
            )
        val_loader = build_eval_loader(cfg.data, val_set, meta["ignore_index"], ctx.rank, ctx.world_size)
        step_module = distributed.TrainStep(model)
        if ctx.enabled:
            from torch.nn.parallel import DistributedDataParallel

            step_module = DistributedDataParallel(step_module, device_ids=[device.index] if device.type == "cuda" else None)
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
            f"device {device}{processes}; work dir {self.work_dir}"
        )
        if start:
            self.log.info(f"resumed from {checkpoint_path} at iteration {start}")

        model.train()
        data_iter = iter(loader)
        sums: dict[str, float] = defaultdict(float)
        window = _new_window()
        skipped_in_a_row = 0
        final: dict = {}
        bar = tqdm(
            total=tcfg.iters, initial=start, desc="train", unit="it",
            disable=not (tcfg.progress and main), dynamic_ncols=True,
        )
        try:
            for it in range(start, tcfg.iters):
                iteration = it + 1
                set_poly_lr(optimizer, it, tcfg.iters, cfg.optim.warmup_iters)
                # BatchNorm running statistics change in the forward pass: kept to undo a skipped step's
                buffers = [b.detach().clone() for b in model.buffers()]
                values, problem = self._accumulate(step_module, data_iter, device, amp, scaler, window)
                grad_norm = None
                if problem is None:
                    if scaler.is_enabled():
                        scaler.unscale_(optimizer)
                    # the norm before clipping; with no clipping configured the factor is 1 (grads unchanged)
                    grad_norm = float(torch.nn.utils.clip_grad_norm_(
                        model.parameters(), cfg.optim.clip_grad_norm or math.inf
                    ))
                    if not math.isfinite(grad_norm) and not scaler.is_enabled():  # fp16: the scaler skips the step
                        problem = f"non-finite gradient norm ({grad_norm}) with loss {values}"
                if problem is not None:
                    optimizer.zero_grad(set_to_none=True)
                    with torch.no_grad():
                        for buffer, saved in zip(model.buffers(), buffers):
                            buffer.copy_(saved)
                    skipped_in_a_row += 1
                    self._skip_step(iteration, problem, skipped_in_a_row)
                else:
                    scaler.step(optimizer)
                    scaler.update()
                    optimizer.zero_grad(set_to_none=True)
                    skipped_in_a_row = 0
                    for k, v in values.items():
                        sums[k] += v
                    window["good"] += 1
                    window["grad_norm"] += grad_norm
                    bar.set_postfix(loss=f"{values['loss']:.3f}", refresh=False)
                window["iters"] += 1
                bar.update(1)

                if iteration % tcfg.log_interval == 0 or iteration == tcfg.iters:
                    self._log_step(iteration, optimizer, sums, window, device, scalars, writer)
                    sums.clear()
                    window = _new_window()

                last = iteration == tcfg.iters
                if (tcfg.eval_interval and iteration % tcfg.eval_interval == 0) or last:
                    results = evaluate(
                        model, val_loader, meta["num_classes"], meta["ignore_index"], cfg.eval, device, amp,
                        tcfg.progress and main,
                    )
                    best = self._after_eval(iteration, results, best, model, meta, scalars, writer)
                    if last:
                        final = results
                    window["start"] = time.perf_counter()  # evaluation time is not training time
                if iteration % tcfg.checkpoint_interval == 0 or last:
                    self._save(iteration, model, optimizer, scaler, meta, best, per_step)
        finally:
            bar.close()
            if scalars is not None:
                scalars.close()
            if writer is not None:
                writer.close()

        if main:
            out_dir = self.work_dir / "eval" / f"iter_{tcfg.iters:06d}"
            write_results(final, meta["class_names"], out_dir, extra={"iteration": tcfg.iters})
            curves = plot_training_curves(self.work_dir / "scalars.jsonl", self.work_dir / "curves.png")
            self.log.info("final evaluation on the val split:\n" + format_table(final, meta["class_names"]))
            self.log.info(f"metrics written to {out_dir}; training curves in {curves}")
        return summary(final)

    def _accumulate(self, step_module, data_iter, device, amp, scaler, window) -> tuple[dict, str | None]:
        """Forward and backward over train.grad_accum batches; -> (mean loss terms, None), or
        ({}, what was wrong) as soon as any process's loss is NaN/inf (the step's remaining batches are
        drawn but not used, so the sample stream stays aligned with the iteration count)."""
        accum = self.cfg.train.grad_accum
        values: dict[str, float] = defaultdict(float)
        for j in range(accum):
            t = time.perf_counter()
            batch = next(data_iter)
            window["data"] += time.perf_counter() - t
            window["skipped_samples"] += log_skipped(batch, self.log, "training")  # data.on_bad_sample=skip
            images = batch["image"].to(device, non_blocking=True)  # (B, 3, h, w)
            labels = batch["label"].to(device, non_blocking=True)  # (B, h, w)
            # with several processes, gradients are all-reduced on the step's last batch only
            sync = j == accum - 1 or not hasattr(step_module, "no_sync")
            with contextlib.nullcontext() if sync else step_module.no_sync():
                with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                    terms = step_module(images, labels)
                loss = terms["loss"].detach().float()
                finite = torch.isfinite(loss).to(torch.int64).reshape(1)
                if distributed.is_enabled():  # every process must agree to skip, or the all-reduce would hang
                    finite = distributed.all_reduce_sum(finite) == self.ctx.world_size
                if not bool(finite.all()):
                    for _ in range(accum - 1 - j):
                        next(data_iter)
                    local = {k: float(v.detach()) for k, v in terms.items()}
                    return {}, f"non-finite loss at batch {j + 1} of {accum} (this process: {local})"
                scaler.scale(terms["loss"] / accum).backward()
            for k, v in terms.items():
                values[k] += float(v.detach()) / accum
        return dict(values), None

    def _skip_step(self, iteration: int, problem: str, in_a_row: int) -> None:
        limit = self.cfg.train.max_nonfinite_steps
        self.log.warning(
            f"iter {iteration}: {problem}; step skipped, weights unchanged ({in_a_row} in a row, "
            f"the run stops at {limit})"
        )
        if in_a_row >= limit:
            last = find_last_checkpoint(self.work_dir) if self.ctx.is_main else None
            raise NonFiniteLossError(
                f"{in_a_row} training steps in a row had a NaN/inf loss or gradient (the last at iteration "
                f"{iteration}); stopped without writing a checkpoint. The last good checkpoint is "
                f"{last or 'none (none was written yet)'}"
                + ("; continue from it with --resume" if last else "")
                + ". Lower optim.lr, set optim.clip_grad_norm, use train.amp=none, or check the data "
                "(scaleseg check-data); train.max_nonfinite_steps sets how many skipped steps in a row are tolerated"
            )

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

    def _restore(self, path: Path, ckpt: dict, model, optimizer, scaler, device, per_step: int) -> tuple[int, dict, int]:
        """Load weights, optimizer, scaler and RNG state; -> (iteration, best, sample stream position)."""
        if "optimizer" not in ckpt:
            raise CheckpointError(
                f"{path} holds weights only (no optimizer state), so training cannot resume from it exactly; "
                "resume from an iter_*.pth checkpoint"
            )
        load_model_state(model, ckpt, path, self.cfg.to_dict())
        try:
            optimizer.load_state_dict(ckpt["optimizer"])
        except (ValueError, KeyError) as exc:
            raise CheckpointError(f"{path}: the optimizer state does not fit this model's parameter groups ({exc})")
        if ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        iteration = int(ckpt["iteration"])
        rng, ctx = ckpt["rng"], self.ctx
        ranks = rng.get("ranks") or []
        if ctx.enabled and len(ranks) != ctx.world_size:
            self.log.info(
                f"the checkpoint was written by {max(len(ranks), 1)} process(es), this run has {ctx.world_size}: "
                "the per-process random streams (dropout) restart from the seed"
            )
            torch.manual_seed(self.cfg.train.seed + 1_000_003 * ctx.rank + iteration)
            own = {"torch": torch.get_rng_state(), "cuda": []}
        else:
            own = ranks[ctx.rank] if ctx.enabled else rng
        torch.set_rng_state(own["torch"])
        if device.type == "cuda" and own.get("cuda"):
            torch.cuda.set_rng_state_all(own["cuda"])
        position = int(ckpt.get("samples_seen", iteration * per_step))
        return iteration, dict(ckpt["best"]), position

    def _state(self, iteration: int, model, meta: dict, best: dict) -> dict:
        return {
            "iteration": iteration,
            "model": model.state_dict(),
            "config": self.cfg.to_dict(),
            "num_classes": meta["num_classes"],
            "ignore_index": meta["ignore_index"],
            "class_names": meta["class_names"],
            "palette": meta["palette"],
            "best": dict(best),
            "scaleseg_version": scaleseg.__version__,
        }

    def _save(self, iteration: int, model, optimizer, scaler, meta: dict, best: dict, per_step: int) -> None:
        """Rank 0 writes iter_NNNNNN.pth atomically, then points last_checkpoint at it, then deletes the
        oldest: a kill at any moment leaves last_checkpoint naming a complete file. Every process's RNG
        state goes in (collected from all of them), so a resume with as many processes is exact."""
        own = {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        }
        ranks = distributed.all_gather_objects(own)
        if not self.ctx.is_main:
            return
        state = self._state(iteration, model, meta, best)
        state.update(
            optimizer=optimizer.state_dict(),
            scaler=scaler.state_dict() if scaler.is_enabled() else None,
            samples_seen=iteration * per_step,
            world_size=self.ctx.world_size,
            rng={**own, "ranks": ranks if self.ctx.enabled else []},
        )
        path = self.work_dir / f"iter_{iteration:06d}.pth"
        save_checkpoint(state, path)
        write_last_pointer(self.work_dir, path)
        keep = self.cfg.train.keep_checkpoints
        if keep:
            for old in sorted(self.work_dir.glob("iter_*.pth"))[:-keep]:
                old.unlink()

    def _after_eval(self, iteration: int, results: dict, best: dict, model, meta: dict, scalars, writer) -> dict:
        s = summary(results)
        self.log.info(
            f"eval iter {iteration}: " + "  ".join(f"{k} {v if v is None else f'{v:.2f}'}" for k, v in s.items())
        )
        skipped = results.get("skipped_samples", 0)
        if skipped:
            self.log.warning(f"eval iter {iteration}: {skipped} bad val samples skipped, not scored "
                             "(data.on_bad_sample=skip): " + "; ".join(results.get("skipped", [])))
        if scalars is not None:
            extra = {"skipped_samples": skipped} if skipped else {}
            scalars.write(json.dumps({"iter": iteration, "split": "val", **s, **extra}) + "\n")
            scalars.flush()
        if writer is not None:
            for k, v in s.items():
                if v is not None:
                    writer.add_scalar(f"val/{k}", v, iteration)
        miou = s["mIoU"]
        if miou is not None and (best["mIoU"] is None or miou > best["mIoU"]):
            best = {"mIoU": miou, "iteration": iteration}
            if self.ctx.is_main:
                save_checkpoint(self._state(iteration, model, meta, best), self.work_dir / "best.pth")
            self.log.info(f"new best mIoU {miou:.2f} at iteration {iteration}: saved best.pth")
        return best

    def _log_step(self, iteration, optimizer, sums, window, device, scalars, writer) -> None:
        """One log line and scalars record for the steps since the last one: loss terms averaged over the
        steps that were not skipped (and over processes), time per iteration, ETA, peak memory."""
        tcfg = self.cfg.train
        n, good = window["iters"], window["good"]
        keys = sorted(sums)
        if distributed.is_enabled():  # the same keys in every process: the same model and skipped steps
            reduced = distributed.all_reduce_sum(torch.tensor([sums[k] for k in keys], dtype=torch.float64, device=device))
            sums = dict(zip(keys, (reduced / self.ctx.world_size).tolist()))
            skipped = torch.tensor([window["skipped_samples"]], device=device)
            window["skipped_samples"] = int(distributed.all_reduce_sum(skipped))  # bad samples, all processes
        terms = {k: sums[k] / good for k in keys} if good else {}
        elapsed = time.perf_counter() - window["start"]
        per_iter = elapsed / n
        eta = per_iter * (tcfg.iters - iteration)
        kind, mem = peak_memory_mb(device)
        lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
        head_lr = lrs.get("decoder", next(iter(lrs.values())))
        if terms:
            loss_text = f"loss {terms['loss']:.4f}"
            others = [f"{k} {v:.4f}" for k, v in terms.items() if k != "loss"]
            if others:
                loss_text += " (" + ", ".join(others) + ")"
        else:
            loss_text = "no loss (every step skipped)"
        grad_norm = window["grad_norm"] / good if self.cfg.optim.clip_grad_norm is not None and good else None
        if grad_norm is not None:
            loss_text += f"  grad norm {grad_norm:.2f}"
        if good < n:
            loss_text += f"  skipped steps {n - good}"
        if window["skipped_samples"]:
            loss_text += f"  skipped bad samples {window['skipped_samples']}"
        self.log.info(
            f"iter {iteration}/{tcfg.iters}  lr {head_lr:.3e}  {loss_text}  time {per_iter:.3f}s/it "
            f"(data {window['data'] / n:.3f}s)  eta {_hms(eta)}  peak mem {mem:.0f} MiB ({kind})"
        )
        if scalars is None:
            return
        record = {
            "iter": iteration,
            "split": "train",
            "lr": lrs,
            **terms,
            "time_per_iter": per_iter,
            "data_time": window["data"] / n,
            f"peak_mem_mb_{kind}": mem,
        }
        if grad_norm is not None:
            record["grad_norm"] = grad_norm
        if good < n:
            record["skipped_steps"] = n - good
        if window["skipped_samples"]:
            record["skipped_samples"] = window["skipped_samples"]
        scalars.write(json.dumps(record) + "\n")
        scalars.flush()
        if writer is not None:
            for k, v in terms.items():
                writer.add_scalar(f"train/{k}", v, iteration)
            writer.add_scalar("train/lr", head_lr, iteration)

    def _open_scalars(self, start: int):
        """Append to scalars.jsonl, first dropping records past `start` (left by a run that crashed
        after its last checkpoint), so a resumed run's file reads like an uninterrupted one."""
        path = self.work_dir / "scalars.jsonl"
        if path.exists():
            kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["iter"] <= start]
            path.write_text("".join(line + "\n" for line in kept))
        return open(path, "a")

    def _open_tensorboard(self):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError(
                "train.tensorboard = true needs the tensorboard package: pip install 'scaleseg[tensorboard]'"
            ) from None
        return SummaryWriter(str(self.work_dir / "tensorboard"))


def _new_window() -> dict:
    """Counters of the steps since the last log line: start time, steps, steps not skipped, data time, grad norms."""
    return {"start": time.perf_counter(), "iters": 0, "good": 0, "data": 0.0, "grad_norm": 0.0, "skipped_samples": 0}


def _hms(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _architecture(model_cfg) -> str:
    """A one-line name of the network for the log, e.g. "DeepLabV3+ resnet50 (output stride 16)"."""
    norm = f", GroupNorm ({model_cfg.group_norm_channels} channels per group)" if model_cfg.norm == "group" else ""
    if model_cfg.decoder.type == "hrnet_fusion":
        return f"{model_cfg.backbone} with the stride-4 HRNetV2 fusion decoder{norm}"
    return f"DeepLabV3+ {model_cfg.backbone} (output stride {model_cfg.output_stride}){norm}"
