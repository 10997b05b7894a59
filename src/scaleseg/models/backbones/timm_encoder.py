"""A timm encoder as a scaleseg backbone (`model.backbone=timm:<name>`), through timm's `features_only`
interface: the maps at strides 4, 8, 16 and 32 (a stride-2 map some models also give is dropped),
with timm's own `feature_info`. timm is imported only here, when such a backbone is built
(`pip install timm`); ImageNet weights come from a local file (`model.pretrained`), which timm loads
itself (`pretrained_cfg_overlay={"file": ...}`): nothing is downloaded.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from scaleseg.errors import ConfigError

from .features import FeatureInfo
from .resnet import set_bn_momentum


class TimmEncoder(nn.Module):
    pretrained_ignore_prefixes: tuple[str, ...] = ()

    def __init__(
        self,
        name: str,
        output_stride: int = 32,
        pretrained: str | os.PathLike[str] | None = None,
        bn_momentum: float | None = None,
    ) -> None:
        super().__init__()
        try:
            import timm
        except ImportError:
            raise ConfigError(f"model.backbone = timm:{name} needs timm: pip install timm") from None
        kwargs: dict = {"features_only": True}
        if output_stride != 32:
            kwargs["output_stride"] = output_stride
        if pretrained is not None:
            kwargs.update(pretrained=True, pretrained_cfg_overlay={"file": str(os.fspath(pretrained))})
        try:
            self.model = timm.create_model(name, **kwargs)
        except (RuntimeError, ValueError, TypeError, KeyError) as exc:
            raise ConfigError(f"model.backbone = timm:{name}: timm cannot build it ({type(exc).__name__}: {exc})") from None
        info = self.model.feature_info
        keep = [i for i, r in enumerate(info.reduction()) if r >= 4]
        if len(keep) != 4:
            raise ConfigError(
                f"model.backbone = timm:{name} gives feature maps at strides {info.reduction()}; scaleseg needs four "
                "at strides 4, 8, 16 and 32 (capped at the output stride)"
            )
        self.keep = keep
        self.feature_info = FeatureInfo(
            [info.channels()[i] for i in keep], [info.reduction()[i] for i in keep], [info.module_name()[i] for i in keep]
        )
        self.arch, self.output_stride = f"timm:{name}", output_stride
        if bn_momentum is not None:
            set_bn_momentum(self, bn_momentum)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = self.model(x)
        return [features[i] for i in self.keep]
