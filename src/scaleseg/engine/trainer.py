"""Iteration-based training with exact resume.

A run's state is: model weights, optimizer state (momentum buffers), GradScaler state, the
iteration, the position in the sample stream (iteration x batch x accumulation) and the torch RNG
states. All of it goes into every checkpoint, so `--resume` continues exactly: same LR schedule,
same batches in the same order with the same augmentations, same dropout masks.

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
from scaleseg.data import build_dataset, build_eval_loader, build_train_loader
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
    select_device,
)
from scaleseg.errors import CheckpointError, ConfigError, ScalesegError
from scaleseg.models import build_model
from scaleseg.viz.curves import plot_training_curves


class NonFiniteLossError(ScalesegError):
    """The loss became NaN or infinite."""


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
        """Train, evaluate, checkpoint; return the final evaluation summary (percent)."""
        self.work_dir.mkdir(parents=True, exist_ok=True)
        with log_to(self.work_dir / "train.log", console=True) as log:
            self.log = log
            return self._run()

    def _run(self) -> dict:
        cfg, tcfg = self.cfg, self.cfg.train
        device = select_device(tcfg.device)
        amp = amp_dtype(tcfg, device)
        configure_determinism(tcfg.deterministic)
        seed_all(tcfg.seed)
        writer = self._open_tensorboard() if tcfg.tensorboard else None

        train_set = build_dataset(cfg.data, "train")
        val_set = build_dataset(cfg.data, "val")
        meta = dataset_meta(train_set, cfg)
        model = build_model(cfg.model, meta["num_classes"], meta["ignore_index"], cfg.optim.backbone_lr_mult).to(device)
        optimizer = build_optimizer(model, cfg.optim)
        scaler = torch.amp.GradScaler("cuda", enabled=amp == torch.float16)

        start, best = 0, {"mIoU": None, "iteration": None}
        checkpoint_path = self._resume_path()
        if checkpoint_path is not None:
            start, best = self._restore(checkpoint_path, model, optimizer, scaler, device)
        if start >= tcfg.iters:
            raise ConfigError(
                f"the checkpoint is at iteration {start} and train.iters = {tcfg.iters}: nothing left to train; "
                "raise train.iters to continue"
            )
        save_config(cfg, self.work_dir / "config.yaml")
        scalars = self._open_scalars(start)

        per_step = cfg.data.batch_size * tcfg.grad_accum
        loader = build_train_loader(
            cfg.data, train_set, meta["ignore_index"], tcfg.seed, start=start * per_step,
            work_dir=self.work_dir, progress=tcfg.progress,
        )
        val_loader = build_eval_loader(cfg.data, val_set, meta["ignore_index"])
        n_params = sum(p.numel() for p in model.parameters())
        self.log.info(
            f"scaleseg {scaleseg.__version__}: {_architecture(cfg.model)}, "
            f"head {cfg.model.head.structure}/{cfg.model.head.scorer}, {n_params / 1e6:.2f}M parameters; "
            f"{meta['num_classes']} classes on {cfg.data.dataset} ({len(train_set)} train / {len(val_set)} val images); "
            f"{tcfg.iters} iterations of batch {cfg.data.batch_size} x {tcfg.grad_accum}; device {device}; "
            f"work dir {self.work_dir}"
        )
        if start:
            self.log.info(f"resumed from {checkpoint_path} at iteration {start}")

        model.train()
        data_iter = iter(loader)
        sums: dict[str, float] = defaultdict(float)
        window_start, window_iters, data_time, grad_norm_sum = time.perf_counter(), 0, 0.0, 0.0
        final: dict = {}
        bar = tqdm(
            total=tcfg.iters, initial=start, desc="train", unit="it", disable=not tcfg.progress, dynamic_ncols=True
        )
        try:
            for it in range(start, tcfg.iters):
                set_poly_lr(optimizer, it, tcfg.iters, cfg.optim.warmup_iters)
                for _ in range(tcfg.grad_accum):
                    t = time.perf_counter()
                    batch = next(data_iter)
                    data_time += time.perf_counter() - t
                    images = batch["image"].to(device, non_blocking=True)  # (B, 3, h, w)
                    labels = batch["label"].to(device, non_blocking=True)  # (B, h, w)
                    with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                        terms = model.loss(model(images), labels)
                    values = {k: float(v.detach()) for k, v in terms.items()}
                    if not math.isfinite(values["loss"]):
                        raise NonFiniteLossError(
                            f"non-finite loss at iteration {it + 1} ({values}); the last good checkpoint is "
                            f"{find_last_checkpoint(self.work_dir) or 'none yet'}. Lower optim.lr or use train.amp=none"
                        )
                    scaler.scale(terms["loss"] / tcfg.grad_accum).backward()
                    for k, v in values.items():
                        sums[k] += v / tcfg.grad_accum
                if cfg.optim.clip_grad_norm is not None:
                    scaler.unscale_(optimizer)
                    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.clip_grad_norm)
                    grad_norm_sum += float(grad_norm)  # before clipping
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                iteration = it + 1
                window_iters += 1
                bar.update(1)
                bar.set_postfix(loss=f"{values['loss']:.3f}", refresh=False)

                if iteration % tcfg.log_interval == 0 or iteration == tcfg.iters:
                    elapsed = time.perf_counter() - window_start
                    grad_norm = grad_norm_sum / window_iters if cfg.optim.clip_grad_norm is not None else None
                    self._log_step(
                        iteration, optimizer, sums, window_iters, elapsed, data_time, grad_norm, device, scalars, writer
                    )
                    sums.clear()
                    window_start, window_iters, data_time, grad_norm_sum = time.perf_counter(), 0, 0.0, 0.0

                last = iteration == tcfg.iters
                if (tcfg.eval_interval and iteration % tcfg.eval_interval == 0) or last:
                    results = evaluate(
                        model, val_loader, meta["num_classes"], meta["ignore_index"], cfg.eval, device, amp, tcfg.progress
                    )
                    best = self._after_eval(iteration, results, best, model, meta, scalars, writer)
                    if last:
                        final = results
                    window_start = time.perf_counter()  # evaluation time is not training time
                if iteration % tcfg.checkpoint_interval == 0 or last:
                    self._save(iteration, model, optimizer, scaler, meta, best, per_step)
        finally:
            bar.close()
            scalars.close()
            if writer is not None:
                writer.close()

        out_dir = self.work_dir / "eval" / f"iter_{tcfg.iters:06d}"
        write_results(final, meta["class_names"], out_dir, extra={"iteration": tcfg.iters})
        curves = plot_training_curves(self.work_dir / "scalars.jsonl", self.work_dir / "curves.png")
        self.log.info("final evaluation on the val split:\n" + format_table(final, meta["class_names"]))
        self.log.info(f"metrics written to {out_dir}; training curves in {curves}")
        return summary(final)

    # ---------------------------------------------------------------------------------------
    def _resume_path(self) -> Path | None:
        if not self.resume:
            return None
        if self.resume is True:
            path = find_last_checkpoint(self.work_dir)
            if path is None:
                self.log.info(f"--resume: no checkpoint in {self.work_dir} yet, starting from scratch")
            return path
        return Path(self.resume)

    def _restore(self, path: Path, model, optimizer, scaler, device) -> tuple[int, dict]:
        ckpt = load_checkpoint(path)
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
        rng = ckpt["rng"]
        torch.set_rng_state(rng["torch"])
        if device.type == "cuda" and rng.get("cuda"):
            torch.cuda.set_rng_state_all(rng["cuda"])
        return int(ckpt["iteration"]), dict(ckpt["best"])

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
        state = self._state(iteration, model, meta, best)
        state.update(
            optimizer=optimizer.state_dict(),
            scaler=scaler.state_dict() if scaler.is_enabled() else None,
            samples_seen=iteration * per_step,
            rng={
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            },
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
        scalars.write(json.dumps({"iter": iteration, "split": "val", **s}) + "\n")
        scalars.flush()
        if writer is not None:
            for k, v in s.items():
                if v is not None:
                    writer.add_scalar(f"val/{k}", v, iteration)
        miou = s["mIoU"]
        if miou is not None and (best["mIoU"] is None or miou > best["mIoU"]):
            best = {"mIoU": miou, "iteration": iteration}
            save_checkpoint(self._state(iteration, model, meta, best), self.work_dir / "best.pth")
            self.log.info(f"new best mIoU {miou:.2f} at iteration {iteration}: saved best.pth")
        return best

    def _log_step(self, iteration, optimizer, sums, n, elapsed, data_time, grad_norm, device, scalars, writer) -> None:
        tcfg = self.cfg.train
        terms = {k: v / n for k, v in sums.items()}
        per_iter = elapsed / n
        eta = per_iter * (tcfg.iters - iteration)
        kind, mem = peak_memory_mb(device)
        lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
        head_lr = lrs.get("decoder", next(iter(lrs.values())))
        loss_text = f"loss {terms['loss']:.4f}"
        others = [f"{k} {v:.4f}" for k, v in terms.items() if k != "loss"]
        if others:
            loss_text += " (" + ", ".join(others) + ")"
        if grad_norm is not None:
            loss_text += f"  grad norm {grad_norm:.2f}"
        self.log.info(
            f"iter {iteration}/{tcfg.iters}  lr {head_lr:.3e}  {loss_text}  time {per_iter:.3f}s/it "
            f"(data {data_time / n:.3f}s)  eta {_hms(eta)}  peak mem {mem:.0f} MiB ({kind})"
        )
        record = {
            "iter": iteration,
            "split": "train",
            "lr": lrs,
            **terms,
            "time_per_iter": per_iter,
            "data_time": data_time / n,
            f"peak_mem_mb_{kind}": mem,
        }
        if grad_norm is not None:
            record["grad_norm"] = grad_norm
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


def _hms(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _architecture(model_cfg) -> str:
    """A one-line name of the network for the log, e.g. "DeepLabV3+ resnet50 (output stride 16)"."""
    if model_cfg.decoder.type == "hrnet_fusion":
        return f"{model_cfg.backbone} with the stride-4 HRNetV2 fusion decoder"
    return f"DeepLabV3+ {model_cfg.backbone} (output stride {model_cfg.output_stride})"
