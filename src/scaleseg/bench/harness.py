"""The child-process harness shared by `scaleseg bench memory` and `scaleseg bench speed`.

Each measured configuration runs in a fresh interpreter (peaks and caches of one configuration
never mix with another's):

    python -m scaleseg.bench.harness MODULE:FUNCTION JOB_JSON

runs `MODULE.FUNCTION(job)` and prints its JSON record as the last line. With `job["limit_gb"]`
on CPU the child's address space is limited, so running out of memory is a failed allocation
(recorded as "oom") instead of the kernel's OOM killer; a child killed by a signal anyway is
recorded as "killed", any other failure as "error" with the last line of its stderr.
"""

from __future__ import annotations

import importlib
import json
import os
import resource
import subprocess
import sys


def is_oom(exc: BaseException) -> bool:
    """CUDA OOM (a RuntimeError), a failed CPU allocation, or MemoryError."""
    text = str(exc).lower()
    return isinstance(exc, MemoryError) or "out of memory" in text or "can't allocate memory" in text


def oom_record(exc: BaseException) -> dict:
    return {"status": "oom", "detail": (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]}


def run_child(target: str, job: dict) -> dict:
    """`target` ("module:function") on `job` in a fresh interpreter; its record, or the failure."""
    proc = subprocess.run([sys.executable, "-m", "scaleseg.bench.harness", target, json.dumps(job)],
                          capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode == 0 and lines:
        return json.loads(lines[-1])
    if proc.returncode < 0:  # killed by a signal: the kernel's OOM killer sends SIGKILL
        return {"status": "killed", "detail": f"signal {-proc.returncode} (out of memory?)"}
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return {"status": "error", "detail": tail[:300]}


def child_main(target: str, job: dict) -> int:
    if job.get("limit_gb") and job.get("device", "cpu") == "cpu":
        limit = int(float(job["limit_gb"]) * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    module, name = target.split(":")
    function = getattr(importlib.import_module(module), name)
    try:
        record = function(job)
    except (MemoryError, RuntimeError) as exc:  # torch.OutOfMemoryError is a RuntimeError
        if not is_oom(exc):
            raise
        record = oom_record(exc)
    print(json.dumps(record), flush=True)
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 3 or ":" not in sys.argv[1]:
        sys.exit("usage: python -m scaleseg.bench.harness MODULE:FUNCTION JOB_JSON (used by `scaleseg bench`)")
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    sys.exit(child_main(sys.argv[1], json.loads(sys.argv[2])))
