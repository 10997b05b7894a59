"""HRNetV2's representation as a decoder: every backbone stage upsampled to stride 4 and concatenated.

With an HRNet backbone this is HRNetV2's own output (W + 2W + 4W + 8W channels, 720 for W48). With a
standard (undilated) ResNet, each stage is first reduced by a Conv1x1-BN-ReLU to `fusion_channels`
(48, 96, 192, 384 by default: 720 channels, as in Specialize and Fuse section 5.1.2's "light decoder").
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from scaleseg.models.decoders.deeplabv3plus import conv_norm_relu


class HRNetFusionDecoder(nn.Module):
    """A backbone's four maps at strides 4, 8, 16, 32 -> (B, sum(widths), H/4, W/4)."""

    def __init__(
        self,
        stage_channels: Sequence[int],
        reduce_to: Sequence[int] | None = None,
        norm_layer: Callable[[int], nn.Module] | None = None,
    ) -> None:
        super().__init__()
        norm_layer = norm_layer or nn.BatchNorm2d
        if reduce_to is not None:
            if len(reduce_to) != len(stage_channels):
                raise ValueError(f"{len(stage_channels)} stages need as many reduced widths, got {list(reduce_to)}")
            self.reduce = nn.ModuleList(conv_norm_relu(c, r, 1, norm_layer) for c, r in zip(stage_channels, reduce_to))
            widths = list(reduce_to)
        else:
            self.reduce = None
            widths = list(stage_channels)
        self.out_channels = sum(widths)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, stages: Sequence[torch.Tensor]) -> torch.Tensor:
        if self.reduce is not None:
            stages = [reduce(x) for reduce, x in zip(self.reduce, stages)]
        size = stages[0].shape[-2:]
        upsampled = [stages[0]] + [F.interpolate(x, size=size, mode="bilinear", align_corners=False) for x in stages[1:]]
        return torch.cat(upsampled, dim=1)  # (B, sum(widths), H/4, W/4)
