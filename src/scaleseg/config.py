"""Typed configuration: dataclasses with defaults, YAML files, dotted command-line overrides.

The defaults of these dataclasses *are* the main job: `scaleseg train` with no arguments trains
DeepLabV3+ (tiny backbone) on the built-in `synthetic` dataset. A YAML file in `configs/` holds
only what differs from the defaults; it may inherit from other files with `_base_: other.yaml`
(a path relative to the file, or a list of them, merged in order, the file itself last).

Every value is checked before anything runs: an unknown key, a wrong type or an impossible value
raises :class:`ConfigError` naming the dotted key (``model.head.scorer``) and what is allowed.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from scaleseg.errors import ConfigError

Size = tuple[int, int]  # (height, width); a single int in YAML means a square
MAX_INT = 2**63 - 1  # the largest integer a config value may hold (int64)
MAX_SEED = 2**32 - 1  # seeds: numpy takes 32 bits


# --------------------------------------------------------------------------------------------
# sections
# --------------------------------------------------------------------------------------------


@dataclass
class SyntheticConfig:
    """The built-in procedural dataset (see scaleseg.data.datasets.synthetic)."""

    train_length: int = 4000  # images in one epoch of the train split (generated on the fly)
    val_length: int = 100
    image_size: Size = (160, 160)  # size of generated images, train and val
    seed: int = 0
    num_families: int | None = None  # default round(sqrt(num_classes))
    stuff_fraction: float = 0.2
    zipf_exponent: float = 1.0
    max_things: int = 8
    boundary_ignore: int = 1

    def validate(self, key: str) -> None:
        _seed(self.seed, f"{key}.seed")
        _positive(self.train_length, f"{key}.train_length")
        _positive(self.val_length, f"{key}.val_length")
        _positive_size(self.image_size, f"{key}.image_size")
        if self.num_families is not None:
            _positive(self.num_families, f"{key}.num_families")
        _in_range(self.stuff_fraction, 0.0, 1.0, f"{key}.stuff_fraction")
        if self.zipf_exponent < 0:
            raise ConfigError(f"{key}.zipf_exponent = {self.zipf_exponent}: must be >= 0")
        if self.max_things < 0 or self.boundary_ignore < 0:
            raise ConfigError(f"{key}.max_things and {key}.boundary_ignore must be >= 0")


@dataclass
class TrainPipelineConfig:
    """Training augmentation: random resize, random crop, flip, photometric distortion, pad (image 0, label ignore)."""

    crop_size: Size = (128, 128)
    scale_range: tuple[float, float] = (0.5, 2.0)  # random resize ratio, relative to the image
    cat_max_ratio: float = 0.75  # retry crops (up to 10) until no class covers more than this; 1 = off
    flip: bool = True
    # mmsegmentation's PhotoMetricDistortion (brightness, contrast, saturation, hue; each with p = 0.5).
    # Off by default: the synthetic dataset's classes differ by small colour steps that it would blur.
    photometric: bool = False

    def validate(self, key: str) -> None:
        _positive_size(self.crop_size, f"{key}.crop_size")
        lo, hi = self.scale_range
        if not 0 < lo <= hi:
            raise ConfigError(f"{key}.scale_range = {list(self.scale_range)}: need 0 < low <= high")
        _in_range(self.cat_max_ratio, 0.0, 1.0, f"{key}.cat_max_ratio", low_open=True)


@dataclass
class DataConfig:
    # synthetic: the built-in generator; the others read a published layout under `root` (README, Datasets)
    dataset: Literal[
        "synthetic", "cityscapes", "voc", "voc_aug", "ade20k", "ade20k_full",
        "cocostuff10k", "cocostuff164k", "coco_lvis", "pascal_context", "folder",
    ] = "synthetic"
    root: str | None = None  # the extracted archive (or a prepared folder) of a file dataset
    train_split: str | None = None  # None: the dataset's own training split (e.g. trainaug for voc_aug)
    val_split: str | None = None  # None: the dataset's own evaluation split
    # skip: leave bad samples out (training takes the next good one), each counted and logged
    on_bad_sample: Literal["error", "skip"] = "error"
    # LVIS repeat-factor sampling: an image is repeated r = max(1, sqrt(t / f_c)) times per epoch over its
    # rarest class c (f_c: fraction of train images containing c); null = off, LVIS uses t = 0.001
    repeat_factor_threshold: float | None = None
    num_classes: int = 1000
    ignore_index: int | None = None  # None: the dataset's own (255, or 65535 above 255 classes)
    batch_size: int = 8
    num_workers: int = 2
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    train_pipeline: TrainPipelineConfig = field(default_factory=TrainPipelineConfig)

    def validate(self, key: str) -> None:
        if not 2 <= self.num_classes <= 10_000_000:
            raise ConfigError(f"{key}.num_classes = {self.num_classes}: must be between 2 and 10,000,000")
        if self.ignore_index is not None and 0 <= self.ignore_index < self.num_classes:
            raise ConfigError(
                f"{key}.ignore_index = {self.ignore_index} is a class id (classes are 0..{self.num_classes - 1}); "
                "choose a value outside that range, e.g. 65535 or -1, or leave it null for the dataset's own"
            )
        _positive(self.batch_size, f"{key}.batch_size")  # >= 2 with BatchNorm: checked in Config.validate
        if self.num_workers < 0:
            raise ConfigError(f"{key}.num_workers = {self.num_workers}: must be >= 0")
        t = self.repeat_factor_threshold
        if t is not None and not 0 < t <= 1:
            raise ConfigError(
                f"{key}.repeat_factor_threshold = {t}: must be in (0, 1] (a fraction of the training images; "
                "LVIS uses 0.001), or null to sample every image once per epoch"
            )
        self.synthetic.validate(f"{key}.synthetic")
        self.train_pipeline.validate(f"{key}.train_pipeline")
        if self.dataset == "synthetic":
            crop, image = self.train_pipeline.crop_size, self.synthetic.image_size
            largest = [int(s * self.train_pipeline.scale_range[1]) for s in image]
            if crop[0] > largest[0] or crop[1] > largest[1]:
                raise ConfigError(
                    f"{key}.train_pipeline.crop_size = {list(crop)} is larger than the largest resized image "
                    f"{largest} (data.synthetic.image_size x scale_range high); every crop would be mostly padding"
                )


@dataclass
class DecoderConfig:
    """deeplabv3plus: ASPP + low-level skip + 3x3 conv, as in the ESS published code. hrnet_fusion: every
    backbone stage (strides 4-32) upsampled to stride 4 and concatenated (HRNetV2's representation); with a
    ResNet, each stage is first reduced by a Conv1x1-BN-ReLU to fusion_channels (Specialize and Fuse, 5.1.2)."""

    type: Literal["deeplabv3plus", "hrnet_fusion"] = "deeplabv3plus"
    fusion_channels: tuple[int, ...] = (48, 96, 192, 384)  # hrnet_fusion with a ResNet: widths of the 4 stages
    channels: int | None = None  # None: 256 (the published value), 64 for the resnet_tiny backbone
    low_level_channels: int | None = None  # None: 48 (published), 24 for resnet_tiny
    aspp_dilations: tuple[int, ...] | None = None  # None: (6, 12, 18) at output stride 16, doubled at 8
    dropout: float = 0.1

    def validate(self, key: str) -> None:
        for name in ("channels", "low_level_channels"):
            if getattr(self, name) is not None:
                _positive(getattr(self, name), f"{key}.{name}")
        if self.aspp_dilations is not None and (not self.aspp_dilations or min(self.aspp_dilations) < 1):
            raise ConfigError(f"{key}.aspp_dilations = {self.aspp_dilations}: need one or more rates >= 1")
        _in_range(self.dropout, 0.0, 1.0, f"{key}.dropout", high_open=True)
        if len(self.fusion_channels) != 4 or min(self.fusion_channels) < 1:
            raise ConfigError(f"{key}.fusion_channels = {list(self.fusion_channels)}: need 4 positive widths")


@dataclass
class EmbeddingConfig:
    """The ESS embedding scorer (used when model.head.scorer is embedding)."""

    embed_dim: int = 12  # d: channels of the pixel embedding and width of the class table
    num_neighbours: int = 7  # k: negatives per pixel in the kNN loss (ESS Eq. 6)
    temperature: float = 0.05  # tau
    margin: float = 0.2  # m of the max-margin regulariser (ESS Eq. 7)
    margin_weight: float = 1.0  # 0 turns the regulariser off (the ablation)
    negatives: Literal["nearest", "random"] = "nearest"
    distance: Literal["squared", "euclidean"] = "squared"  # euclidean = the published code's -20 ||x - mu||
    loss: Literal["knn", "full"] = "knn"  # full: exact cross-entropy over all C classes, chunked
    normalize: bool = True  # L2-normalise pixel and class embeddings
    search_backend: Literal["torch", "faiss"] = "torch"
    search_budget_mb: int = 256  # memory bound of the nearest-class search and the exact loss tiles
    # free: the published table (rows uniform(-1, 1), trained raw, normalised where used: a step turns a row
    # by lr / ||row||^2, and the raw norms drift); sphere: unit rows, put back on the sphere after every
    # optimizer step, so a step turns each row by exactly lr x its tangent gradient (docs/ess.md)
    table: Literal["free", "sphere"] = "free"
    # the class table's optimizer settings are optim.groups.class_embeddings (ESS supplementary A)
    # Cheaper hard negatives (ESS supplementary C); docs/benchmarks.md has their cost and accuracy.
    search_block: int = 1  # s: one nearest-class search per s x s block of loss pixels, shared by them
    # ivf: approximate k-means index; auto: ivf from index_min_classes classes on. Default exact: on the
    # built-in dataset the index lost accuracy at 1,000 classes (docs/benchmarks.md), so it is opt-in
    search_index: Literal["exact", "ivf", "auto"] = "exact"
    index_min_classes: int = 50_000  # auto: an index from this many classes on
    index_clusters: int = 0  # clusters of the index; 0 = round(sqrt(C))
    index_probes: int = 8  # clusters searched per query
    index_refresh: int = 100  # training steps between k-means refreshes of the index's centroids
    index_reassign: int = 1  # training steps between re-assignments of every class to its nearest centroid
    margin_refresh: int = 100  # steps between refreshes of the regulariser's cached pairs (1: exact ESS Eq. 7)
    margin_candidates: int = 1  # cached nearest other classes per class; the hinge takes the nearest
    full_implementation: Literal["auto", "linear", "tiled"] = "auto"  # exact loss: PyTorch's chunked linear CE or ours

    def validate(self, key: str) -> None:
        for name in ("embed_dim", "num_neighbours", "search_budget_mb", "search_block", "index_probes",
                     "index_refresh", "index_reassign", "margin_refresh", "margin_candidates", "index_min_classes"):
            _positive(getattr(self, name), f"{key}.{name}")
        if self.index_clusters < 0:
            raise ConfigError(f"{key}.index_clusters = {self.index_clusters}: must be >= 0 (0 = round(sqrt(C)))")
        for name in ("temperature", "margin", "margin_weight"):
            _finite(getattr(self, name), f"{key}.{name}")
        if self.temperature <= 0:
            raise ConfigError(f"{key}.temperature = {self.temperature}: must be > 0")
        if self.margin < 0 or self.margin_weight < 0:
            raise ConfigError(f"{key}.margin and {key}.margin_weight must be >= 0")
        if self.table == "sphere" and not self.normalize:
            raise ConfigError(f"{key}.table = sphere needs {key}.normalize = true (the rows are compared as unit vectors)")
        if self.full_implementation == "linear" and self.distance != "squared":
            raise ConfigError(f"{key}.full_implementation = linear needs {key}.distance = squared; use auto or tiled")


@dataclass
class PyramidConfig:
    """Specialize and Fuse (used when model.head.structure is pyramid); defaults are the paper's."""

    strides: tuple[int, ...] = (4, 8, 16, 32)  # output strides of the levels; the finest = the features' stride
    unity_channels: int = 64  # D_u of the unity head
    semantic_channels: int = 512  # D_s of the semantic head
    # the coarse-to-fine contextual module (true); false = the "simplest" head of Table 6; "anl": one ANL block
    # on the head's input (Table 6's "ANL"), "anl_multi": one per pyramid level (Table 6's "ANL-multi")
    context: Union[bool, Literal["anl", "anl_multi"]] = True
    context_bins: tuple[int, ...] = (1, 3, 6, 8)  # pyramid pooling of the context (S&F Eq. 6)
    tau: float = 0.9  # unity threshold of the fuse (S&F Eq. 2); >= 1 uses the finest level alone
    relabel: Literal["done_by_coarser", "simple_fix", "naive"] = "done_by_coarser"  # Table 7's policies
    relabel_tau: float | None = None  # true-positive threshold of the relabelling; null = tau

    def validate(self, key: str) -> None:
        from scaleseg.losses.pyramid import check_strides

        try:
            strides = check_strides(self.strides)
        except ValueError as e:
            raise ConfigError(f"{key}.strides = {list(self.strides)}: {e}") from None
        if len(strides) < 2:
            raise ConfigError(f"{key}.strides = {list(self.strides)}: a pyramid needs two or more levels")
        if strides[-1] != 4:
            raise ConfigError(
                f"{key}.strides = {list(self.strides)}: the finest level must be at stride 4, the stride of the "
                "decoder's features"
            )
        _positive(self.unity_channels, f"{key}.unity_channels")
        _positive(self.semantic_channels, f"{key}.semantic_channels")
        if not self.context_bins or min(self.context_bins) < 1:
            raise ConfigError(f"{key}.context_bins = {list(self.context_bins)}: need one or more sizes >= 1")
        for name in ("tau", "relabel_tau"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"{key}.{name} = {value}: must be > 0 (a probability threshold; >= 1 disables)")


@dataclass
class HeadConfig:
    """How a feature becomes a class: the output structure x the class scorer (DESIGN.md)."""

    structure: Literal["single", "pyramid"] = "single"
    scorer: Literal["linear", "embedding"] = "linear"
    # the single-level structure's layers before its scorer. plain: none (the scorer's 1x1 conv on the decoder's
    # features); semantic: the pyramid's semantic head with one level (S&F Table 6 "Single (standard)": Conv1x1 to
    # pyramid.semantic_channels, the contextual module if pyramid.context, the ConvBlock), the pyramid's matched baseline
    single_head: Literal["plain", "semantic"] = "plain"
    # full: scores bilinearly upsampled to the crop (the paper); decoder: labels downsampled (each cell's majority) to the
    # stride-4 score grid (16x fewer pixels). The default run uses decoder: the linear scorer's 1000 x H x W
    # upsampled logits cost ~2.4 s of a 2.6 s CPU step at full resolution.
    loss_resolution: Literal["full", "decoder"] = "decoder"
    embedding: EmbeddingConfig = field(default_factory=EmbeddingConfig)
    pyramid: PyramidConfig = field(default_factory=PyramidConfig)

    def validate(self, key: str) -> None:
        self.embedding.validate(f"{key}.embedding")
        self.pyramid.validate(f"{key}.pyramid")
        if self.structure == "pyramid" and self.single_head != "plain":
            raise ConfigError(
                f"{key}.single_head = {self.single_head!r} applies to structure single; the pyramid always has its "
                f"semantic head (set {key}.single_head=plain, or {key}.structure=single)"
            )


BACKBONE_NAMES = (
    "resnet_tiny", "resnet18", "resnet34", "resnet50", "resnet101", "mobilenet_v2",
    "hrnet_tiny", "hrnetv2_w18", "hrnetv2_w32", "hrnetv2_w48",
)
TIMM_PREFIX = "timm:"  # model.backbone=timm:<name>: a timm encoder through its features_only interface


@dataclass
class ModelConfig:
    # one of BACKBONE_NAMES (torchvision / official HRNet parameter names), or timm:<name> (needs timm)
    backbone: str = "resnet_tiny"
    output_stride: Literal[8, 16, 32] = 16
    pretrained: str | None = None  # ImageNet state dict (.pth): torchvision's, or the official HRNet release
    # refuse a pretrained file whose keys do not match the backbone's (another depth: resnet50 weights for
    # resnet101 share every shape but leave layer3.6-22 random); false: load the matching keys, warn
    pretrained_strict: bool = True
    backbone_bn_momentum: float = 0.01  # BatchNorm layers only (GroupNorm keeps no running statistics)
    # Norm layers of backbone, decoder and head. group: Group Normalization (Wu & He 2018; ESS Table 5 "GN"), per
    # image, so training works with 1-2 images per GPU (data.batch_size = 1 is allowed). ImageNet BN weights load
    # as the GN affine parameters; their running statistics are dropped.
    norm: Literal["batch", "group"] = "batch"
    group_norm_channels: int = 16  # channels per GroupNorm group (groups = width // this); must divide every width
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    head: HeadConfig = field(default_factory=HeadConfig)

    def validate(self, key: str) -> None:
        timm = self.backbone.startswith(TIMM_PREFIX)
        if self.backbone not in BACKBONE_NAMES and not (timm and len(self.backbone) > len(TIMM_PREFIX)):
            close = difflib.get_close_matches(self.backbone, BACKBONE_NAMES, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(
                f"{key}.backbone = {self.backbone!r} is not allowed; choose one of "
                f"{', '.join(repr(n) for n in BACKBONE_NAMES)}, or 'timm:<name>' for a timm encoder{hint}"
            )
        if timm and self.norm == "group":
            raise ConfigError(f"{key}.norm = group replaces our backbones' norm layers; a timm encoder "
                              f"({self.backbone}) keeps its own: use {key}.norm=batch")
        if self.pretrained is not None and not Path(self.pretrained).expanduser().is_file():
            raise ConfigError(
                f"{key}.pretrained = {self.pretrained!r}: no such file. Give the path of an ImageNet state dict "
                "(torchvision's for ResNet/MobileNetV2, e.g. resnet50-0676ba61.pth; the official HRNet release for "
                "HRNet, e.g. hrnetv2_w48_imagenet_pretrained.pth), or null to train from scratch"
            )
        _in_range(self.backbone_bn_momentum, 0.0, 1.0, f"{key}.backbone_bn_momentum", low_open=True)
        if self.group_norm_channels < 1:
            raise ConfigError(
                f"{key}.group_norm_channels = {self.group_norm_channels}: must be >= 1 (channels per GroupNorm "
                "group; the paper uses 16)"
            )
        self.decoder.validate(f"{key}.decoder")
        self.head.validate(f"{key}.head")
        hrnet = self.backbone.startswith("hrnet")
        if hrnet and self.decoder.type != "hrnet_fusion":
            raise ConfigError(
                f"{key}.backbone = {self.backbone} gives four stages at strides 4-32 and no DeepLab low-level/"
                f"high-level pair: set {key}.decoder.type: hrnet_fusion"
            )
        if self.decoder.type == "hrnet_fusion":
            if self.backbone == "mobilenet_v2":
                raise ConfigError(f"{key}.decoder.type = hrnet_fusion supports the ResNet and HRNet backbones, not mobilenet_v2")
            if self.output_stride != 32:
                raise ConfigError(
                    f"{key}.output_stride = {self.output_stride}: the hrnet_fusion decoder takes the standard "
                    f"(undilated) backbone; set {key}.output_stride: 32"
                )


@dataclass
class ParamGroupConfig:
    """What one named parameter group gets; null = the optimizer's own value (optim.momentum, ...)."""

    lr_mult: float = 1.0  # the group's LR = optim.lr x lr_mult
    momentum: float | None = None
    weight_decay: float | None = None
    poly_power: float | None = None

    def validate(self, key: str) -> None:
        if self.lr_mult < 0:
            raise ConfigError(f"{key}.lr_mult = {self.lr_mult}: must be >= 0 (0 freezes the group)")
        if self.momentum is not None:
            _in_range(self.momentum, 0.0, 1.0, f"{key}.momentum", high_open=True)
        for name in ("weight_decay", "poly_power"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ConfigError(f"{key}.{name} = {value}: must be >= 0, or null for optim.{name}")


@dataclass
class ParamGroupsConfig:
    """The optimizer groups the model's parts declare (Segmentor.param_groups), each with its settings, as
    mmengine's paramwise_cfg.custom_keys or detectron2's overrides. Defaults: ESS supplementary A."""

    backbone: ParamGroupConfig = field(default_factory=lambda: ParamGroupConfig(lr_mult=0.1))
    decoder: ParamGroupConfig = field(default_factory=ParamGroupConfig)
    head: ParamGroupConfig = field(default_factory=ParamGroupConfig)  # every head parameter but the class table
    class_embeddings: ParamGroupConfig = field(  # the ESS class-embedding table
        default_factory=lambda: ParamGroupConfig(momentum=0.95, poly_power=0.95)
    )

    def validate(self, key: str) -> None:
        for f in dataclasses.fields(self):
            getattr(self, f.name).validate(f"{key}.{f.name}")


@dataclass
class OptimConfig:
    """SGD with poly LR stepped per iteration (ESS supplementary A); per-group settings in `groups`."""

    lr: float = 0.1  # the default run trains from scratch; the paper uses 0.01 (ADE20K, COCO) with ImageNet weights
    momentum: float = 0.9
    weight_decay: float = 1e-4
    poly_power: float = 0.9
    warmup_iters: int = 0  # linear warm-up from 0.1 x lr; 0 = none (the paper uses none)
    clip_grad_norm: float | None = None  # clip the global gradient norm to this value; null = no clipping
    groups: ParamGroupsConfig = field(default_factory=ParamGroupsConfig)

    def validate(self, key: str) -> None:
        if self.lr <= 0:
            raise ConfigError(f"{key}.lr = {self.lr}: must be > 0")
        _in_range(self.momentum, 0.0, 1.0, f"{key}.momentum", high_open=True)
        if self.weight_decay < 0 or self.poly_power < 0 or self.warmup_iters < 0:
            raise ConfigError(f"{key}: weight_decay, poly_power and warmup_iters must be >= 0")
        self.groups.validate(f"{key}.groups")
        if self.clip_grad_norm is not None and self.clip_grad_norm <= 0:
            raise ConfigError(f"{key}.clip_grad_norm = {self.clip_grad_norm}: must be > 0, or null for no clipping")


@dataclass
class TrainConfig:
    iters: int = 1200
    grad_accum: int = 1  # optimizer step every N batches; iters counts optimizer steps
    amp: Literal["none", "bf16", "fp16"] = "none"
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    seed: int = 0
    deterministic: bool = False
    log_interval: int = 50
    eval_interval: int = 600  # 0: evaluate only at the end
    checkpoint_interval: int = 600
    keep_checkpoints: int = 2  # iter_*.pth kept besides best.pth; 0 keeps all
    tensorboard: bool = False
    progress: bool = True  # tqdm progress bar with ETA on stderr, when stderr is a terminal
    # under torchrun (several processes): BatchNorm statistics over the whole batch of all processes
    # (SyncBatchNorm); false keeps each process's own. A single process always uses plain BatchNorm.
    sync_bn: bool = True
    # a step whose loss or gradient is NaN/inf is skipped (no update) and logged; after this many
    # skipped steps in a row the run stops, leaving the last good checkpoint as it was
    max_nonfinite_steps: int = 5

    def validate(self, key: str) -> None:
        _positive(self.iters, f"{key}.iters")
        _seed(self.seed, f"{key}.seed")
        _positive(self.max_nonfinite_steps, f"{key}.max_nonfinite_steps")
        _positive(self.grad_accum, f"{key}.grad_accum")
        _positive(self.log_interval, f"{key}.log_interval")
        _positive(self.checkpoint_interval, f"{key}.checkpoint_interval")
        if self.eval_interval < 0 or self.keep_checkpoints < 0:
            raise ConfigError(f"{key}.eval_interval and {key}.keep_checkpoints must be >= 0")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ConfigError(f"{key}.device = {self.device!r}: use auto, cpu, cuda or cuda:N")


@dataclass
class EvalConfig:
    mode: Literal["whole", "slide"] = "whole"
    crop_size: Size = (512, 512)  # sliding window (mode: slide)
    stride: Size = (341, 341)
    scales: tuple[float, ...] = (1.0,)  # multi-scale test, e.g. [0.5, 0.75, 1.0, 1.25, 1.5, 1.75]
    flip: bool = False  # also average the horizontally flipped image
    # pyramid heads: "fused" (S&F Eq. 2) or "finest", the finest level alone (S&F Table 8's "aux. supervision")
    pyramid_readout: Literal["fused", "finest"] = "fused"
    # pyramid heads: S&F Table 9 and the unity head's precision / recall in the evaluation (one more decision
    # of the finest level per image: with an embedding scorer and very many classes, false saves that time)
    pyramid_diagnostics: bool = True

    def validate(self, key: str) -> None:
        _positive_size(self.crop_size, f"{key}.crop_size")
        _positive_size(self.stride, f"{key}.stride")
        if self.stride[0] > self.crop_size[0] or self.stride[1] > self.crop_size[1]:
            raise ConfigError(
                f"{key}.stride = {list(self.stride)} is larger than {key}.crop_size = {list(self.crop_size)}: "
                "windows would leave pixels unpredicted"
            )
        if not self.scales or min(self.scales) <= 0:
            raise ConfigError(f"{key}.scales = {list(self.scales)}: need one or more positive scales")


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    work_dir: str | None = None  # default: work_dirs/default, or work_dirs/<folder>_<stem> of the config file
    name: str = "default"  # run name, set from the config file's stem when loaded from a file

    def validate(self) -> "Config":
        for section in ("data", "model", "optim", "train", "eval"):
            getattr(self, section).validate(section)
        if self.data.batch_size < 2 and self.model.norm == "batch":
            raise ConfigError(
                f"data.batch_size = {self.data.batch_size}: BatchNorm (in the ASPP image-pooling branch) needs at "
                "least 2 images per batch; use 2 or more, with train.grad_accum for a larger effective batch, "
                "or model.norm=group"
            )
        head, C = self.model.head, self.data.num_classes
        if head.scorer == "embedding" and head.embedding.loss == "knn" and head.embedding.num_neighbours > C - 1:
            raise ConfigError(
                f"model.head.embedding.num_neighbours = {head.embedding.num_neighbours} is more than the "
                f"{C - 1} negatives that data.num_classes = {C} allows; use at most {C - 1}"
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(dataclasses.asdict(self))


# --------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults <- YAML file (with its `_base_` chain) <- dotted overrides, then validated."""
    raw: dict[str, Any] = {}
    name = "default"
    if path is not None:
        path = Path(path)
        raw = _read_yaml_chain(path, seen=())
        name = path.stem
    raw = apply_overrides(raw, overrides or [])
    raw.setdefault("name", name)
    _classes_from_folder(raw)
    return config_from_dict(raw)


def _classes_from_folder(raw: dict[str, Any]) -> None:
    """The folder dataset names its classes in classes.txt: data.num_classes defaults to their count."""
    data = raw.get("data")
    if not isinstance(data, dict) or data.get("dataset") != "folder" or "num_classes" in data or not data.get("root"):
        return
    classes = Path(str(data["root"])).expanduser() / "classes.txt"
    if classes.is_file():
        from scaleseg.data.datasets.folder import read_class_names

        data["num_classes"] = len(read_class_names(classes))


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """A copy of the nested dict `raw` with `dotted.key=value` overrides applied."""
    raw = copy.deepcopy(raw)
    for item in overrides:
        key, value = parse_override(item)
        _set_dotted(raw, key, value)
    return raw


def config_from_dict(raw: dict[str, Any]) -> Config:
    """Build and validate a Config from a nested plain dict (for example a checkpoint's copy)."""
    cfg = _build(Config, raw, prefix="")
    return cfg.validate()


def parse_override(item: str) -> tuple[str, Any]:
    """`model.backbone=resnet50` -> ("model.backbone", "resnet50"); the value is parsed as YAML."""
    if "=" not in item:
        raise ConfigError(f"override {item!r}: write it as dotted.key=value, e.g. train.iters=200")
    key, text = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {item!r}: the key before '=' is empty")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {item!r}: the value is not valid YAML ({exc.problem})") from None
    return key, value


def config_yaml(cfg: Config) -> str:
    """The config as the YAML text of a file `load_config` reads back."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(config_yaml(cfg))


def _read_yaml_chain(path: Path, seen: tuple[Path, ...]) -> dict[str, Any]:
    path = path.expanduser()
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    resolved = path.resolve()
    if resolved in seen:
        chain = " -> ".join(str(p) for p in (*seen, resolved))
        raise ConfigError(f"config file {str(path)!r}: _base_ files form a cycle ({chain})")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {str(path)!r}: the top level must be a mapping of sections")
    bases = raw.pop("_base_", [])
    if isinstance(bases, str):
        bases = [bases]
    merged: dict[str, Any] = {}
    for base in bases:
        _deep_merge(merged, _read_yaml_chain(path.parent / base, seen + (resolved,)))
    _deep_merge(merged, raw)
    return merged


def _deep_merge(into: dict[str, Any], other: dict[str, Any]) -> None:
    for key, value in other.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _deep_merge(into[key], value)
        else:
            into[key] = value


def _set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {key}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = value


def _build(cls: type, raw: Any, prefix: str, base: Any = None) -> Any:
    """An instance of the dataclass `cls`: `base` (default: `cls()`) with the keys of `raw` replaced. A
    nested section starts from `base`'s own value, so `optim.groups.backbone.momentum=0.5` keeps that
    group's default lr_mult."""
    where = prefix or "the config"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a mapping of keys, got {type(raw).__name__} {raw!r}")
    base = cls() if base is None else base
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            if dotted in RENAMED_KEYS:
                raise ConfigError(f"config key {dotted!r} is now {RENAMED_KEYS[dotted]!r}; rename it")
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean {(prefix + '.' if prefix else '') + close[0]!r}?)" if close else ""
            raise ConfigError(f"unknown config key {dotted!r}{hint}; allowed in {where}: {', '.join(names)}")
        if dataclasses.is_dataclass(hints[key]):
            kwargs[key] = _build(hints[key], value if value is not None else {}, dotted, getattr(base, key))
        else:
            kwargs[key] = _coerce(hints[key], value, dotted)
    return dataclasses.replace(base, **kwargs)


# keys of earlier versions -> their names now (configs are refused with the new name; the configs saved in
# older checkpoints are carried over by `migrate_renamed_keys`)
RENAMED_KEYS = {
    "optim.backbone_lr_mult": "optim.groups.backbone.lr_mult",
    "model.head.embedding.embedding_lr_mult": "optim.groups.class_embeddings.lr_mult",
    "model.head.embedding.embedding_momentum": "optim.groups.class_embeddings.momentum",
    "model.head.embedding.embedding_poly_power": "optim.groups.class_embeddings.poly_power",
}


def migrate_renamed_keys(raw: dict[str, Any]) -> dict[str, Any]:
    """A copy of a nested config dict with the keys of `RENAMED_KEYS` moved to their new names."""
    raw = copy.deepcopy(raw)
    for old, new in RENAMED_KEYS.items():
        *parents, leaf = old.split(".")
        node = raw
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and leaf in node:
            _set_dotted(raw, new, node.pop(leaf))
    return raw


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key} = {value!r}: expected {_describe(tp)}")
    if origin is Literal:
        if isinstance(value, bool) or value not in args:  # True == 1 must not pass for Literal[1, ...]
            allowed = ", ".join(repr(a) for a in args)
            raise ConfigError(f"{key} = {value!r} is not allowed; choose one of {allowed}")
        return value
    if origin is tuple:
        if tp is Size or (len(args) == 2 and args[0] is int and args[1] is int):
            if isinstance(value, int) and not isinstance(value, bool):
                value = [value, value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} = {value!r}: expected a list ({_describe(tp)})")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v, f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{key} = {list(value)!r}: expected {len(args)} values ({_describe(tp)})")
        return tuple(_coerce(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} = {value!r}: expected true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} = {value!r}: expected an integer")
        if not -MAX_INT <= value <= MAX_INT:  # every integer ends up in a C long somewhere (torch, numpy)
            raise ConfigError(f"{key} = {value}: too large (at most {MAX_INT:,} in magnitude)")
        return value
    if tp is float:
        if isinstance(value, str):  # PyYAML reads 1e-3 (no dot) as a string, and "nan" too
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} = {value!r}: expected a number")
        try:
            value = float(value)
        except OverflowError:  # an integer beyond the float range
            value = math.inf
        # checked here, where every float of a file or an override passes, so that no float key is missed:
        # NaN passes every `<` and `<=` of the range checks below, and inf passes "> 0"
        if not math.isfinite(value):
            raise ConfigError(f"{key} = {value}: must be a finite number (not NaN or infinity)")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} = {value!r}: expected a string")
        return value
    raise TypeError(f"config type {tp!r} of {key} is not supported")  # a bug in this file, not user input


def _describe(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in args)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"list of {_describe(args[0])}"
        return "[" + ", ".join(_describe(a) for a in args) + "]"
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _to_plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    return value


def _positive(value: int, key: str) -> None:
    if value <= 0:
        raise ConfigError(f"{key} = {value}: must be > 0")


def _finite(value: float, key: str) -> None:
    if not math.isfinite(value):
        raise ConfigError(f"{key} = {value}: must be a finite number")


def _seed(value: int, key: str) -> None:
    if not 0 <= value <= MAX_SEED:
        raise ConfigError(f"{key} = {value}: must be between 0 and {MAX_SEED} (a 32-bit seed)")


def _positive_size(value: Size, key: str) -> None:
    if min(value) <= 0 or max(value) > 16384:
        raise ConfigError(f"{key} = {list(value)}: height and width must be between 1 and 16384")


def _in_range(value: float, low: float, high: float, key: str, low_open: bool = False, high_open: bool = False) -> None:
    bad_low = value <= low if low_open else value < low
    bad_high = value >= high if high_open else value > high
    if bad_low or bad_high:
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ConfigError(f"{key} = {value}: must be in {interval}")
