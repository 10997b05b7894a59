"""The segmentation model: backbone -> decoder -> head, and the questions the engine asks it.

The engine, the analyses and the export only call `forward`, `loss`, `dense`, `dense_with_counts`,
`decide`, `predict` and `param_groups`, and the head's protocol (`models/heads/base.py`); which
scorer or output structure sits in the head is invisible to them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from scaleseg.models.heads.base import SegmentationHead


class Segmentor(nn.Module):
    def __init__(self, backbone: nn.Module, decoder: nn.Module, head: SegmentationHead) -> None:
        super().__init__()
        self.backbone = backbone  # images -> [maps at strides 4..32] (models/backbones/features.py)
        self.decoder = decoder  # maps -> features (B, D, H/4, W/4)
        self.head = head

    def forward(self, images: torch.Tensor) -> dict:
        """images (B, 3, H, W) -> the head's raw outputs (at the decoder's stride)."""
        return self.head(self.features(images))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) -> the decoder's features (B, D, H/4, W/4), the head's input.

        A head with a `size_divisor` above 1 (the pyramid: its coarsest stride) gets images zero-padded
        at the bottom/right to a multiple of it; its `loss` and `dense` pad the labels and crop the
        output to match. The pad is written as ceil(H / s) * s - H, which torch.export can reason about."""
        s = self.head.size_divisor
        if s > 1:
            H, W = images.shape[-2:]
            images = F.pad(images, (0, (W + s - 1) // s * s - W, 0, (H + s - 1) // s * s - H))
        return self.decoder(self.backbone(images))

    def loss(self, outputs: dict, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """Loss terms for a label map (B, H, W); "loss" is their sum, the value to minimise."""
        terms = self.head.loss(outputs, target)
        terms["loss"] = sum(terms.values())
        return terms

    def dense(self, images: torch.Tensor) -> torch.Tensor:
        """The map that inference averages over windows/scales/flips, at the input size: (B, K, H, W)."""
        return self.head.dense(self(images), images.shape[-2:])

    def dense_with_counts(
        self, images: torch.Tensor, target: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """`dense` and the head's per-view counts (see SegmentationHead.dense_with_counts); `target`, the
        view's labels (B, H, W), for the counts that compare with them (the pyramid's Table 9)."""
        if target is None:
            return self.head.dense_with_counts(self(images), images.shape[-2:])
        return self.head.dense_with_counts(self(images), images.shape[-2:], target)

    def training_stats(self) -> dict[str, float]:
        """The head's figures about its training state (e.g. "index_recall"), for the training log."""
        return self.head.training_stats()

    def decide(self, dense: torch.Tensor, chunk_classes: int | None = None) -> torch.Tensor:
        """Class ids (B, H, W) from an (averaged) dense map; `chunk_classes`: see ClassScorer.decide."""
        return self.head.decide(dense, chunk_classes)

    @torch.no_grad()
    def predict(self, images: torch.Tensor, chunk_classes: int | None = None) -> torch.Tensor:
        """Class ids (B, H, W) of normalised images (B, 3, H, W): one view, the whole image, in bounded
        memory (nothing of C x H x W with the embedding scorer), in eval mode (a model in training mode
        is switched for the call and back). What the ONNX export traces. Windows, scales and flips:
        `scaleseg.predict_labels`."""
        was_training = self.training
        self.eval()
        try:
            return self.decide(self.dense(images), chunk_classes)
        finally:
            self.train(was_training)

    def after_optimizer_step(self) -> None:
        """The head's constraints on its parameters, re-imposed (the sphere class table); call after every
        `optimizer.step()` (the trainer does)."""
        self.head.after_optimizer_step()

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Every parameter under the name of its optimizer group (backbone, decoder, and the head's:
        head, class_embeddings); what each group gets is `optim.groups.<name>`."""
        return {
            "backbone": list(self.backbone.parameters()),
            "decoder": list(self.decoder.parameters()),
            **self.head.param_groups(),
        }
