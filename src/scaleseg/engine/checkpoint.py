"""Checkpoints: tensors and plain types only (load with `torch.load(weights_only=True)`), written
atomically (temporary file + fsync + rename), with a `last_checkpoint` pointer file."""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from scaleseg.errors import CheckpointError

FORMAT = "scaleseg-checkpoint"
LAST_POINTER = "last_checkpoint"


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _RecordingWriter:
    """A file wrapper that keeps the OSError of a failed write: torch.save reports a full disk as a bare
    RuntimeError ("unexpected pos ..."), so the cause is taken from here."""

    def __init__(self, file) -> None:
        self.file, self.error = file, None

    def write(self, data) -> int:
        try:
            return self.file.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        self.file.flush()

    def fileno(self) -> int:
        return self.file.fileno()


class _CountingSink:
    """Counts the bytes written to it: the size of a checkpoint that could not be written."""

    def __init__(self) -> None:
        self.size = 0

    def write(self, data) -> int:
        self.size += len(data)
        return len(data)

    def flush(self) -> None:
        pass


def serialized_size(obj) -> int:
    sink = _CountingSink()
    torch.save(obj, sink)
    return sink.size


def atomic_write_bytes(path: Path, write, size=None) -> None:
    """Call `write(file)` on a temporary file beside `path`, fsync it, then rename over `path`. A failure
    (disk full, read-only folder, I/O error) leaves `path` as it was, removes the temporary file and raises
    `WriteFailed` with the size it tried to write (`size`: bytes, or a function giving them)."""
    from scaleseg.engine.workdir import WriteFailed

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    writer = None
    try:
        with open(tmp, "wb") as f:
            writer = _RecordingWriter(f)
            write(writer)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:
        error = writer.error if writer is not None and writer.error is not None else exc
        if not isinstance(error, OSError):
            raise
        try:
            attempted = size() if callable(size) else size
        except Exception:  # noqa: BLE001 - the size is only for the message
            attempted = None
        raise WriteFailed(path, attempted, error) from None
    finally:
        try:
            if tmp.exists():
                tmp.unlink()
        except OSError:
            pass
    _fsync_dir(path.parent)


def write_text_atomic(path: Path, text: str) -> None:
    data = text.encode()
    atomic_write_bytes(path, lambda f: f.write(data), size=len(data))


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    payload = {"format": FORMAT, **state}
    atomic_write_bytes(path, lambda f: torch.save(payload, f), size=lambda: serialized_size(payload))


def write_last_pointer(work_dir: Path, checkpoint: Path) -> None:
    write_text_atomic(Path(work_dir) / LAST_POINTER, Path(checkpoint).name + "\n")


def find_last_checkpoint(work_dir: Path) -> Path | None:
    pointer = Path(work_dir) / LAST_POINTER
    if not pointer.is_file():
        return None
    path = Path(work_dir) / pointer.read_text().strip()
    if not path.is_file():
        raise CheckpointError(
            f"{pointer} names {path.name}, which does not exist; pass the checkpoint to resume from explicitly"
        )
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a scaleseg checkpoint safely (never executes code from the file)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as exc:
        raise CheckpointError(
            f"checkpoint {str(path)!r} cannot be read safely ({_load_failure(exc)}); it is corrupt, truncated, "
            "or not a tensors-only file; use another checkpoint"
        ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(
            f"{str(path)!r} is not a scaleseg checkpoint (no '{FORMAT}' marker); for ImageNet backbone "
            "weights use model.pretrained=<file> instead"
        )
    return state


def _load_failure(exc: BaseException) -> str:
    """What was wrong, in a few words. torch's weights-only refusal suggests loading with weights_only=False,
    which would run the file's code: that advice is never passed on, only what the file holds."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()
    if "Weights only load failed" in text or "WeightsUnpickler" in text:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text) or re.search(r"WeightsUnpickler error: ([^\n.]+)", text)
        what = f" ({found.group(1)})" if found else ""
        return f"it holds a pickled object other than tensors and plain types{what}, which is never loaded"
    return text.splitlines()[0] if text else type(exc).__name__


def architecture_differences(saved_cfg: dict, cfg: dict) -> list[str]:
    """Dotted model/num_classes settings that differ between a checkpoint's config and `cfg`."""
    keys = ["data.num_classes"]
    out = []
    for key in keys:
        a, b = _get(saved_cfg, key), _get(cfg, key)
        if a != b:
            out.append(f"{key}: checkpoint {a!r}, config {b!r}")
    for dotted, value in _flatten(cfg.get("model", {}), "model"):
        if dotted == "model.pretrained":
            continue
        saved = _get(saved_cfg, dotted)
        if saved != value:
            out.append(f"{dotted}: checkpoint {saved!r}, config {value!r}")
    return out


def load_model_state(model: nn.Module, checkpoint: dict[str, Any], path: str | Path, cfg_dict: dict | None = None) -> None:
    """Strictly load the checkpoint's weights; on any mismatch name what differs and what to do."""
    state = checkpoint.get("model")
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {str(path)!r} holds no model weights")
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or shapes:
        diffs = architecture_differences(checkpoint.get("config", {}), cfg_dict or {}) if cfg_dict else []
        lines = [f"checkpoint {str(path)!r} does not match the model built from the config:"]
        lines += [f"  {d}" for d in diffs]
        lines += [f"  shape {s}" for s in shapes[:5]]
        if missing:
            lines.append(f"  {len(missing)} weights missing from the checkpoint, e.g. {missing[:3]}")
        if unexpected:
            lines.append(f"  {len(unexpected)} weights not in the model, e.g. {unexpected[:3]}")
        lines.append("  evaluate it with the config it was trained with (the config.yaml in its work dir)")
        raise CheckpointError("\n".join(lines))
    model.load_state_dict(state)


def _get(d: dict, dotted: str):
    for part in dotted.split("."):
        if not isinstance(d, dict) or part not in d:
            return None
        d = d[part]
    return d


def _flatten(d: dict, prefix: str):
    for key, value in d.items():
        dotted = f"{prefix}.{key}"
        if isinstance(value, dict):
            yield from _flatten(value, dotted)
        else:
            yield dotted, value


def config_from_checkpoint(checkpoint: dict, overrides: list[str] | tuple[str, ...] = ()):
    """The config a checkpoint was trained with (keys of earlier versions carried over), plus overrides,
    without its ImageNet weights path (the checkpoint holds every weight)."""
    from scaleseg.config import apply_overrides, config_from_dict, migrate_renamed_keys

    raw = migrate_renamed_keys(checkpoint["config"])
    return config_from_dict(apply_overrides(raw, [*overrides, "model.pretrained=null"]))


def model_from_checkpoint(cfg, checkpoint: dict, path: str | Path) -> nn.Module:
    """The model of `cfg` with the checkpoint's weights (strict: any mismatch names what differs), in
    eval mode on the CPU. The one checkpoint -> model path of eval, predict, export and analyze."""
    from scaleseg.models import build_model

    for key in ("model", "config", "num_classes", "ignore_index"):
        if key not in checkpoint:
            raise CheckpointError(
                f"checkpoint {str(path)!r} has no {key!r} entry; use a checkpoint written by scaleseg train"
            )
    # the config's classes, so that a config for another class count is refused by the strict load
    model = build_model(cfg.model, cfg.data.num_classes, int(checkpoint["ignore_index"]))
    load_model_state(model, checkpoint, path, cfg.to_dict())
    return model.eval()


def load_checkpoint_model(checkpoint: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> tuple[nn.Module, dict, Any]:
    """(model in eval mode on the CPU, the checkpoint dict, its config with `overrides`), for predict and export."""
    ckpt = load_checkpoint(checkpoint)
    if "config" not in ckpt:
        raise CheckpointError(f"checkpoint {str(checkpoint)!r} has no 'config' entry; use a checkpoint written by scaleseg train")
    cfg = config_from_checkpoint(ckpt, list(overrides))
    return model_from_checkpoint(cfg, ckpt, checkpoint), ckpt, cfg


@dataclass
class Run:
    """What a command's target resolves to (`resolve_run`)."""

    cfg: Any  # scaleseg.config.Config, with the command's overrides and no ImageNet weights path
    checkpoint_path: Path
    checkpoint: dict
    run_dir: Path  # the work dir, or the folder of a checkpoint or config given on its own

    @property
    def eval_dir(self) -> Path:
        """Where `scaleseg eval` writes by default: <run dir>/eval/<checkpoint stem>."""
        return self.run_dir / "eval" / self.checkpoint_path.stem

    def model(self) -> nn.Module:
        return model_from_checkpoint(self.cfg, self.checkpoint, self.checkpoint_path)


def resolve_run(target: str | Path, overrides: list[str] | tuple[str, ...] = (), checkpoint: str | Path | None = None) -> Run:
    """The run a command means (eval, analyze):

    * a work dir of `scaleseg train`: its config.yaml, and `checkpoint`, else best.pth, else the checkpoint
      `last_checkpoint` names;
    * a checkpoint (.pth): the config stored in it;
    * a config file (.yaml): that config, with `checkpoint` (required).

    ImageNet weights are never needed (the checkpoint holds all weights), so `model.pretrained` is cleared
    and a config from another machine still loads. A run's own config.yaml from an earlier version has its
    renamed keys carried over."""
    import yaml

    from scaleseg.config import apply_overrides, config_from_dict, load_config, migrate_renamed_keys

    path = Path(target).expanduser()
    overrides = [*overrides, "model.pretrained=null"]
    if path.is_dir():
        config_file = path / "config.yaml"
        if not config_file.is_file():
            raise CheckpointError(f"{path} is not a work dir (no config.yaml); pass a work dir of `scaleseg train`, "
                                  "a checkpoint (.pth), or a config file with --checkpoint")
        if checkpoint is None:
            best = path / "best.pth"
            checkpoint = best if best.is_file() else find_last_checkpoint(path)
            if checkpoint is None:
                raise CheckpointError(f"no checkpoint in {path} (no best.pth, no last_checkpoint); pass --checkpoint")
        try:
            raw = yaml.safe_load(config_file.read_text()) or {}
        except yaml.YAMLError as exc:
            raise CheckpointError(f"{config_file} is not valid YAML ({exc}); pass a config file with --checkpoint") from None
        cfg = config_from_dict(apply_overrides(migrate_renamed_keys(raw), overrides))
        return Run(cfg, Path(checkpoint), load_checkpoint(checkpoint), path)
    if path.suffix == ".pth":
        ckpt = load_checkpoint(path)  # names the file if it does not exist
        return Run(config_from_checkpoint(ckpt, overrides), path, ckpt, path.parent)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        if checkpoint is None:
            raise CheckpointError(f"{path} is a config file: pass the checkpoint to use with --checkpoint")
        checkpoint = Path(checkpoint)
        return Run(load_config(path, overrides), checkpoint, load_checkpoint(checkpoint), checkpoint.parent)
    raise CheckpointError(f"{str(path)!r} does not exist; pass a work dir of `scaleseg train`, a checkpoint (.pth), "
                          "or a config file with --checkpoint")
