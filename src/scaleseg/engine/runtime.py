"""Device, seeding, determinism, mixed precision, memory readings and logging set-up."""

from __future__ import annotations

import contextlib
import logging
import os
import random
import resource
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from scaleseg.config import TrainConfig
from scaleseg.errors import ConfigError

logger = logging.getLogger("scaleseg")


def select_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device = {name!r} but no CUDA device is available; use train.device=cpu or auto")
    return torch.device(name)


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def configure_determinism(deterministic: bool) -> None:
    """deterministic: same results run to run on the same machine (slower on CUDA); otherwise let
    cuDNN pick the fastest kernels. Ops without a deterministic CUDA kernel (bilinear upsampling's
    backward) warn instead of failing."""
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    else:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.deterministic = False
        torch.backends.cudnn.benchmark = True


def amp_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    if cfg.amp == "none":
        return None
    if cfg.amp == "fp16" and device.type != "cuda":
        raise ConfigError("train.amp = 'fp16' needs a CUDA device; use train.amp=bf16 or none on CPU")
    return torch.float16 if cfg.amp == "fp16" else torch.bfloat16


def peak_memory_mb(device: torch.device) -> tuple[str, float]:
    """("cuda", max allocated MiB) on CUDA, else ("rss", peak resident set size MiB of this process)."""
    if device.type == "cuda":
        return "cuda", torch.cuda.max_memory_allocated(device) / 2**20
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return "rss", kb / 1024


def show_progress(enabled: bool, stream=None) -> bool:
    """Whether to draw a progress bar: asked for, and its stream (stderr) is a terminal. Piped or redirected
    output would fill with carriage-return redraws; it gets the periodic log lines alone."""
    stream = sys.stderr if stream is None else stream
    try:
        return bool(enabled) and stream.isatty()
    except (AttributeError, ValueError):  # a closed or unusual stream
        return False


class _LogFile(logging.FileHandler):
    """train.log: a failed write (disk full) ends the run with a message naming the file (logging's default
    prints a traceback and goes on)."""

    def handleError(self, record: logging.LogRecord) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, OSError):
            from scaleseg.engine.workdir import WriteFailed

            raise WriteFailed(Path(self.baseFilename), len(self.format(record).encode()) + 1, exc) from None
        super().handleError(record)

    def close(self) -> None:
        try:
            super().close()
        except OSError:  # flushing what could not be written: reported already
            pass


class _TqdmHandler(logging.Handler):
    """Console log lines that do not break a running progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stdout)
        except Exception:  # pragma: no cover - logging must never kill training
            self.handleError(record)


@contextlib.contextmanager
def log_to(path: Path | None, console: bool = True):
    """Route the "scaleseg" logger to the console and (if given) a file, for the duration."""
    handlers: list[logging.Handler] = []
    if console:
        h = _TqdmHandler()
        h.setFormatter(logging.Formatter("%(message)s"))
        handlers.append(h)
    if path is not None:
        try:
            h = _LogFile(path, mode="a")
        except OSError as exc:
            from scaleseg.engine.workdir import WriteFailed

            raise WriteFailed(Path(path), 0, exc) from None
        h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S"))
        handlers.append(h)
    if not handlers:  # other processes of a torchrun run: silent (no fallback to stderr for warnings)
        handlers.append(logging.NullHandler())
    old_level, old_propagate = logger.level, logger.propagate
    logger.setLevel(logging.INFO)
    logger.propagate = False
    for h in handlers:
        logger.addHandler(h)
    try:
        yield logger
    finally:
        for h in handlers:
            logger.removeHandler(h)
            h.close()
        logger.setLevel(old_level)
        logger.propagate = old_propagate
