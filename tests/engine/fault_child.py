"""`scaleseg train` in a child process that stops at a chosen moment, for the fault tests (test_faults.py).

    python tests/engine/fault_child.py MARKER PLAN scaleseg-arguments...

PLAN says where the child touches MARKER (the test then signals or kills it):
    none        run to the end
    iter:N      at the start of iteration N, then go on (a kill lands somewhere in iteration N or after)
    eval:N      in the N-th image prediction of the evaluations, then hang
    save:N      half-way through the N-th torch.save (checkpoint or best.pth), then hang
    wait:N      at the start of iteration N, then wait until MARKER.go exists (the test sends SIGINT first)
"""

import io
import os
import sys
import time
from pathlib import Path

import torch

marker, plan, argv = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
kind, _, n = plan.partition(":")
n = int(n or 0)


def touch() -> None:
    marker.write_text(str(os.getpid()))


def hang() -> None:
    time.sleep(600)


if kind in ("iter", "wait"):
    from scaleseg.engine import trainer as trainer_module

    real_set_lr = trainer_module.set_poly_lr

    def set_lr(optimizer, it, total, warmup=0):
        if it == n - 1:
            touch()
            if kind == "wait":
                while not Path(str(marker) + ".go").exists():
                    time.sleep(0.02)
        real_set_lr(optimizer, it, total, warmup)

    trainer_module.set_poly_lr = set_lr
elif kind == "eval":
    from scaleseg.engine import evaluator

    real_predict, calls = evaluator.predict_labels_with_counts, []

    def predict(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            touch()
            hang()
        return real_predict(*args, **kwargs)

    evaluator.predict_labels_with_counts = predict
elif kind == "save":
    real_save, saves = torch.save, []

    def half_then_hang(obj, f, *args, **kwargs):
        saves.append(1)
        if len(saves) == n:
            buffer = io.BytesIO()
            real_save(obj, buffer, *args, **kwargs)
            data = buffer.getvalue()
            f.write(data[: len(data) // 2])
            f.flush()
            touch()
            hang()
        return real_save(obj, f, *args, **kwargs)

    torch.save = half_then_hang
elif kind != "none":
    raise SystemExit(f"unknown plan {plan!r}")

from scaleseg.cli import main  # noqa: E402

sys.exit(main(argv))
