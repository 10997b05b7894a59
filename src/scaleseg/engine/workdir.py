"""A training run's work dir: checked before the first iteration, locked while a run trains in it, and every
write failure (a full disk, a read-only or vanished folder) turned into one message that says what was lost.

* `check_writable(folder)`: creates, writes, fsyncs and deletes a probe file, so that a read-only folder
  (or one on a full disk) is refused before any work is done, not when the first checkpoint is due.
* `WorkDirLock`: `train.lock` in the work dir, held with `flock` while a run trains; it names the holder's
  pid. The kernel releases a flock when its process dies (even by SIGKILL), so the lock of a killed run is
  stale by construction and the next run takes it over; a live holder is refused.
* `WriteFailed`: raised by the write layer (checkpoints, scalars.jsonl, train.log, metrics, plots) with the
  file, the number of bytes it tried to write and the OS error; the trainer adds the work dir and the last
  good checkpoint (`Trainer.run`).
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import time
from pathlib import Path

from scaleseg.errors import ScalesegError

LOCK_NAME = "train.lock"


class WorkDirError(ScalesegError):
    """The work dir cannot be used: not writable, locked by a running training, or holding another run."""


class WriteFailed(ScalesegError):
    """Writing a file failed (disk full, read-only, I/O error); what, how much and why."""

    def __init__(self, path: Path, size: int | None, error: OSError) -> None:
        self.path, self.size, self.error = Path(path), size, error
        super().__init__(f"cannot write {self.path} ({describe_size(size)}): {reason(error)}")

    @property
    def disk_full(self) -> bool:
        return self.error.errno in (errno.ENOSPC, errno.EDQUOT)


def reason(error: OSError) -> str:
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"no space left on the device ({os.strerror(error.errno)}, errno {error.errno})"
    text = error.strerror or str(error) or type(error).__name__
    return f"{text} (errno {error.errno})" if error.errno is not None else text


def describe_size(size: int | None) -> str:
    if size is None:
        return "size unknown"
    if size < 1024:
        return f"{size} bytes"
    if size < 2**20:
        return f"{size / 1024:.1f} KiB"
    if size < 2**30:
        return f"{size / 2**20:.1f} MiB"
    return f"{size / 2**30:.2f} GiB"


def check_writable(folder: Path, what: str = "the work dir") -> None:
    """Create `folder` if needed and write, fsync and delete a small probe file in it; a WorkDirError naming
    the folder and the OS error otherwise."""
    folder = Path(folder)
    probe = folder / f".write-test-{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(b"scaleseg write test\n")
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        raise WorkDirError(
            f"{what} {folder} is not writable ({reason(exc)}); nothing was run. Make it writable, free space on "
            "its disk, or choose another folder"
            + (" with --work-dir" if what == "the work dir" else " with --out")
        ) from None
    finally:
        try:
            probe.unlink()
        except OSError:
            pass


class WorkDirLock:
    """`train.lock` in a work dir, flock-ed while a training runs there (rank 0 only)."""

    def __init__(self, work_dir: Path) -> None:
        self.path = Path(work_dir) / LOCK_NAME
        self.fd: int | None = None
        self.took_over: str | None = None  # what the lock file said, when a killed run's stale lock was taken

    def acquire(self) -> "WorkDirLock":
        for _ in range(10):  # retried if the file was deleted (its run ended) between our open and our flock
            fd = self._open_locked()
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except OSError:
                same = False
            if same:
                break
            os.close(fd)
        else:  # pragma: no cover - runs starting and ending in a loop
            raise WorkDirError(f"cannot take the lock {self.path}: it keeps being replaced by another process")
        previous = _read(fd)
        if previous:  # a lock file nobody holds: its run was killed (a finished run deletes it)
            self.took_over = previous
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)
        self.fd = fd
        return self

    def _open_locked(self) -> int:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise WorkDirError(f"cannot create the lock {self.path} ({reason(exc)}); is the work dir writable?") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _read(fd)
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise WorkDirError(f"cannot lock {self.path} ({reason(exc)})") from None
            raise WorkDirError(
                f"another training is running in {self.path.parent} ({holder or 'its lock file names no process'}); "
                "wait for it to finish or stop it, or train in another work dir with --work-dir"
            ) from None
        return fd

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            self.path.unlink()
        except OSError:
            pass
        try:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        finally:
            os.close(self.fd)
            self.fd = None


def _read(fd: int) -> str:
    try:
        return os.pread(fd, 512, 0).decode(errors="replace").strip()
    except OSError:
        return ""
