"""The Python API: ESS as a drop-in head for any PyTorch segmentation model, and whole scaleseg models
without the config system. Everything here is importable from `scaleseg` itself; docs/api.md shows it
at work (with a plain training loop, mmsegmentation and segmentation-models-pytorch).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from scaleseg.models.heads.scorers import EmbeddingScorer
from scaleseg.models.heads.single import SingleLevelHead


class ESSHead(nn.Module):
    """The ESS embedding head (ESS Eq. 6-7): features (B, D, h, w) -> pixel embeddings (B, d, h, w),
    with the C x d class-embedding table it owns. Memory does not grow with C: nothing of size
    C x H x W is built in the loss or the prediction.

    Args:
        in_channels: D, the channels of the features it is given.
        num_classes: C.
        embed_dim: d (the paper uses 7 to 12).
        num_neighbours: k, hard negatives per pixel in the kNN loss (ESS Eq. 6).
        temperature: tau of the logits -||x - mu||^2 / tau.
        margin, margin_weight: the max-margin regulariser between class embeddings (ESS Eq. 7); weight 0 = off.
        loss: "knn" (ESS Eq. 6) or "full" (exact cross-entropy over all C classes, tiled).
        ignore_index: the label value that is not a class (default -100, as `F.cross_entropy`; any value
            outside 0..C-1).
        loss_resolution: "full" (embeddings bilinearly upsampled to the labels, the paper) or "decoder"
            (labels sampled at the embeddings' grid).
        memory_budget_mb: the bound of the nearest-class search and the exact loss's tiles.
        margin_refresh: training steps between refreshes of the regulariser's nearest-class pairs (ESS
            supplementary C; 1 = the exact Eq. 7 every step, a C x C search).
        search_block, search_index: cheaper hard negatives (ESS supplementary C): one search per s x s
            block of loss pixels; "exact" (default), "ivf" (the approximate k-means class index) or "auto"
            (ivf from 50,000 classes on). docs/benchmarks.md has their cost and accuracy.
        table: "free" (as published: rows uniform(-1, 1), trained raw) or "sphere" (unit rows, put back on
            the sphere by `after_optimizer_step()`, which the training loop calls after each
            `optimizer.step()`; a step of lr then turns a row by lr x its tangent gradient, see docs/ess.md).
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        embed_dim: int = 12,
        *,
        num_neighbours: int = 7,
        temperature: float = 0.05,
        margin: float = 0.2,
        margin_weight: float = 1.0,
        loss: str = "knn",
        ignore_index: int = -100,
        loss_resolution: str = "full",
        memory_budget_mb: int = 256,
        margin_refresh: int = 100,
        search_block: int = 1,
        search_index: str = "exact",
        table: str = "free",
    ) -> None:
        super().__init__()
        if 0 <= ignore_index < num_classes:
            raise ValueError(f"ignore_index = {ignore_index} is a class id (0..{num_classes - 1}); use e.g. -100")
        if loss == "knn" and not 1 <= num_neighbours < num_classes:
            raise ValueError(f"num_neighbours = {num_neighbours}: need 1 <= k <= C - 1 = {num_classes - 1}")
        scorer = EmbeddingScorer(
            in_channels, num_classes, embed_dim=embed_dim, num_neighbours=num_neighbours, temperature=temperature,
            margin=margin, margin_weight=margin_weight, loss=loss, ignore_index=ignore_index,
            search_budget_bytes=memory_budget_mb * 2**20, margin_refresh=margin_refresh,
            search_block=search_block, search_index=search_index, table=table,
        )
        self.head = SingleLevelHead(scorer, loss_resolution)

    @property
    def class_embeddings(self) -> nn.Parameter:
        """The (C, d) table as trained; `class_table()` gives it as compared (L2-normalised rows)."""
        return self.head.scorer.class_embeddings

    def class_table(self) -> torch.Tensor:
        return self.head.class_table()

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features)["scores"]  # (B, d, h, w)

    def after_optimizer_step(self) -> None:
        """table = "sphere": the class table's rows back to unit norm; call after every `optimizer.step()`
        (nothing for the published "free" table)."""
        self.head.after_optimizer_step()

    def loss(self, embeddings: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """{"ce", "margin", "loss"} for embeddings (B, d, h, w) and labels (B, H, W) (any H, W): "loss" is
        the sum to minimise."""
        terms = self.head.loss({"scores": embeddings}, labels)
        terms["loss"] = sum(terms.values())
        return terms

    @torch.no_grad()
    def predict(self, embeddings: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        """Class ids (B, H, W): the nearest class embedding of each pixel, after a bilinear resize to `size`
        (default: the embeddings' own), in bounded memory; ties go to the lower class id."""
        size = tuple(size) if size is not None else tuple(embeddings.shape[-2:])
        return self.head.decide(self.head.dense({"scores": embeddings}, size))

    def param_groups(
        self,
        lr: float,
        *,
        momentum: float = 0.9,
        weight_decay: float = 1e-4,
        table_lr_mult: float = 1.0,
        table_momentum: float = 0.95,
        table_poly_power: float = 0.95,
        poly_power: float = 0.9,
    ) -> list[dict]:
        """Parameter groups for any `torch.optim` optimizer: the embedding conv at `lr`, the class table at
        `lr * table_lr_mult` with momentum 0.95 (ESS supplementary A; SGD reads "momentum", other optimizers
        ignore it). Each group also carries "initial_lr" and "poly_power" for `scaleseg.set_poly_lr`.
        `torch.optim.SGD(model.parameters())` would give the table the network's settings instead."""
        groups = self.head.param_groups()
        settings = {
            "head": {"lr": lr, "momentum": momentum, "weight_decay": weight_decay, "poly_power": poly_power},
            "class_embeddings": {"lr": lr * table_lr_mult, "momentum": table_momentum, "weight_decay": weight_decay,
                                 "poly_power": table_poly_power},
        }
        return [{"name": name, "params": params, "initial_lr": settings[name]["lr"], **settings[name]}
                for name, params in groups.items()]


def build_model(
    num_classes: int,
    backbone: str | nn.Module = "resnet50",
    *,
    scorer: str = "embedding",
    structure: str = "single",
    ignore_index: int = 255,
    pretrained: str | Path | None = None,
    output_stride: int = 16,
    **options: Any,
):
    """A scaleseg model (DeepLabV3+ or the HRNetV2 fusion decoder + a head) without a config file.

    backbone: a name (resnet18/34/50/101, mobilenet_v2, hrnetv2_w18/32/48, resnet_tiny, hrnet_tiny,
        "timm:<name>") or any module returning four maps at strides 4-32 with a `feature_info`.
    scorer: "linear" (C-channel 1x1 conv) or "embedding" (ESS); structure: "single" or "pyramid".
    pretrained: an ImageNet state dict file for a named backbone (torchvision's, the official HRNet one).
    options: any other `model.*` config key, dotted under model, e.g. {"head.embedding.embed_dim": 16,
        "decoder.type": "hrnet_fusion"} (see scaleseg/config.py).
    -> a `Segmentor`: `model(images)` -> head outputs, `model.loss(outputs, labels)`, `model.predict(images)`.
    """
    from scaleseg.config import load_config
    from scaleseg.models import build_model as build

    named = isinstance(backbone, str)
    overrides = [
        f"data.num_classes={num_classes}", f"model.head.scorer={scorer}", f"model.head.structure={structure}",
        f"model.output_stride={output_stride}",
    ]
    if named:
        overrides.append(f"model.backbone={backbone}")
        if pretrained is not None:
            overrides.append(f"model.pretrained={pretrained}")
    elif pretrained is not None:
        raise ValueError("pretrained applies to a named backbone; load your module's weights before passing it")
    overrides += [f"model.{key}={_yaml(value)}" for key, value in options.items()]
    cfg = load_config(None, overrides)
    return build(cfg.model, num_classes, ignore_index, backbone=None if named else backbone)


def load(path: str | Path, device: str | torch.device = "cpu", **overrides: Any):
    """A trained model from a checkpoint of `scaleseg train` (or an exported .safetensors file with its
    JSON sidecar), in eval mode on `device`, with `class_names` and `palette` attributes.
    `model.predict(images)` gives class ids for ImageNet-normalised images (`scaleseg.to_tensor`);
    `scaleseg.predict_labels(model, images, EvalConfig(...))` does sliding windows, scales and flips."""
    from scaleseg.engine.checkpoint import load_checkpoint_model

    path = Path(path).expanduser()
    dotted = [f"{key}={_yaml(value)}" for key, value in overrides.items()]
    if path.suffix == ".safetensors":
        from scaleseg.export import load_safetensors_model

        model, meta = load_safetensors_model(path)
        names, palette = meta.get("class_names"), meta.get("palette")
    else:
        model, ckpt, _ = load_checkpoint_model(path, dotted)
        names, palette = ckpt.get("class_names"), ckpt.get("palette")
    model.class_names = list(names) if names is not None else None
    model.palette = torch.as_tensor(palette, dtype=torch.uint8) if palette is not None else None
    return model.to(device).eval()


def _yaml(value: Any) -> str:
    """A Python value as the YAML text of a dotted override."""
    import json

    if isinstance(value, (list, tuple, Mapping, bool)) or value is None:
        return json.dumps(list(value) if isinstance(value, tuple) else value)
    return str(value)
