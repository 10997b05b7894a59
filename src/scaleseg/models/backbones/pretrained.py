"""Load ImageNet weights from a torchvision-style ``.pth`` file into a backbone.

The file may hold a raw state dict or one nested under ``"state_dict"`` or ``"model"``;
a leading ``"module."`` (DataParallel / DDP) prefix on keys is removed, and of a
segmentation-models-pytorch model's state dict the keys under ``"encoder."`` are taken (its
encoders keep torchvision's names below that prefix). Keys that the
backbone declares in ``pretrained_ignore_prefixes`` (torchvision's classification head:
``fc.*`` for ResNet, ``features.18.*`` and ``classifier.*`` for MobileNetV2) are expected
to be unused and reported as ignored.

BatchNorm weights into a GroupNorm model (``model.norm: group``): where the backbone has an
``nn.GroupNorm`` in place of a file's BatchNorm, the BN ``weight`` and ``bias`` (same shape:
one value per channel) are loaded as the GN affine parameters, and the BN statistics
(``running_mean``, ``running_var``, ``num_batches_tracked``), which GN has no place for, are
reported as ignored, not as unexpected. So "ImageNet weights with GN" means: convolutions and
the per-channel scale and shift are reused, the batch statistics are dropped (GN normalises
with each image's own group statistics instead).

Every problem with the file raises :class:`scaleseg.errors.CheckpointError` naming the
file. So does, by default (``strict=True``, ``model.pretrained_strict``), a file that lacks a
parameter of the backbone or holds one it does not have (beyond the classifier and, under
GroupNorm, the BN statistics): a ResNet-50 file given to a ResNet-101 shares every shape with it
but would leave layer3.6-22 random; the message names the first keys and the architecture the
file looks like. With ``strict=False`` such keys are allowed (partial load) and listed in the
returned :class:`LoadReport`.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from scaleseg.errors import CheckpointError

_DATA_PARALLEL_PREFIX = "module."
_SMP_ENCODER_PREFIX = "encoder."  # segmentation-models-pytorch: model.encoder is a torchvision-named backbone
_NESTING_KEYS = ("state_dict", "model")
# BatchNorm step counters: absent from older torchvision files and irrelevant for weights.
_BENIGN_MISSING_SUFFIX = "num_batches_tracked"
# BatchNorm buffers that a GroupNorm layer in the same place has no use for.
_BN_STATISTICS = ("running_mean", "running_var", "num_batches_tracked")


@dataclass
class LoadReport:
    """What :func:`load_pretrained` did with a weight file.

    Attributes:
        path: the file that was read.
        loaded: number of tensors copied into the module.
        missing: module keys the file lacks (they keep their initial values).
        unexpected: file keys the module does not have (not counting ``ignored``).
        ignored: file keys expected to be unused: the classification head, and the BatchNorm
            statistics of layers that are GroupNorm in the module.
        ignored_statistics: how many of ``ignored`` are BN statistics (GroupNorm modules only).
    """

    path: str
    loaded: int
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    ignored_statistics: int = 0


def load_pretrained(module: nn.Module, path: str | os.PathLike[str], strict: bool = True) -> LoadReport:
    """Copy the tensors of the weight file at ``path`` into ``module`` and report on it.

    Raises:
        CheckpointError: the file is missing or unreadable, holds no state dict, has a
            tensor whose shape differs from the module's, or shares no key with it; with
            ``strict``, also when a backbone key is missing from the file or a file key is
            unknown to the backbone (nothing is loaded then).
    """
    path_str = str(Path(path).expanduser())  # `~/weights/...` as the config check and the README have it
    arch = getattr(module, "arch", type(module).__name__)
    state = _read_state_dict(path_str)
    ignore_prefixes = tuple(getattr(module, "pretrained_ignore_prefixes", ()))
    own = module.state_dict()

    group_norms = {name for name, m in module.named_modules() if isinstance(m, nn.GroupNorm)}

    def expected_unused(key: str) -> bool:
        owner, _, leaf = key.rpartition(".")
        return key.startswith(ignore_prefixes) or (leaf in _BN_STATISTICS and owner in group_norms)

    ignored = sorted(k for k in state if k not in own and expected_unused(k))
    unexpected = sorted(k for k in state if k not in own and not expected_unused(k))
    matched = [k for k in own if k in state]
    if not matched:
        raise CheckpointError(
            f"{path_str}: this file is not a {arch} checkpoint: none of its "
            f"{len(state)} keys (e.g. {_first(sorted(state))}) is a parameter of the "
            f"{arch} backbone (e.g. {_first(list(own))}); pass a weight file for {arch}"
        )
    _check_shapes(path_str, arch, state, own, matched)
    missing = [k for k in own if k not in state and not k.endswith(_BENIGN_MISSING_SUFFIX)]
    if strict and (missing or unexpected):
        _refuse_partial(path_str, arch, state, missing, [k for k in state if k in set(unexpected)])

    module.load_state_dict({k: state[k] for k in matched}, strict=False)
    statistics = sum(1 for k in ignored if not k.startswith(ignore_prefixes))
    return LoadReport(path_str, len(matched), missing, unexpected, ignored, statistics)


def _refuse_partial(path: str, arch: str, state: Mapping[str, torch.Tensor], missing: list[str],
                    unexpected: list[str]) -> None:
    """Raise the CheckpointError of a file whose keys do not match the backbone's one for one."""
    looks = describe_weights(state)
    what = f"looks like {looks}, not {arch}" if looks and looks != arch else f"does not match the {arch} backbone"
    parts = []
    if missing:
        parts.append(f"{len(missing)} {arch} keys are missing from it (e.g. {_first(missing)}), they would keep their "
                     "random initialisation")
    if unexpected:
        parts.append(f"{len(unexpected)} of its keys are unexpected (e.g. {_first(unexpected)}), they would be dropped")
    raise CheckpointError(
        f"{path}: this weight file {what}: " + "; ".join(parts) + f". Pass the weight file for {arch} "
        "(or the model.backbone the file is for); model.pretrained_strict=false loads the matching keys anyway"
    )


# torchvision ResNet depth by (blocks per stage, bottleneck blocks)
_RESNET_DEPTHS = {
    ((2, 2, 2, 2), False): "resnet18", ((3, 4, 6, 3), False): "resnet34", ((3, 4, 6, 3), True): "resnet50",
    ((3, 4, 23, 3), True): "resnet101", ((3, 8, 36, 3), True): "resnet152", ((1, 1, 1, 1), False): "resnet_tiny",
}
_HRNET_WIDTHS = {8: "hrnet_tiny", 18: "hrnetv2_w18", 32: "hrnetv2_w32", 48: "hrnetv2_w48"}


def describe_weights(state: Mapping[str, torch.Tensor]) -> str | None:
    """The architecture a state dict looks like, from its key names (and HRNet's width): "resnet50",
    "mobilenet_v2", "hrnetv2_w48", "a ResNet with 3, 4, 5, 3 blocks per stage", ... or None."""
    keys = set(state)
    if "transition1.0.0.weight" in keys:
        width = int(state["transition1.0.0.weight"].shape[0])
        return _HRNET_WIDTHS.get(width, f"an HRNet of width {width}")
    if "layer1.0.conv1.weight" in keys:
        blocks = tuple(len({k.split(".")[1] for k in keys if k.startswith(f"layer{i}.")}) for i in range(1, 5))
        bottleneck = "layer1.0.conv3.weight" in keys
        return _RESNET_DEPTHS.get((blocks, bottleneck)) or (
            f"a ResNet with {', '.join(map(str, blocks))} {'bottleneck' if bottleneck else 'basic'} blocks per stage")
    if any(k.startswith("features.17.") for k in keys):
        return "mobilenet_v2"
    return None


def _read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """Read ``path`` and return its state dict with any ``module.`` prefix removed."""
    if not os.path.isfile(path):
        what = "is a directory, not a file" if os.path.isdir(path) else "does not exist"
        raise CheckpointError(
            f"{path}: weight file {what}; check the path of the pretrained weights "
            f"(absolute, or relative to {Path.cwd()})"
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a bad file
        raise CheckpointError(
            f"{path}: cannot read the weight file ({type(exc).__name__}: "
            f"{_first_sentence(str(exc))}); it is corrupt, truncated, or not a PyTorch state dict "
            f"(a pickled full model cannot be loaded: save model.state_dict() instead)"
        ) from exc
    state = _unwrap(path, obj)
    state = {_strip_prefix(k): v for k, v in state.items()}
    return _encoder_part(state)


def _unwrap(path: str, obj: Any) -> Mapping[str, torch.Tensor]:
    """Return the state dict in ``obj``: itself or nested under "state_dict" / "model"."""
    if isinstance(obj, Mapping):
        for key in _NESTING_KEYS:
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(
            f"{path}: the file holds a {type(obj).__name__}, not a non-empty state dict "
            f"(a mapping of names to tensors, possibly under 'state_dict' or 'model')"
        )
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not torch.is_tensor(v)]
    if bad:
        raise CheckpointError(
            f"{path}: not a state dict: {len(bad)} entries are not name -> tensor "
            f"(e.g. {_first([str(k) for k in bad])}); expected a raw state dict or one "
            f"nested under 'state_dict' or 'model'"
        )
    return obj


def _encoder_part(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A segmentation-models-pytorch state dict (the model's, or its encoder's saved with the prefix) holds
    the backbone under ``encoder.``, with torchvision's names below it: that part, the prefix removed.
    Any other file is returned as it is."""
    encoder = {k[len(_SMP_ENCODER_PREFIX):]: v for k, v in state.items() if k.startswith(_SMP_ENCODER_PREFIX)}
    return encoder or state


def _strip_prefix(key: str) -> str:
    """Remove one leading DataParallel ``module.`` prefix."""
    return key[len(_DATA_PARALLEL_PREFIX):] if key.startswith(_DATA_PARALLEL_PREFIX) else key


def _check_shapes(
    path: str,
    arch: str,
    state: Mapping[str, torch.Tensor],
    own: Mapping[str, torch.Tensor],
    keys: list[str],
) -> None:
    """Raise CheckpointError naming the first key whose file and module shapes differ."""
    wrong = [k for k in keys if state[k].shape != own[k].shape]
    if wrong:
        k = wrong[0]
        raise CheckpointError(
            f"{path}: key '{k}' has shape {tuple(state[k].shape)} in the file but "
            f"{tuple(own[k].shape)} in the {arch} backbone ({len(wrong)} of {len(keys)} "
            f"shared keys differ); the file is probably for another architecture: pass "
            f"weights for {arch}"
        )


def _first(names: list[str], n: int = 3) -> str:
    """The first ``n`` names, comma-separated, with '...' if there are more."""
    shown = ", ".join(repr(x) for x in names[:n])
    return shown + (", ..." if len(names) > n else "")


def _first_sentence(text: str, limit: int = 160) -> str:
    """First sentence of ``text``, at most ``limit`` characters (torch's messages are long
    and suggest ``weights_only=False``, which is unsafe for files of unknown origin)."""
    sentence = re.split(r"(?<=\.)\s|\n", text.strip(), maxsplit=1)[0]
    return sentence if len(sentence) <= limit else sentence[:limit] + "..."
