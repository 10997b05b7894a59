"""`scaleseg prepare <dataset>`: converters that turn a published archive into the files a loader
reads. Each converter module defines `HELP` (one line), `add_arguments(parser)` and `run(args) -> int`,
imports its heavy dependencies (scipy, pycocotools) inside `run`, and is idempotent: running it
again skips outputs that are already complete, so an interrupted run resumes.
"""

from __future__ import annotations

import importlib

# command name -> module under scaleseg.data.prepare
PREPARERS = {
    "cityscapes": "cityscapes",
    "voc-aug": "voc_aug",
    "ade20k-full": "ade20k_full",
    "coco-lvis": "coco_lvis",
    "pascal-context": "pascal_context",
}


def preparer(name: str):
    return importlib.import_module(f"scaleseg.data.prepare.{PREPARERS[name]}")


def add_parsers(subparsers) -> None:
    """One `scaleseg prepare <name>` sub-command per converter."""
    for name in PREPARERS:
        module = preparer(name)
        p = subparsers.add_parser(name, help=module.HELP, description=module.__doc__)
        module.add_arguments(p)
        p.set_defaults(func=module.run)
