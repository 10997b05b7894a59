"""The segmentation model: backbone -> decoder -> head, and the questions the engine asks it.

The engine only calls `forward`, `loss`, `dense`, `decide` and `param_groups`; which scorer or
output structure sits in the head is invisible to it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Segmentor(nn.Module):
    def __init__(self, backbone: nn.Module, decoder: nn.Module, head: nn.Module, backbone_lr_mult: float = 0.1) -> None:
        super().__init__()
        self.backbone = backbone
        self.decoder = decoder
        self.head = head
        self.backbone_lr_mult = backbone_lr_mult

    def forward(self, images: torch.Tensor) -> dict:
        """images (B, 3, H, W) -> the head's raw outputs (at the decoder's stride).

        A head with a `size_divisor` (the pyramid: its coarsest stride) gets images zero-padded at the
        bottom/right to a multiple of it; its `loss` and `dense` pad the labels and crop the output to match.
        """
        divisor = getattr(self.head, "size_divisor", 1)
        H, W = images.shape[-2:]
        if H % divisor or W % divisor:
            images = F.pad(images, (0, -W % divisor, 0, -H % divisor))
        if getattr(self.decoder, "uses_stages", False):
            features = self.decoder(self.backbone.forward_stages(images))  # stages at strides 4-32 -> H/4
        else:
            low_level, out = self.backbone(images)  # (B, c_low, H/4, W/4), (B, c_out, H/os, W/os)
            features = self.decoder(low_level, out)  # (B, D, H/4, W/4)
        return self.head(features)

    def loss(self, outputs: dict[str, torch.Tensor], target: torch.Tensor) -> dict[str, torch.Tensor]:
        """Loss terms for a label map (B, H, W); "loss" is their sum, the value to minimise."""
        terms = self.head.loss(outputs, target)
        terms["loss"] = sum(terms.values())
        return terms

    def dense(self, images: torch.Tensor) -> torch.Tensor:
        """The map that inference averages over windows/scales/flips, at the input size: (B, K, H, W)."""
        return self.head.dense(self(images), images.shape[-2:])

    def decide(self, dense: torch.Tensor) -> torch.Tensor:
        """Class ids (B, H, W) from an (averaged) dense map."""
        return self.head.decide(dense)

    def param_groups(self) -> list[dict]:
        """Optimizer groups declared by the parts: backbone at a reduced LR, decoder, head (the
        head's scorer may declare its own groups, e.g. a class-embedding table)."""
        return [
            {"name": "backbone", "params": list(self.backbone.parameters()), "lr_mult": self.backbone_lr_mult},
            {"name": "decoder", "params": list(self.decoder.parameters())},
            *self.head.param_groups(),
        ]
