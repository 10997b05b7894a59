"""Backbones: image -> four feature maps at strides 4-32, torchvision / official-HRNet weight compatible.

Contract shared by every backbone (see ``features.py``, in the manner of timm's ``features_only``):

* Constructor arguments ``output_stride: int = 16`` (8, 16 or 32; HRNet: 32 only),
  ``norm_layer: Callable[[int], nn.Module] | None = None`` (builds a norm layer from a channel
  count; default ``nn.BatchNorm2d``) and ``bn_momentum: float | None = None`` (if given, set on
  every BatchNorm; the paper uses 0.01; GroupNorm layers are left alone).
* ``forward(x)`` with ``x`` of shape (B, 3, H, W) returns the list of four maps, finest first;
  ``feature_info.channels()`` and ``feature_info.reduction()`` give their channels and strides
  (a dilated stage keeps the previous stride: [4, 8, 16, 16] at output stride 16).
* Attributes ``output_stride``, ``arch`` (name, e.g. "resnet50") and
  ``pretrained_ignore_prefixes`` (classification-head keys of an ImageNet file).
* Parameter names and shapes equal torchvision's (HRNet: the official code's) minus the
  classifier at every output stride, so one ImageNet ``.pth`` file loads at any output stride.

==============  =====================
name            feature channels
==============  =====================
resnet18        64, 128, 256, 512
resnet34        64, 128, 256, 512
resnet50        256, 512, 1024, 2048
resnet101       256, 512, 1024, 2048
resnet_tiny     16, 32, 64, 128
mobilenet_v2    24, 32, 96, 320
hrnetv2_w18     18, 36, 72, 144
hrnetv2_w32     32, 64, 128, 256
hrnetv2_w48     48, 96, 192, 384
hrnet_tiny      8, 16, 32, 64
==============  =====================
"""

from __future__ import annotations

import logging
import os
from typing import Callable

from torch import nn

from scaleseg.errors import ConfigError

from .features import FeatureInfo
from .hrnet import HRNet, hrnet_tiny, hrnetv2_w18, hrnetv2_w32, hrnetv2_w48
from .mobilenetv2 import MobileNetV2, mobilenet_v2
from .pretrained import LoadReport, describe_weights, load_pretrained
from .resnet import NormLayer, ResNet, resnet18, resnet34, resnet50, resnet101, resnet_tiny

__all__ = [
    "BACKBONES",
    "FeatureInfo",
    "HRNet",
    "LoadReport",
    "MobileNetV2",
    "ResNet",
    "build_backbone",
    "describe_weights",
    "hrnet_tiny",
    "hrnetv2_w18",
    "hrnetv2_w32",
    "hrnetv2_w48",
    "load_pretrained",
    "mobilenet_v2",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet_tiny",
]

logger = logging.getLogger("scaleseg")

BACKBONES: dict[str, Callable[..., nn.Module]] = {
    "resnet18": resnet18,
    "resnet34": resnet34,
    "resnet50": resnet50,
    "resnet101": resnet101,
    "resnet_tiny": resnet_tiny,
    "mobilenet_v2": mobilenet_v2,
    "hrnetv2_w18": hrnetv2_w18,
    "hrnetv2_w32": hrnetv2_w32,
    "hrnetv2_w48": hrnetv2_w48,
    "hrnet_tiny": hrnet_tiny,
}

# How many key names a warning shows.
_SHOW_KEYS = 5


def build_backbone(
    name: str,
    output_stride: int = 16,
    pretrained: str | os.PathLike[str] | None = None,
    bn_momentum: float | None = None,
    norm_layer: NormLayer | None = None,
    pretrained_strict: bool = True,
) -> nn.Module:
    """Build the backbone ``name`` and optionally load a torchvision weight file into it.

    The load report (or None) is kept as ``backbone.pretrained_report``; a file whose keys do not
    match the backbone's is refused unless ``pretrained_strict`` is false, when the missing and
    unexpected keys are logged at WARNING level on the "scaleseg" logger.

    Raises:
        ConfigError (a ValueError): unknown ``name`` or ``output_stride`` not 8, 16, 32.
        CheckpointError: ``pretrained`` is missing, corrupt or for another architecture (or,
            with ``pretrained_strict``, another depth of the same one).
    """
    if name.startswith("timm:"):
        if norm_layer not in (None, nn.BatchNorm2d):
            raise ConfigError(f"a timm encoder ({name}) keeps its own norm layers; model.norm=group needs our backbones")
        from .timm_encoder import TimmEncoder

        backbone = TimmEncoder(name.removeprefix("timm:"), output_stride, pretrained, bn_momentum)
        backbone.pretrained_report = None
        return backbone
    if name not in BACKBONES:
        raise ConfigError(
            f"unknown backbone {name!r}; known backbones: {', '.join(sorted(BACKBONES))}"
        )
    if output_stride not in (8, 16, 32):
        raise ConfigError(f"output_stride must be 8, 16 or 32, got {output_stride!r}")
    backbone = BACKBONES[name](
        output_stride=output_stride, norm_layer=norm_layer, bn_momentum=bn_momentum
    )
    report = None
    if pretrained is not None:
        report = load_pretrained(backbone, pretrained, strict=pretrained_strict)
        _log_report(name, report)
    backbone.pretrained_report = report
    return backbone


def _log_report(name: str, report: LoadReport) -> None:
    """Log what was loaded; missing and unexpected keys at WARNING level."""
    head = len(report.ignored) - report.ignored_statistics
    ignored = (
        f"the classifier ({head}) and the BatchNorm statistics of the layers that are GroupNorm here "
        f"({report.ignored_statistics})" if report.ignored_statistics else "the classifier"
    )
    logger.info(
        "%s: loaded %d tensors from %s (%d unused keys ignored: %s)",
        name, report.loaded, report.path, len(report.ignored), ignored,
    )
    for kind, keys in (("missing from", report.missing), ("unexpected in", report.unexpected)):
        if keys:
            shown = ", ".join(keys[:_SHOW_KEYS]) + (", ..." if len(keys) > _SHOW_KEYS else "")
            logger.warning(
                "%s: %d keys %s the weight file %s (they %s): %s",
                name, len(keys), kind, report.path,
                "keep their random init" if kind == "missing from" else "were not used",
                shown,
            )
