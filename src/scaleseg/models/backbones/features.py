"""The one forward contract of every backbone, in the manner of timm's `features_only` models:

    backbone(images (B, 3, H, W)) -> [f_4, f_8, f_16, f_32]      four maps, finest first
    backbone.feature_info.channels()  -> [c_4, c_8, c_16, c_32]
    backbone.feature_info.reduction() -> [4, 8, 16, 32]           the stride of each map

Map i is (B, channels[i], ceil(H / reduction[i]), ceil(W / reduction[i])). A dilated backbone keeps
the strides it no longer reduces: ResNet at output stride 16 reports [4, 8, 16, 16], at 8
[4, 8, 8, 8]. Decoders take what they need: DeepLabV3+ the first and the last map, the HRNetV2
fusion decoder all four. A timm `features_only=True` model with four stride-4..32 outputs has the
same `feature_info` methods, so it plugs in as it is.
"""

from __future__ import annotations

from collections.abc import Sequence


class FeatureInfo:
    """Channels and reduction (stride) of each feature map of a backbone, finest first; `channels()`
    and `reduction()` as timm's `FeatureInfo`, entries as its dicts (`num_chs`, `reduction`, `module`)."""

    def __init__(self, channels: Sequence[int], reductions: Sequence[int], modules: Sequence[str] | None = None) -> None:
        if len(channels) != len(reductions):
            raise ValueError(f"{len(channels)} feature channels but {len(reductions)} reductions")
        modules = list(modules) if modules is not None else [f"stage{i}" for i in range(len(channels))]
        self.info = [
            {"num_chs": int(c), "reduction": int(r), "module": m} for c, r, m in zip(channels, reductions, modules)
        ]

    def channels(self) -> list[int]:
        return [entry["num_chs"] for entry in self.info]

    def reduction(self) -> list[int]:
        return [entry["reduction"] for entry in self.info]

    def __len__(self) -> int:
        return len(self.info)

    def __getitem__(self, index: int) -> dict:
        return self.info[index]

    def __repr__(self) -> str:
        return f"FeatureInfo(channels={self.channels()}, reduction={self.reduction()})"


def stage_reductions(output_stride: int) -> list[int]:
    """Strides of the four stage outputs of a backbone whose later stages are dilated past `output_stride`."""
    return [min(s, output_stride) for s in (4, 8, 16, 32)]
