"""Named sections of the library's own work, for profilers and for `scaleseg bench speed`.

The ESS loss marks its parts with `section(name)`:

    "scaleseg.search"       the nearest-class search of the kNN loss (ESS Eq. 6), every kind
    "scaleseg.loss"         the cross-entropy (ESS Eq. 6 or the exact one), search included
    "scaleseg.regularizer"  the max-margin regulariser (ESS Eq. 7), its refreshes included
    "scaleseg.index"        building / refreshing the approximate class index

Each section is a `torch.profiler.record_function` label, so `torch.profiler.profile()` shows it
(forward only: what autograd later does for it is in the backward pass). When a `SectionTimer`
is active (the speed benchmark starts one), each section also adds its wall-clock seconds to the
timer, synchronising CUDA first where asked; with none active a section costs a function call.
Nothing is patched: the library calls `section` where the work is.
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from typing import Callable, Iterator

import torch

SEARCH = "scaleseg.search"
LOSS = "scaleseg.loss"
REGULARIZER = "scaleseg.regularizer"
INDEX = "scaleseg.index"

_active: list["SectionTimer"] = []


class SectionTimer:
    """Sums the seconds and counts the calls of every section entered while it is active.

    Nested sections are each timed in full (a search inside the loss counts in both)."""

    def __init__(self, sync: Callable[[], None] | None = None) -> None:
        self.sync = sync or (lambda: None)
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)

    def reset(self) -> None:
        self.seconds.clear()
        self.calls.clear()

    def __enter__(self) -> "SectionTimer":
        _active.append(self)
        return self

    def __exit__(self, *exc) -> None:
        _active.remove(self)


@contextlib.contextmanager
def section(name: str) -> Iterator[None]:
    """A named part of the work: a profiler label, and timed by any active SectionTimer."""
    with torch.profiler.record_function(name):
        if not _active:
            yield
            return
        timers = list(_active)
        for t in timers:
            t.sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            for t in timers:
                t.sync()
            elapsed = time.perf_counter() - start
            for t in timers:
                t.seconds[name] += elapsed
                t.calls[name] += 1
