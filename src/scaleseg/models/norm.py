"""Normalization layers from the config: BatchNorm (the default) or Group Normalization.

Group Normalization (Wu & He, 2018) normalises each image over groups of channels, so a model's output
for one image does not depend on the other images of the batch: it trains with one or two images per
GPU, where BatchNorm's batch statistics are too noisy (the "GN" rows of the ESS paper's Table 5).

``model.group_norm_channels`` is the number of channels per group (16 in the paper), so a layer of C
channels gets C // 16 groups; every normed width must be a multiple of it (checked when a layer is made).
"""

from __future__ import annotations

import math
from typing import Callable, Literal

from torch import nn

from scaleseg.errors import ConfigError

NormLayer = Callable[[int], nn.Module]
NORM_KINDS = ("batch", "group")


class GroupNormFactory:
    """Builds ``nn.GroupNorm(channels // channels_per_group, channels)``; works on (N, C, *) inputs.

    ``where`` names the part being built (e.g. "the decoder (model.decoder.channels, ...)") for the
    error raised when ``channels_per_group`` does not divide a layer's width.
    """

    def __init__(self, channels_per_group: int = 16, where: str = "the model") -> None:
        if isinstance(channels_per_group, bool) or not isinstance(channels_per_group, int) or channels_per_group < 1:
            raise ConfigError(
                f"model.group_norm_channels = {channels_per_group!r}: must be an integer >= 1 "
                "(channels per GroupNorm group; the paper uses 16)"
            )
        self.channels_per_group = channels_per_group
        self.where = where

    def __call__(self, channels: int) -> nn.GroupNorm:
        cpg = self.channels_per_group
        if channels % cpg:
            fits = math.gcd(cpg, channels)
            raise ConfigError(
                f"model.group_norm_channels = {cpg} does not divide the {channels} channels of a norm layer in "
                f"{self.where}: GroupNorm needs a whole number of groups. Set model.group_norm_channels to a "
                f"divisor of every layer width ({fits} fits this layer), change that width, or use model.norm=batch"
            )
        return nn.GroupNorm(channels // cpg, channels)

    def __repr__(self) -> str:
        return f"GroupNormFactory(channels_per_group={self.channels_per_group})"


def make_norm(
    kind: Literal["batch", "group"] = "batch", channels_per_group: int = 16, where: str = "the model"
) -> NormLayer:
    """A factory ``channels -> norm layer`` for 2-d feature maps: ``nn.BatchNorm2d`` or a GroupNorm factory.

    The GroupNorm layers also take (N, C, L) inputs, so the same factory serves 1-d convs (see :func:`norm_1d`).
    """
    if kind == "batch":
        return nn.BatchNorm2d
    if kind == "group":
        return GroupNormFactory(channels_per_group, where)
    raise ConfigError(f"model.norm = {kind!r} is not allowed; choose one of {', '.join(map(repr, NORM_KINDS))}")


def norm_1d(norm_layer: NormLayer | None) -> NormLayer:
    """The factory to use after a Conv1d (inputs (N, C, L)) given a 2-d one.

    None or ``nn.BatchNorm2d`` -> ``nn.BatchNorm1d``; any other factory (GroupNorm, which accepts
    (N, C, *)) is returned unchanged.
    """
    if norm_layer is None or norm_layer is nn.BatchNorm2d:
        return nn.BatchNorm1d
    return norm_layer


__all__ = ["GroupNormFactory", "NORM_KINDS", "NormLayer", "make_norm", "norm_1d"]
