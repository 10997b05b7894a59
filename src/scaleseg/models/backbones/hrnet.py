"""HRNetV2 backbones whose parameter names and shapes match the official HRNet code.

HRNet keeps a stride-4 branch through the whole network and adds a branch at half the
resolution (twice the width) in each of its stages 2, 3 and 4; every module of a stage runs
its branches in parallel and then exchanges information between all of them ("repeated
multi-resolution fusion"). HRNetV2 returns all four branches: widths (W, 2W, 4W, 8W) at
strides (4, 8, 16, 32).

The state-dict keys and shapes equal those of the official code (HRNet-Image-Classification
``cls_hrnet.py`` / HRNet-Semantic-Segmentation ``seg_hrnet.py``) minus the classification
head, so a published ImageNet file such as ``hrnetv2_w48_imagenet_pretrained.pth`` loads with
:func:`scaleseg.models.backbones.pretrained.load_pretrained`; its ``incre_modules.*``,
``downsamp_modules.*``, ``final_layer.*`` and ``classifier.*`` keys are the head, declared in
``pretrained_ignore_prefixes``.

As in ``seg_hrnet.py``, a coarser branch is brought to a finer one by bilinear interpolation
(align_corners=False) to the finer branch's exact size, so odd input sizes work; with k x k
stride-2 convs padded by 1 every branch is ceil(H / stride) x ceil(W / stride).

``forward`` returns the four maps (the backbone contract of ``features.py``); the output stride is
fixed (32 for the coarsest map).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from scaleseg.errors import ConfigError

from .features import FeatureInfo
from .resnet import BasicBlock, Bottleneck, NormLayer, conv1x1, conv3x3, init_weights, set_bn_momentum

# Strides of the four branches; HRNet has no dilated variant.
HRNET_STRIDES = (4, 8, 16, 32)


def _check_hrnet_output_stride(output_stride: int) -> None:
    """Raise ConfigError (a ValueError) unless ``output_stride`` is 32."""
    if output_stride != 32:
        raise ConfigError(
            f"HRNet has fixed strides 4, 8, 16 and 32 (it returns all four maps), so "
            f"output_stride must be 32, got {output_stride!r}; build it with output_stride=32"
        )


def _conv_norm(
    in_ch: int, out_ch: int, norm_layer: NormLayer, stride: int = 2, relu: bool = True
) -> nn.Sequential:
    """3x3 conv (no bias, padding 1) + norm [+ ReLU]; keys ``0.weight``, ``1.*``."""
    layers: list[nn.Module] = [conv3x3(in_ch, out_ch, stride), norm_layer(out_ch)]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


def _make_transition(
    pre_channels: Sequence[int], cur_channels: Sequence[int], norm_layer: NormLayer
) -> nn.ModuleList:
    """Map the previous stage's branches to the next stage's (official ``transitionN``).

    An existing branch i keeps its resolution: a 3x3 conv + norm + ReLU if its width
    changes, else an ``nn.Identity`` (no keys, like the official ``None``). A new branch i
    is made from the LAST previous branch by (i + 1 - len(pre)) stride-2 3x3 conv + norm +
    ReLU steps; all but the last keep that branch's width, the last outputs cur_channels[i].
    """
    n_pre = len(pre_channels)
    layers = nn.ModuleList()
    for i, cur in enumerate(cur_channels):
        if i < n_pre:
            if pre_channels[i] != cur:
                layers.append(_conv_norm(pre_channels[i], cur, norm_layer, stride=1))
            else:
                layers.append(nn.Identity())
        else:
            src = pre_channels[-1]
            steps = i + 1 - n_pre
            layers.append(nn.Sequential(*[
                _conv_norm(src, cur if s == steps - 1 else src, norm_layer)
                for s in range(steps)
            ]))
    return layers


class HighResolutionModule(nn.Module):
    """Parallel branches of BasicBlocks, then every branch gets the sum of all branches.

    ``branches[i]``: ``num_blocks`` BasicBlocks of width ``channels[i]``.
    ``fuse_layers[i][j]`` brings branch j to branch i: j > i: 1x1 conv + norm, then bilinear
    upsampling (in ``forward``) to branch i's size; j == i: identity; j < i: (i - j)
    stride-2 3x3 convs, each with norm, all but the last keeping width ``channels[j]`` and
    followed by ReLU, the last mapping to ``channels[i]`` without ReLU.
    Output i = ReLU(sum over j of fuse_layers[i][j](branch j)).
    """

    def __init__(self, channels: Sequence[int], num_blocks: int, norm_layer: NormLayer) -> None:
        super().__init__()
        if len(channels) < 2:
            raise ValueError(f"a high-resolution module needs >= 2 branches, got {channels}")
        self.channels = tuple(channels)
        self.branches = nn.ModuleList(
            nn.Sequential(*[BasicBlock(c, c, norm_layer=norm_layer) for _ in range(num_blocks)])
            for c in channels
        )
        self.fuse_layers = nn.ModuleList()
        for i, c_i in enumerate(channels):
            row = nn.ModuleList()
            for j, c_j in enumerate(channels):
                if j > i:
                    row.append(nn.Sequential(conv1x1(c_j, c_i), norm_layer(c_i)))
                elif j == i:
                    row.append(nn.Identity())
                else:
                    steps = i - j
                    row.append(nn.Sequential(*[
                        _conv_norm(c_j, c_i, norm_layer, relu=False) if s == steps - 1
                        else _conv_norm(c_j, c_j, norm_layer)
                        for s in range(steps)
                    ]))
            self.fuse_layers.append(row)

    def forward(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        # xs[i]: (B, channels[i], H_i, W_i), H_{i+1} = ceil(H_i / 2)
        xs = [branch(x) for branch, x in zip(self.branches, xs)]
        out = []
        for i, row in enumerate(self.fuse_layers):
            size = xs[i].shape[-2:]
            total = None
            for j, fuse in enumerate(row):
                y = fuse(xs[j])
                if j > i:
                    y = F.interpolate(y, size=size, mode="bilinear", align_corners=False)
                total = y if total is None else total + y
            out.append(F.relu(total))  # (B, channels[i], H_i, W_i)
        return out


class HRNet(nn.Module):
    """HRNetV2 backbone: stem, layer1, then stages 2-4 with 2, 3 and 4 branches.

    Args:
        widths: the four branch widths (W, 2W, 4W, 8W).
        stem_width: channels of the two stride-2 3x3 stem convs (official: 64).
        layer1_planes: Bottleneck planes of layer1 (official: 64; output 4x that).
        layer1_blocks: Bottlenecks in layer1 (official: 4).
        modules_per_stage: high-resolution modules in stages 2, 3, 4 (official: 1, 4, 3).
        blocks_per_branch: BasicBlocks per branch in every module (official: 4).
        output_stride: must be 32 (the strides are fixed at 4, 8, 16, 32).
        norm_layer: builds a norm layer from a channel count (default ``nn.BatchNorm2d``).
        bn_momentum: if given, set on every BatchNorm layer.
        arch: name used in messages (e.g. "hrnetv2_w48").
    """

    # Keys of the official classification checkpoint that a backbone does not use.
    pretrained_ignore_prefixes: tuple[str, ...] = (
        "incre_modules.", "downsamp_modules.", "final_layer.", "classifier.",
    )

    def __init__(
        self,
        widths: Sequence[int],
        stem_width: int = 64,
        layer1_planes: int = 64,
        layer1_blocks: int = 4,
        modules_per_stage: Sequence[int] = (1, 4, 3),
        blocks_per_branch: int = 4,
        output_stride: int = 32,
        norm_layer: NormLayer | None = None,
        bn_momentum: float | None = None,
        arch: str = "hrnet",
    ) -> None:
        super().__init__()
        _check_hrnet_output_stride(output_stride)
        if len(widths) != 4 or len(modules_per_stage) != 3:
            raise ValueError(
                f"HRNet needs 4 widths and 3 module counts, got {widths} and {modules_per_stage}"
            )
        norm: NormLayer = norm_layer if norm_layer is not None else nn.BatchNorm2d
        self.arch = arch
        self.output_stride = output_stride
        self.feature_info = FeatureInfo(widths, HRNET_STRIDES, [f"stage4.branch{i}" for i in range(4)])

        self.conv1 = conv3x3(3, stem_width, stride=2)
        self.bn1 = norm(stem_width)
        self.conv2 = conv3x3(stem_width, stem_width, stride=2)
        self.bn2 = norm(stem_width)
        self.relu = nn.ReLU(inplace=True)

        layer1_out = layer1_planes * Bottleneck.expansion
        downsample = None
        if stem_width != layer1_out:
            downsample = nn.Sequential(conv1x1(stem_width, layer1_out), norm(layer1_out))
        self.layer1 = nn.Sequential(
            Bottleneck(stem_width, layer1_planes, downsample=downsample, norm_layer=norm),
            *[Bottleneck(layer1_out, layer1_planes, norm_layer=norm)
              for _ in range(1, layer1_blocks)],
        )

        self.transition1 = _make_transition([layer1_out], widths[:2], norm)
        self.stage2 = self._make_stage(widths[:2], modules_per_stage[0], blocks_per_branch, norm)
        self.transition2 = _make_transition(widths[:2], widths[:3], norm)
        self.stage3 = self._make_stage(widths[:3], modules_per_stage[1], blocks_per_branch, norm)
        self.transition3 = _make_transition(widths[:3], widths, norm)
        self.stage4 = self._make_stage(widths, modules_per_stage[2], blocks_per_branch, norm)

        init_weights(self)  # Kaiming-normal convs, norm weight 1 bias 0 (as resnet.py)
        if bn_momentum is not None:
            set_bn_momentum(self, bn_momentum)

    @staticmethod
    def _make_stage(
        channels: Sequence[int], num_modules: int, num_blocks: int, norm_layer: NormLayer
    ) -> nn.Sequential:
        """``num_modules`` high-resolution modules; each outputs all its branches."""
        return nn.Sequential(*[
            HighResolutionModule(channels, num_blocks, norm_layer) for _ in range(num_modules)
        ])

    @staticmethod
    def _transition(layers: nn.ModuleList, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        """Existing branches go through their own layer, new ones start from the last."""
        return [layer(xs[i] if i < len(xs) else xs[-1]) for i, layer in enumerate(layers)]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The four branch maps for an image batch ``x`` of shape (B, 3, H, W):
        (B, W, ceil(H/4), ceil(W/4)), (B, 2W, ceil(H/8), ...), (B, 4W, ceil(H/16), ...),
        (B, 8W, ceil(H/32), ...)."""
        x = self.relu(self.bn1(self.conv1(x)))  # (B, stem, H/2, W/2)
        x = self.relu(self.bn2(self.conv2(x)))  # (B, stem, H/4, W/4)
        xs = [self.layer1(x)]  # [(B, 4 * layer1_planes, H/4, W/4)]
        xs = self.stage2(self._transition(self.transition1, xs))  # strides 4, 8
        xs = self.stage3(self._transition(self.transition2, xs))  # strides 4, 8, 16
        xs = self.stage4(self._transition(self.transition3, xs))  # strides 4, 8, 16, 32
        return xs


def _hrnetv2(width: int, arch: str, output_stride: int, norm_layer: NormLayer | None,
             bn_momentum: float | None) -> HRNet:
    return HRNet(
        (width, 2 * width, 4 * width, 8 * width), output_stride=output_stride,
        norm_layer=norm_layer, bn_momentum=bn_momentum, arch=arch,
    )


def hrnetv2_w18(
    output_stride: int = 32,
    norm_layer: NormLayer | None = None,
    bn_momentum: float | None = None,
) -> HRNet:
    """HRNetV2-W18 backbone (branches 18, 36, 72, 144 ch at strides 4, 8, 16, 32)."""
    return _hrnetv2(18, "hrnetv2_w18", output_stride, norm_layer, bn_momentum)


def hrnetv2_w32(
    output_stride: int = 32,
    norm_layer: NormLayer | None = None,
    bn_momentum: float | None = None,
) -> HRNet:
    """HRNetV2-W32 backbone (branches 32, 64, 128, 256 ch at strides 4, 8, 16, 32)."""
    return _hrnetv2(32, "hrnetv2_w32", output_stride, norm_layer, bn_momentum)


def hrnetv2_w48(
    output_stride: int = 32,
    norm_layer: NormLayer | None = None,
    bn_momentum: float | None = None,
) -> HRNet:
    """HRNetV2-W48 backbone (branches 48, 96, 192, 384 ch at strides 4, 8, 16, 32)."""
    return _hrnetv2(48, "hrnetv2_w48", output_stride, norm_layer, bn_momentum)


def hrnet_tiny(
    output_stride: int = 32,
    norm_layer: NormLayer | None = None,
    bn_momentum: float | None = None,
) -> HRNet:
    """A small, fast HRNet for CPU training and tests (branches 8, 16, 32, 64 ch).

    Stem 16 ch, layer1 = one Bottleneck of planes 16 (output 64), one module per stage,
    one BasicBlock per branch; no pretrained weights exist for it.
    """
    return HRNet(
        (8, 16, 32, 64), stem_width=16, layer1_planes=16, layer1_blocks=1,
        modules_per_stage=(1, 1, 1), blocks_per_branch=1, output_stride=output_stride,
        norm_layer=norm_layer, bn_momentum=bn_momentum, arch="hrnet_tiny",
    )
