"""MobileNetV2 feature extractor whose parameter names and shapes match torchvision's.

The backbone keeps torchvision's ``features.0`` .. ``features.17``: low-level features are
the output of ``features.3`` (24 ch, stride 4) and high-level features that of
``features.17`` (320 ch), as in the published ESS / DeepLabV3+ code
(``features[0:4]`` and ``features[4:-1]``). torchvision's last 1x1 conv
(``features.18``) and ``classifier`` are not part of it.

For output stride 16 or 8, once the running stride has reached the output stride, a stage's
stride 2 becomes 1 and the dilation of the later depthwise convs is multiplied by 2
(padding = dilation). As in torchvision's ResNet and the published DeepLabV3+ / ESS
MobileNetV2, the first block of such a stage keeps the previous dilation: with the same
weights, the output at stride 16 (8) then equals the stride-32 output at every 2nd (4th)
pixel, so ImageNet weights see the receptive fields they were trained with.
"""

from __future__ import annotations

import torch
from torch import nn

from .features import FeatureInfo, stage_reductions
from .resnet import NormLayer, check_output_stride, set_bn_momentum

# (expand ratio t, output channels c, repeats n, first stride s), torchvision's width 1.0.
INVERTED_RESIDUAL_SETTING: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
STEM_CHANNELS = 32
# features[0:4], [4:7], [7:14], [14:18] end at strides 4, 8, 16 and 32 (24, 32, 96, 320 channels), as
# timm's mobilenetv2 feature taps (its stride-2 map, features.1, is not used)
STAGE_ENDS = (4, 7, 14, 18)


class ConvBNReLU6(nn.Sequential):
    """conv (no bias) -> norm -> ReLU6; children ``0``, ``1``, ``2`` as in torchvision."""

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        kernel_size: int = 3,
        stride: int = 1,
        dilation: int = 1,
        groups: int = 1,
        norm_layer: NormLayer = nn.BatchNorm2d,
    ) -> None:
        padding = (kernel_size - 1) // 2 * dilation
        super().__init__(
            nn.Conv2d(
                in_ch, out_ch, kernel_size, stride=stride, padding=padding,
                dilation=dilation, groups=groups, bias=False,
            ),
            norm_layer(out_ch),
            nn.ReLU6(inplace=True),
        )


class InvertedResidual(nn.Module):
    """1x1 expand (skipped if ``expand_ratio`` is 1), 3x3 depthwise, 1x1 linear project.

    The residual is added when ``stride == 1`` and the channel count is unchanged.
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        stride: int,
        expand_ratio: int,
        dilation: int = 1,
        norm_layer: NormLayer = nn.BatchNorm2d,
    ) -> None:
        super().__init__()
        self.stride = stride
        self.out_channels = out_ch
        self.use_res_connect = stride == 1 and in_ch == out_ch
        hidden = int(round(in_ch * expand_ratio))
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvBNReLU6(in_ch, hidden, kernel_size=1, norm_layer=norm_layer))
        layers += [
            ConvBNReLU6(
                hidden, hidden, stride=stride, dilation=dilation, groups=hidden,
                norm_layer=norm_layer,
            ),
            nn.Conv2d(hidden, out_ch, 1, bias=False),
            norm_layer(out_ch),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return x + out if self.use_res_connect else out


class MobileNetV2(nn.Module):
    """MobileNetV2 backbone (``features.0..17``); returns the outputs of features.3, .6, .13, .17.

    Args:
        output_stride: 8, 16 or 32; the resolution of the ``out`` feature map.
        norm_layer: builds a norm layer from a channel count (default ``nn.BatchNorm2d``).
        bn_momentum: if given, set on every BatchNorm layer.
    """

    # Keys of a torchvision classification checkpoint that the backbone does not use.
    pretrained_ignore_prefixes: tuple[str, ...] = ("features.18.", "classifier.")

    def __init__(
        self,
        output_stride: int = 16,
        norm_layer: NormLayer | None = None,
        bn_momentum: float | None = None,
    ) -> None:
        super().__init__()
        check_output_stride(output_stride)
        norm = norm_layer if norm_layer is not None else nn.BatchNorm2d
        self.arch = "mobilenet_v2"
        self.output_stride = output_stride
        self.features = nn.Sequential(*self._build_features(output_stride, norm))
        self.feature_info = FeatureInfo(
            [self.features[end - 1].out_channels for end in STAGE_ENDS], stage_reductions(output_stride),
            [f"features.{end - 1}" for end in STAGE_ENDS],
        )
        self._init_weights()
        if bn_momentum is not None:
            set_bn_momentum(self, bn_momentum)

    @staticmethod
    def _build_features(output_stride: int, norm: NormLayer) -> list[nn.Module]:
        """Stem plus the 17 inverted residual blocks, strided or dilated for the stride."""
        features: list[nn.Module] = [ConvBNReLU6(3, STEM_CHANNELS, stride=2, norm_layer=norm)]
        running_stride, dilation, in_ch = 2, 1, STEM_CHANNELS
        for t, c, n, s in INVERTED_RESIDUAL_SETTING:
            first_dilation, stride = dilation, s
            if s > 1 and running_stride >= output_stride:
                dilation, stride = dilation * s, 1
            running_stride *= stride
            for i in range(n):
                features.append(
                    InvertedResidual(
                        in_ch if i == 0 else c, c,
                        stride=stride if i == 0 else 1,
                        expand_ratio=t,
                        dilation=first_dilation if i == 0 else dilation,
                        norm_layer=norm,
                    )
                )
            in_ch = c
        return features

    def _init_weights(self) -> None:
        """torchvision's init: Kaiming-normal (fan_out) convs, norm weight 1 bias 0."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The outputs of features.3, .6, .13 and .17 (see `feature_info`) for images ``x`` (B, 3, H, W)."""
        features, start = [], 0
        for end in STAGE_ENDS:
            for layer in self.features[start:end]:
                x = layer(x)
            features.append(x)  # strides 4, 8, min(16, OS), OS
            start = end
        return features


def mobilenet_v2(
    output_stride: int = 16,
    norm_layer: NormLayer | None = None,
    bn_momentum: float | None = None,
) -> MobileNetV2:
    """MobileNetV2 (width 1.0) backbone (low level 24 ch, out 320 ch)."""
    return MobileNetV2(output_stride=output_stride, norm_layer=norm_layer, bn_momentum=bn_momentum)
