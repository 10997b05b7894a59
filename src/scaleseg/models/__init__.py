"""Model construction from a ModelConfig."""

from __future__ import annotations

from torch import nn

from scaleseg.config import ModelConfig
from scaleseg.errors import ConfigError
from scaleseg.models.backbones import build_backbone
from scaleseg.models.decoders import DeepLabV3PlusDecoder, HRNetFusionDecoder, default_aspp_dilations
from scaleseg.models.heads import build_head
from scaleseg.models.norm import make_norm
from scaleseg.models.segmentor import Segmentor


# DeepLabV3+ decoder widths (ASPP/decoder channels, low-level projection) when the config leaves
# them unset: the published 256/48, narrower for the small CPU backbone.
DECODER_WIDTHS = {"resnet_tiny": (64, 24)}
PUBLISHED_DECODER_WIDTHS = (256, 48)


def build_model(cfg: ModelConfig, num_classes: int, ignore_index: int, backbone: nn.Module | None = None) -> Segmentor:
    """Backbone, decoder and head, every norm layer as `cfg.norm` says (BatchNorm, or GroupNorm with
    `cfg.group_norm_channels` channels per group; `backbone_bn_momentum` applies to BatchNorm only).

    `backbone`: any module to use instead of `cfg.backbone` that returns the four maps at strides 4-32
    and has a `feature_info` with `channels()` (ours, a timm `features_only` model, or yours; see
    models/backbones/features.py); `cfg.pretrained` does not apply to it.

    Raises ConfigError if a GroupNorm group size does not divide a layer's width (naming the part)."""

    def norm(where: str):
        return make_norm(cfg.norm, cfg.group_norm_channels, where)

    if backbone is None:
        backbone = build_backbone(
            cfg.backbone, output_stride=cfg.output_stride, pretrained=cfg.pretrained,
            bn_momentum=cfg.backbone_bn_momentum, norm_layer=norm(f"the backbone (model.backbone = {cfg.backbone})"),
            pretrained_strict=cfg.pretrained_strict,
        )
    channels_in = feature_channels(backbone)  # stride 4 .. 32
    if cfg.decoder.type == "hrnet_fusion":
        # HRNet stages are already the fusion widths; a ResNet's are reduced to them (S&F section 5.1.2)
        reduce_to = None if cfg.backbone.startswith("hrnet") else cfg.decoder.fusion_channels
        decoder = HRNetFusionDecoder(
            channels_in, reduce_to, norm_layer=norm("the decoder (model.decoder.fusion_channels)")
        )
    else:
        channels, low_level_channels = DECODER_WIDTHS.get(cfg.backbone, PUBLISHED_DECODER_WIDTHS)
        decoder = DeepLabV3PlusDecoder(
            in_channels=channels_in[-1],
            low_level_in_channels=channels_in[0],
            channels=cfg.decoder.channels or channels,
            low_level_channels=cfg.decoder.low_level_channels or low_level_channels,
            dilations=cfg.decoder.aspp_dilations or default_aspp_dilations(cfg.output_stride),
            dropout=cfg.decoder.dropout,
            norm_layer=norm("the decoder (model.decoder.channels, model.decoder.low_level_channels)"),
        )
    head_norm = norm(
        "the pyramid head (model.head.pyramid.unity_channels, model.head.pyramid.semantic_channels)"
        if cfg.head.structure == "pyramid" else "the single head's semantic layers (model.head.pyramid.semantic_channels)"
    )
    head = build_head(cfg.head, decoder.out_channels, num_classes, ignore_index, norm_layer=head_norm)
    return Segmentor(backbone, decoder, head)


def feature_channels(backbone: nn.Module) -> list[int]:
    """The channels of a backbone's four maps (its `feature_info`), or an error saying what is missing."""
    info = getattr(backbone, "feature_info", None)  # a user's module may lack it: say so, not AttributeError
    channels = list(info.channels()) if info is not None and hasattr(info, "channels") else None
    if channels is None or len(channels) != 4:
        raise ConfigError(
            f"the backbone {type(backbone).__name__} needs a feature_info with channels() of its four maps at strides "
            f"4, 8, 16, 32 (got {channels}); set backbone.feature_info = scaleseg.FeatureInfo(channels, [4, 8, 16, 32])"
        )
    return channels


__all__ = ["build_model", "feature_channels", "Segmentor"]
