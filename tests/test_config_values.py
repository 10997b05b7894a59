"""Every number in the config is checked: floats finite and in range, integers within what the code can use.

The float keys are found by walking the Config dataclasses, so a float key added later is covered too."""

import dataclasses
import types
import typing

import pytest

from scaleseg.config import Config, load_config
from scaleseg.errors import ConfigError

NON_FINITE = [".nan", ".inf", "-.inf", "nan"]  # YAML's NaN/inf spellings, and a plain "nan" string


def _float_keys(cls=Config, prefix=""):
    """(dotted key, kind) of every float in the config: "float", "optional float" or "float list"."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key, tp = f"{prefix}{f.name}", hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from _float_keys(tp, key + ".")
            continue
        args = typing.get_args(tp)
        if tp is float:
            yield key, "float"
        elif typing.get_origin(tp) in (typing.Union, types.UnionType) and float in args:
            yield key, "optional float"
        elif typing.get_origin(tp) is tuple and float in args:
            yield key, f"float list of {len(args) if Ellipsis not in args else 1}"


FLOAT_KEYS = list(_float_keys())
BAD_FLOAT_VALUES = [(key, kind, bad) for key, kind in FLOAT_KEYS for bad in NON_FINITE]


def test_the_walk_finds_the_float_keys_named_in_the_issue():
    keys = {k for k, _ in FLOAT_KEYS}
    assert {"optim.lr", "optim.momentum", "model.head.pyramid.tau", "eval.scales",
            "optim.groups.class_embeddings.lr_mult", "data.train_pipeline.scale_range"} <= keys
    assert len(keys) >= 25


def _override(key: str, kind: str, bad: str) -> str:
    if kind.startswith("float list"):
        n = int(kind.rsplit(" ", 1)[1])
        return f"{key}=[{', '.join([bad] + ['1.0'] * (n - 1))}]"
    return f"{key}={bad}"


@pytest.mark.parametrize("key,kind,bad", BAD_FLOAT_VALUES, ids=[f"{k}={b}" for k, _, b in BAD_FLOAT_VALUES])
def test_every_float_key_refuses_nan_and_inf(key, kind, bad):
    with pytest.raises(ConfigError) as info:
        load_config(None, [_override(key, kind, bad)])
    message = str(info.value)
    assert key in message and "finite" in message, message


OUT_OF_RANGE = [
    ("train.seed=1099511627776", r"train.seed = 1099511627776: must be between 0 and 4294967295"),
    ("train.seed=-1", r"train.seed = -1: must be between 0 and 4294967295"),
    ("data.synthetic.seed=1099511627776", r"data.synthetic.seed = .*: must be between 0 and 4294967295"),
    ("train.iters=100000000000000000000000", r"train.iters = .*: too large"),
    ("train.seed=99999999999999999999", r"train.seed = .*: too large"),
    ("optim.lr=1e400", r"optim.lr = .*finite"),
]


@pytest.mark.parametrize("item,pattern", OUT_OF_RANGE)
def test_numbers_out_of_range_are_refused_by_key(item, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(None, [item])


def test_the_largest_seed_is_accepted():
    assert load_config(None, ["train.seed=4294967295"]).train.seed == 2**32 - 1
