"""ResNet feature extractors whose parameter names and shapes match torchvision's.

A torchvision ImageNet ``.pth`` file (e.g. ``resnet50-11ad3fa6.pth``) loads into these
modules with :func:`scaleseg.models.backbones.pretrained.load_pretrained`; its ``fc.*``
keys are the classifier, which a backbone does not have (no ``fc``, no average pool).

Output stride is obtained as in torchvision's ``replace_stride_with_dilation``: a dilated
stage keeps its resolution (stride 1, downsample conv stride 1) and multiplies the running
dilation by 2; the 3x3 conv that would have been strided (the first of the stage's first
block) keeps the previous dilation, all later 3x3 convs use the new one. With the same
weights, the output at stride 16 (8) then equals the stride-32 output at every 2nd (4th)
pixel ("a trous"), so ImageNet weights see the receptive fields they were trained with.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from .features import FeatureInfo, stage_reductions

NormLayer = Callable[[int], nn.Module]

# Which of layer2, layer3, layer4 trade their stride 2 for dilation, per output stride.
_DILATE_STAGES: dict[int, tuple[bool, bool, bool]] = {
    32: (False, False, False),
    16: (False, False, True),
    8: (False, True, True),
}


def check_output_stride(output_stride: int) -> None:
    """Raise ValueError unless ``output_stride`` is 8, 16 or 32."""
    if output_stride not in (8, 16, 32):
        raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride!r}")


def set_bn_momentum(module: nn.Module, momentum: float) -> None:
    """Set ``momentum`` on every BatchNorm layer inside ``module`` (GroupNorm has none)."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = momentum


def init_weights(module: nn.Module) -> None:
    """torchvision's ResNet init: Kaiming-normal (fan_out, ReLU) convs, norm weight 1 bias 0."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def conv3x3(in_ch: int, out_ch: int, stride: int = 1, dilation: int = 1) -> nn.Conv2d:
    """3x3 convolution without bias; padding = dilation keeps the size at stride 1."""
    return nn.Conv2d(
        in_ch, out_ch, 3, stride=stride, padding=dilation, dilation=dilation, bias=False
    )


def conv1x1(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    """1x1 convolution without bias."""
    return nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convs with an identity (or projected) shortcut; used by ResNet-18/34.

    Unlike torchvision, dilation > 1 is allowed, so ResNet-18/34 work at output stride 8
    and 16: ``conv1`` (which carries the stride) uses ``first_dilation`` (default
    ``dilation``), ``conv2`` uses ``dilation``.
    """

    expansion = 1

    def __init__(
        self,
        in_ch: int,
        planes: int,
        stride: int = 1,
        dilation: int = 1,
        first_dilation: int | None = None,
        downsample: nn.Module | None = None,
        norm_layer: NormLayer = nn.BatchNorm2d,
    ) -> None:
        super().__init__()
        first_dilation = dilation if first_dilation is None else first_dilation
        self.conv1 = conv3x3(in_ch, planes, stride, first_dilation)
        self.bn1 = norm_layer(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes, 1, dilation)
        self.bn2 = norm_layer(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided/dilated), 1x1 expand by 4; used by ResNet-50/101.

    The stride sits on the 3x3 conv ("ResNet v1.5"), as in torchvision; that conv uses
    ``first_dilation`` (default ``dilation``), the block's only 3x3 conv.
    """

    expansion = 4

    def __init__(
        self,
        in_ch: int,
        planes: int,
        stride: int = 1,
        dilation: int = 1,
        first_dilation: int | None = None,
        downsample: nn.Module | None = None,
        norm_layer: NormLayer = nn.BatchNorm2d,
    ) -> None:
        super().__init__()
        first_dilation = dilation if first_dilation is None else first_dilation
        out_ch = planes * self.expansion
        self.conv1 = conv1x1(in_ch, planes)
        self.bn1 = norm_layer(planes)
        self.conv2 = conv3x3(planes, planes, stride, first_dilation)
        self.bn2 = norm_layer(planes)
        self.conv3 = conv1x1(planes, out_ch)
        self.bn3 = norm_layer(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


Block = type[BasicBlock] | type[Bottleneck]


class ResNet(nn.Module):
    """ResNet backbone: stem, layer1..layer4; returns ``(layer1 output, layer4 output)``.

    Args:
        block: ``BasicBlock`` or ``Bottleneck``.
        layers: number of blocks in layer1..layer4.
        widths: planes of layer1..layer4 (torchvision: 64, 128, 256, 512); a stage outputs
            ``width * block.expansion`` channels.
        stem_width: channels of the 7x7 stem conv (torchvision: 64).
        output_stride: 8, 16 or 32; the resolution of the ``out`` feature map.
        norm_layer: builds a norm layer from a channel count (default ``nn.BatchNorm2d``).
        bn_momentum: if given, set on every BatchNorm layer.
        arch: name used in messages (e.g. "resnet50").
    """

    # Keys of a torchvision classification checkpoint that a backbone does not use.
    pretrained_ignore_prefixes: tuple[str, ...] = ("fc.",)

    def __init__(
        self,
        block: Block,
        layers: Sequence[int],
        widths: Sequence[int] = (64, 128, 256, 512),
        stem_width: int = 64,
        output_stride: int = 16,
        norm_layer: NormLayer | None = None,
        bn_momentum: float | None = None,
        arch: str = "resnet",
    ) -> None:
        super().__init__()
        check_output_stride(output_stride)
        if len(layers) != 4 or len(widths) != 4:
            raise ValueError(f"layers and widths need 4 entries, got {layers} and {widths}")
        self.arch = arch
        self.output_stride = output_stride
        self._norm_layer: NormLayer = norm_layer if norm_layer is not None else nn.BatchNorm2d
        self._in_ch = stem_width
        self._dilation = 1

        self.conv1 = nn.Conv2d(3, stem_width, 7, stride=2, padding=3, bias=False)
        self.bn1 = self._norm_layer(stem_width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)

        dilate = _DILATE_STAGES[output_stride]
        self.layer1 = self._make_layer(block, widths[0], layers[0], stride=1, dilate=False)
        self.layer2 = self._make_layer(block, widths[1], layers[1], stride=2, dilate=dilate[0])
        self.layer3 = self._make_layer(block, widths[2], layers[2], stride=2, dilate=dilate[1])
        self.layer4 = self._make_layer(block, widths[3], layers[3], stride=2, dilate=dilate[2])

        self.feature_info = FeatureInfo(
            [w * block.expansion for w in widths], stage_reductions(output_stride),
            ["layer1", "layer2", "layer3", "layer4"],
        )
        init_weights(self)
        if bn_momentum is not None:
            set_bn_momentum(self, bn_momentum)

    def _make_layer(
        self, block: Block, planes: int, blocks: int, stride: int, dilate: bool
    ) -> nn.Sequential:
        """One stage; if ``dilate``, its stride becomes 1 and the dilation doubles after
        the first 3x3 conv."""
        previous_dilation = self._dilation
        if dilate:
            self._dilation *= stride
            stride = 1
        out_ch = planes * block.expansion
        downsample = None
        if stride != 1 or self._in_ch != out_ch:
            downsample = nn.Sequential(
                conv1x1(self._in_ch, out_ch, stride), self._norm_layer(out_ch)
            )
        norm = self._norm_layer
        stage = [
            block(
                self._in_ch, planes, stride=stride, dilation=self._dilation,
                first_dilation=previous_dilation, downsample=downsample, norm_layer=norm,
            )
        ]
        self._in_ch = out_ch
        for _ in range(1, blocks):
            stage.append(block(out_ch, planes, dilation=self._dilation, norm_layer=norm))
        return nn.Sequential(*stage)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The outputs of layer1..layer4 (see `feature_info`) for an image batch ``x`` (B, 3, H, W)."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))  # (B, stem, H/4, W/4)
        features = []
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = layer(x)  # strides 4, 8, min(16, OS), OS
            features.append(x)
        return features


def resnet18(
    output_stride: int = 16,
    norm_layer: NormLayer | None = None,
    bn_momentum: float | None = None,
) -> ResNet:
    """ResNet-18 backbone (low level 64 ch, out 512 ch)."""
    return ResNet(
        BasicBlock, [2, 2, 2, 2], output_stride=output_stride, norm_layer=norm_layer,
        bn_momentum=bn_momentum, arch="resnet18",
    )


def resnet34(
    output_stride: int = 16,
    norm_layer: NormLayer | None = None,
    bn_momentum: float | None = None,
) -> ResNet:
    """ResNet-34 backbone (low level 64 ch, out 512 ch)."""
    return ResNet(
        BasicBlock, [3, 4, 6, 3], output_stride=output_stride, norm_layer=norm_layer,
        bn_momentum=bn_momentum, arch="resnet34",
    )


def resnet50(
    output_stride: int = 16,
    norm_layer: NormLayer | None = None,
    bn_momentum: float | None = None,
) -> ResNet:
    """ResNet-50 backbone (low level 256 ch, out 2048 ch)."""
    return ResNet(
        Bottleneck, [3, 4, 6, 3], output_stride=output_stride, norm_layer=norm_layer,
        bn_momentum=bn_momentum, arch="resnet50",
    )


def resnet101(
    output_stride: int = 16,
    norm_layer: NormLayer | None = None,
    bn_momentum: float | None = None,
) -> ResNet:
    """ResNet-101 backbone (low level 256 ch, out 2048 ch)."""
    return ResNet(
        Bottleneck, [3, 4, 23, 3], output_stride=output_stride, norm_layer=norm_layer,
        bn_momentum=bn_momentum, arch="resnet101",
    )


def resnet_tiny(
    output_stride: int = 16,
    norm_layer: NormLayer | None = None,
    bn_momentum: float | None = None,
) -> ResNet:
    """A small, fast ResNet for CPU training and tests (low level 16 ch, out 128 ch).

    BasicBlock, one block per stage, widths (16, 32, 64, 128), stem 16; no pretrained
    weights exist for it.
    """
    return ResNet(
        BasicBlock, [1, 1, 1, 1], widths=(16, 32, 64, 128), stem_width=16,
        output_stride=output_stride, norm_layer=norm_layer, bn_momentum=bn_momentum,
        arch="resnet_tiny",
    )
