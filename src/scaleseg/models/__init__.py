"""Model construction from a ModelConfig."""

from __future__ import annotations

from scaleseg.config import ModelConfig
from scaleseg.models.backbones import build_backbone
from scaleseg.models.decoders import DeepLabV3PlusDecoder, HRNetFusionDecoder, default_aspp_dilations
from scaleseg.models.heads import build_head
from scaleseg.models.norm import make_norm
from scaleseg.models.segmentor import Segmentor


# DeepLabV3+ decoder widths (ASPP/decoder channels, low-level projection) when the config leaves
# them unset: the published 256/48, narrower for the small CPU backbone.
DECODER_WIDTHS = {"resnet_tiny": (64, 24)}
PUBLISHED_DECODER_WIDTHS = (256, 48)


def build_model(cfg: ModelConfig, num_classes: int, ignore_index: int, backbone_lr_mult: float = 0.1) -> Segmentor:
    """Backbone, decoder and head, every norm layer as `cfg.norm` says (BatchNorm, or GroupNorm with
    `cfg.group_norm_channels` channels per group; `backbone_bn_momentum` applies to BatchNorm only).

    Raises ConfigError if a GroupNorm group size does not divide a layer's width (naming the part)."""

    def norm(where: str):
        return make_norm(cfg.norm, cfg.group_norm_channels, where)

    backbone = build_backbone(
        cfg.backbone, output_stride=cfg.output_stride, pretrained=cfg.pretrained, bn_momentum=cfg.backbone_bn_momentum,
        norm_layer=norm(f"the backbone (model.backbone = {cfg.backbone})"), pretrained_strict=cfg.pretrained_strict,
    )
    if cfg.decoder.type == "hrnet_fusion":
        # HRNet stages are already the fusion widths; a ResNet's are reduced to them (section 5.1.2)
        reduce_to = None if cfg.backbone.startswith("hrnet") else cfg.decoder.fusion_channels
        decoder = HRNetFusionDecoder(
            backbone.stage_channels, reduce_to, norm_layer=norm("the decoder (model.decoder.fusion_channels)")
        )
    else:
        channels, low_level_channels = DECODER_WIDTHS.get(cfg.backbone, PUBLISHED_DECODER_WIDTHS)
        decoder = DeepLabV3PlusDecoder(
            in_channels=backbone.out_channels,
            low_level_in_channels=backbone.low_level_channels,
            channels=cfg.decoder.channels or channels,
            low_level_channels=cfg.decoder.low_level_channels or low_level_channels,
            dilations=cfg.decoder.aspp_dilations or default_aspp_dilations(cfg.output_stride),
            dropout=cfg.decoder.dropout,
            norm_layer=norm("the decoder (model.decoder.channels, model.decoder.low_level_channels)"),
        )
    head_norm = norm("the pyramid head (model.head.pyramid.unity_channels, model.head.pyramid.semantic_channels)")
    head = build_head(cfg.head, decoder.out_channels, num_classes, ignore_index, norm_layer=head_norm)
    return Segmentor(backbone, decoder, head, backbone_lr_mult=backbone_lr_mult)


__all__ = ["build_model", "Segmentor"]
