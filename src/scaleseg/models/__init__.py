"""Model construction from a ModelConfig."""

from __future__ import annotations

from scaleseg.config import ModelConfig
from scaleseg.models.backbones import build_backbone
from scaleseg.models.decoders import DeepLabV3PlusDecoder, HRNetFusionDecoder, default_aspp_dilations
from scaleseg.models.heads import build_head
from scaleseg.models.segmentor import Segmentor


# DeepLabV3+ decoder widths (ASPP/decoder channels, low-level projection) when the config leaves
# them unset: the published 256/48, narrower for the small CPU backbone.
DECODER_WIDTHS = {"resnet_tiny": (64, 24)}
PUBLISHED_DECODER_WIDTHS = (256, 48)


def build_model(cfg: ModelConfig, num_classes: int, ignore_index: int, backbone_lr_mult: float = 0.1) -> Segmentor:
    backbone = build_backbone(
        cfg.backbone, output_stride=cfg.output_stride, pretrained=cfg.pretrained, bn_momentum=cfg.backbone_bn_momentum
    )
    if cfg.decoder.type == "hrnet_fusion":
        # HRNet stages are already the fusion widths; a ResNet's are reduced to them (section 5.1.2)
        reduce_to = None if cfg.backbone.startswith("hrnet") else cfg.decoder.fusion_channels
        decoder = HRNetFusionDecoder(backbone.stage_channels, reduce_to)
    else:
        channels, low_level_channels = DECODER_WIDTHS.get(cfg.backbone, PUBLISHED_DECODER_WIDTHS)
        decoder = DeepLabV3PlusDecoder(
            in_channels=backbone.out_channels,
            low_level_in_channels=backbone.low_level_channels,
            channels=cfg.decoder.channels or channels,
            low_level_channels=cfg.decoder.low_level_channels or low_level_channels,
            dilations=cfg.decoder.aspp_dilations or default_aspp_dilations(cfg.output_stride),
            dropout=cfg.decoder.dropout,
        )
    head = build_head(cfg.head, decoder.out_channels, num_classes, ignore_index)
    return Segmentor(backbone, decoder, head, backbone_lr_mult=backbone_lr_mult)


__all__ = ["build_model", "Segmentor"]
