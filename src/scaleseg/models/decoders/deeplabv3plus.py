"""DeepLabV3+ decoder: ASPP on the high-level features, fused with projected low-level features.

As in the ESS published code: ASPP = 1x1 + three dilated 3x3 + image pooling, `channels` each with
norm + ReLU; 1x1 projection to `channels` + dropout; low-level 1x1 to 48 channels; concat ->
3x3 conv + norm + ReLU. The final 1x1 (to C classes or d embedding channels) belongs to the head.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn


def conv_norm_relu(cin: int, cout: int, kernel: int, norm_layer: Callable[[int], nn.Module], dilation: int = 1):
    padding = dilation * (kernel // 2)
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, padding=padding, dilation=dilation, bias=False),
        norm_layer(cout),
        nn.ReLU(inplace=True),
    )


class ImagePooling(nn.Module):
    """Global average pool -> 1x1 conv + norm + ReLU -> broadcast back to the input size."""

    def __init__(self, cin: int, cout: int, norm_layer: Callable[[int], nn.Module]) -> None:
        super().__init__()
        self.conv = conv_norm_relu(cin, cout, 1, norm_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.conv(F.adaptive_avg_pool2d(x, 1))  # (B, cout, 1, 1)
        return pooled.expand(-1, -1, *x.shape[-2:])


class ASPP(nn.Module):
    def __init__(
        self,
        cin: int,
        channels: int,
        dilations: tuple[int, ...],
        dropout: float,
        norm_layer: Callable[[int], nn.Module],
    ) -> None:
        super().__init__()
        branches = [conv_norm_relu(cin, channels, 1, norm_layer)]
        branches += [conv_norm_relu(cin, channels, 3, norm_layer, dilation=d) for d in dilations]
        branches.append(ImagePooling(cin, channels, norm_layer))
        self.branches = nn.ModuleList(branches)
        self.project = nn.Sequential(conv_norm_relu(len(branches) * channels, channels, 1, norm_layer), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(torch.cat([branch(x) for branch in self.branches], dim=1))


def default_aspp_dilations(output_stride: int) -> tuple[int, ...]:
    """(6, 12, 18) at output stride 16, (12, 24, 36) at 8, (3, 6, 9) at 32."""
    return tuple(r * 16 // output_stride for r in (6, 12, 18))


class DeepLabV3PlusDecoder(nn.Module):
    """A backbone's feature maps -> features (B, channels, H/4, W/4): ASPP on the last (coarsest) map,
    fused with the first (stride-4, "low-level") map."""

    def __init__(
        self,
        in_channels: int,
        low_level_in_channels: int,
        channels: int = 256,
        low_level_channels: int = 48,
        dilations: tuple[int, ...] = (6, 12, 18),
        dropout: float = 0.1,
        norm_layer: Callable[[int], nn.Module] | None = None,
    ) -> None:
        super().__init__()
        norm_layer = norm_layer or nn.BatchNorm2d
        self.aspp = ASPP(in_channels, channels, tuple(dilations), dropout, norm_layer)
        self.low_level_project = conv_norm_relu(low_level_in_channels, low_level_channels, 1, norm_layer)
        self.fuse = conv_norm_relu(channels + low_level_channels, channels, 3, norm_layer)
        self.out_channels = channels
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        low_level, out = features[0], features[-1]  # (B, c_low, H/4, W/4), (B, c_out, H/os, W/os)
        x = self.aspp(out)  # (B, channels, H/os, W/os)
        x = F.interpolate(x, size=low_level.shape[-2:], mode="bilinear", align_corners=False)
        x = torch.cat([x, self.low_level_project(low_level)], dim=1)  # (B, channels + 48, H/4, W/4)
        return self.fuse(x)  # (B, channels, H/4, W/4)
