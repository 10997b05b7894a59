"""HRNetV2 backbones: official key/shape compatibility, output shapes, weight loading.

The expected state dicts of the official HRNet code (HRNet-Image-Classification
``cls_hrnet.py``) are generated here from the published structure, not from scaleseg's
``hrnet.py``, and the generator is checked against the documented parameter counts of the
classification models (HRNet-W18-C 21.3M, W32-C 41.2M, W48-C 77.5M) before being compared
with scaleseg's modules.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from scaleseg.errors import CheckpointError
from scaleseg.models.backbones import BACKBONES, build_backbone
from scaleseg.models.backbones.hrnet import HRNet

# parameter/buffer name -> shape
Shapes = dict[str, tuple[int, ...]]

# ---------------------------------------------------------------------------------------
# Independent reference: the official HRNet state dict, classification head included.
# ---------------------------------------------------------------------------------------

HEAD_PREFIXES = ("incre_modules.", "downsamp_modules.", "final_layer.", "classifier.")


def _conv(keys: Shapes, name: str, out_ch: int, in_ch: int, k: int, bias: bool = False) -> None:
    keys[f"{name}.weight"] = (out_ch, in_ch, k, k)
    if bias:
        keys[f"{name}.bias"] = (out_ch,)


def _bn(keys: Shapes, name: str, ch: int) -> None:
    for suffix in ("weight", "bias", "running_mean", "running_var"):
        keys[f"{name}.{suffix}"] = (ch,)
    keys[f"{name}.num_batches_tracked"] = ()


def _bottleneck(keys: Shapes, p: str, in_ch: int, planes: int) -> int:
    """Bottleneck block ``p`` (1x1, 3x3, 1x1 x4; projection if the width changes)."""
    _conv(keys, f"{p}.conv1", planes, in_ch, 1)
    _bn(keys, f"{p}.bn1", planes)
    _conv(keys, f"{p}.conv2", planes, planes, 3)
    _bn(keys, f"{p}.bn2", planes)
    _conv(keys, f"{p}.conv3", 4 * planes, planes, 1)
    _bn(keys, f"{p}.bn3", 4 * planes)
    if in_ch != 4 * planes:
        _conv(keys, f"{p}.downsample.0", 4 * planes, in_ch, 1)
        _bn(keys, f"{p}.downsample.1", 4 * planes)
    return 4 * planes


def _transition(keys: Shapes, p: str, pre: list[int], cur: list[int]) -> None:
    for i, c in enumerate(cur):
        if i < len(pre):
            if pre[i] != c:
                _conv(keys, f"{p}.{i}.0", c, pre[i], 3)
                _bn(keys, f"{p}.{i}.1", c)
        else:
            steps = i + 1 - len(pre)
            for s in range(steps):
                out = c if s == steps - 1 else pre[-1]
                _conv(keys, f"{p}.{i}.{s}.0", out, pre[-1], 3)
                _bn(keys, f"{p}.{i}.{s}.1", out)


def _module(keys: Shapes, p: str, widths: list[int], blocks: int) -> None:
    for b, c in enumerate(widths):
        for k in range(blocks):
            q = f"{p}.branches.{b}.{k}"
            _conv(keys, f"{q}.conv1", c, c, 3)
            _bn(keys, f"{q}.bn1", c)
            _conv(keys, f"{q}.conv2", c, c, 3)
            _bn(keys, f"{q}.bn2", c)
    for i, c_i in enumerate(widths):
        for j, c_j in enumerate(widths):
            q = f"{p}.fuse_layers.{i}.{j}"
            if j > i:
                _conv(keys, f"{q}.0", c_i, c_j, 1)
                _bn(keys, f"{q}.1", c_i)
            elif j < i:
                for s in range(i - j):
                    out = c_i if s == i - j - 1 else c_j
                    _conv(keys, f"{q}.{s}.0", out, c_j, 3)
                    _bn(keys, f"{q}.{s}.1", out)


def official_hrnet_shapes(
    widths: tuple[int, int, int, int],
    stem: int = 64,
    layer1_planes: int = 64,
    layer1_blocks: int = 4,
    modules: tuple[int, int, int] = (1, 4, 3),
    blocks: int = 4,
    head: bool = True,
) -> Shapes:
    """Keys/shapes of the official HighResolutionNet (with its classification head)."""
    keys: Shapes = {}
    _conv(keys, "conv1", stem, 3, 3)
    _bn(keys, "bn1", stem)
    _conv(keys, "conv2", stem, stem, 3)
    _bn(keys, "bn2", stem)
    in_ch = stem
    for b in range(layer1_blocks):
        in_ch = _bottleneck(keys, f"layer1.{b}", in_ch, layer1_planes)
    pre = [in_ch]
    for n, stage in enumerate((2, 3, 4)):
        cur = list(widths[:stage])
        _transition(keys, f"transition{stage - 1}", pre, cur)
        for m in range(modules[n]):
            _module(keys, f"stage{stage}.{m}", cur, blocks)
        pre = cur
    if head:
        head_planes = (32, 64, 128, 256)
        for i, c in enumerate(widths):
            _bottleneck(keys, f"incre_modules.{i}.0", c, head_planes[i])
        for i in range(3):
            _conv(keys, f"downsamp_modules.{i}.0", 4 * head_planes[i + 1], 4 * head_planes[i], 3,
                  bias=True)
            _bn(keys, f"downsamp_modules.{i}.1", 4 * head_planes[i + 1])
        _conv(keys, "final_layer.0", 2048, 1024, 1, bias=True)
        _bn(keys, "final_layer.1", 2048)
        keys["classifier.weight"] = (1000, 2048)
        keys["classifier.bias"] = (1000,)
    return keys


def _w(width: int) -> tuple[int, int, int, int]:
    return (width, 2 * width, 4 * width, 8 * width)


# name -> (full official shapes, documented classification-model params in millions or None)
REFERENCE = {
    "hrnetv2_w18": (official_hrnet_shapes(_w(18)), 21.3),
    "hrnetv2_w32": (official_hrnet_shapes(_w(32)), 41.2),
    "hrnetv2_w48": (official_hrnet_shapes(_w(48)), 77.5),
    "hrnet_tiny": (
        official_hrnet_shapes((8, 16, 32, 64), stem=16, layer1_planes=16, layer1_blocks=1,
                              modules=(1, 1, 1), blocks=1, head=False),
        None,
    ),
}
WIDTHS = {"hrnetv2_w18": _w(18), "hrnetv2_w32": _w(32), "hrnetv2_w48": _w(48),
          "hrnet_tiny": (8, 16, 32, 64)}
BUFFER_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")


def backbone_shapes(name: str) -> Shapes:
    """Reference shapes without the classification head."""
    return {k: s for k, s in REFERENCE[name][0].items() if not k.startswith(HEAD_PREFIXES)}


def fake_checkpoint(name: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random state dict with the official backbone keys plus a few head keys."""
    g = torch.Generator().manual_seed(seed)
    shapes = dict(backbone_shapes(name))
    w = WIDTHS[name][0]
    shapes.update({"incre_modules.0.0.conv1.weight": (32, w, 1, 1),
                   "final_layer.0.weight": (2048, 1024, 1, 1),
                   "classifier.weight": (1000, 2048)})
    out = {}
    for k, shape in shapes.items():
        if k.endswith("num_batches_tracked"):
            out[k] = torch.randint(1, 10_000, (), generator=g)
        else:
            out[k] = torch.randn(shape, generator=g)
    return out


@functools.lru_cache(maxsize=None)
def cached_model(name: str) -> nn.Module:
    """Eval-mode backbone, shared by read-only tests."""
    return BACKBONES[name](output_stride=32).eval()


# ---------------------------------------------------------------------------------------
# Parameter names, shapes and counts
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["hrnetv2_w18", "hrnetv2_w32", "hrnetv2_w48"])
def test_reference_matches_documented_totals(name: str) -> None:
    full, millions = REFERENCE[name]
    total = sum(math.prod(s) for k, s in full.items() if not k.endswith(BUFFER_SUFFIXES))
    assert round(total / 1e6, 1) == millions


@pytest.mark.parametrize("name", list(REFERENCE))
def test_state_dict_keys_and_shapes_match_official(name: str) -> None:
    ours = {k: tuple(v.shape) for k, v in cached_model(name).state_dict().items()}
    expected = backbone_shapes(name)
    assert set(ours) - set(expected) == set(), "keys the official code does not have"
    assert set(expected) - set(ours) == set(), "official keys we lack"
    assert ours == expected


# Written by hand from the structure (not generated): W48 key -> shape.
W48_LITERAL = {
    "conv1.weight": (64, 3, 3, 3),
    "conv2.weight": (64, 64, 3, 3),
    "layer1.0.downsample.0.weight": (256, 64, 1, 1),
    "layer1.0.downsample.1.running_var": (256,),
    "layer1.3.conv3.weight": (256, 64, 1, 1),
    "transition1.0.0.weight": (48, 256, 3, 3),
    "transition1.1.0.0.weight": (96, 256, 3, 3),
    "transition1.1.0.1.bias": (96,),
    "transition2.2.0.0.weight": (192, 96, 3, 3),
    "transition3.3.0.0.weight": (384, 192, 3, 3),
    "stage2.0.fuse_layers.0.1.0.weight": (48, 96, 1, 1),
    "stage2.0.fuse_layers.1.0.0.0.weight": (96, 48, 3, 3),
    "stage3.0.branches.2.3.conv2.weight": (192, 192, 3, 3),
    "stage3.3.fuse_layers.0.2.1.weight": (48,),
    "stage4.0.fuse_layers.3.0.2.1.running_var": (384,),
    "stage4.2.fuse_layers.3.0.0.0.weight": (48, 48, 3, 3),
    "stage4.2.fuse_layers.3.0.2.0.weight": (384, 48, 3, 3),
    "stage4.2.fuse_layers.3.2.0.0.weight": (384, 192, 3, 3),
    "stage4.2.fuse_layers.0.3.0.weight": (48, 384, 1, 1),
    "stage4.2.branches.3.3.bn2.weight": (384,),
}
W48_ABSENT = [
    "transition2.0.0.weight",  # unchanged branches have no transition
    "transition3.2.0.weight",
    "stage4.0.fuse_layers.1.1.0.weight",  # j == i is the identity
    "stage4.0.branches.0.0.downsample.0.weight",  # equal widths: no projection
    "stage4.3.fuse_layers.0.1.0.weight",  # stage 4 has 3 modules
    "stage3.4.branches.0.0.conv1.weight",  # stage 3 has 4 modules
    "classifier.weight",
]


def test_w48_literal_keys() -> None:
    state = cached_model("hrnetv2_w48").state_dict()
    for key, shape in W48_LITERAL.items():
        assert tuple(state[key].shape) == shape, key
    for key in W48_ABSENT:
        assert key not in state, key


@pytest.mark.parametrize("name", list(REFERENCE))
def test_attributes(name: str) -> None:
    model = cached_model(name)
    widths = WIDTHS[name]
    assert model.arch == name
    assert tuple(model.feature_info.channels()) == widths
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    assert model.output_stride == 32
    assert model.pretrained_ignore_prefixes == HEAD_PREFIXES


# ---------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["hrnetv2_w18", "hrnet_tiny"])
@pytest.mark.parametrize("hw", [(64, 64), (67, 45)])
def test_forward_shapes(name: str, hw: tuple[int, int]) -> None:
    h, w = hw
    model = cached_model(name)
    x = torch.randn(1, 3, h, w)
    with torch.no_grad():
        outs = model(x)
    assert len(outs) == 4
    for out, ch, stride in zip(outs, WIDTHS[name], (4, 8, 16, 32)):
        assert out.shape == (1, ch, math.ceil(h / stride), math.ceil(w / stride))
        assert torch.isfinite(out).all()
        assert (out >= 0).all()  # every module output is ReLU(sum)


# A functional re-statement of the official forward pass (cls_hrnet.py / seg_hrnet.py), run
# on the weights of a state dict by key name; BatchNorm in eval mode.


def _ref_conv(s: dict, p: str, x: torch.Tensor, stride: int = 1) -> torch.Tensor:
    w = s[f"{p}.weight"]
    return F.conv2d(x, w, stride=stride, padding=w.shape[-1] // 2)


def _ref_bn(s: dict, p: str, x: torch.Tensor) -> torch.Tensor:
    return F.batch_norm(x, s[f"{p}.running_mean"], s[f"{p}.running_var"], s[f"{p}.weight"],
                        s[f"{p}.bias"], training=False, eps=1e-5)


def _ref_conv_bn(s: dict, p: str, x: torch.Tensor, stride: int = 1) -> torch.Tensor:
    return _ref_bn(s, f"{p}.1", _ref_conv(s, f"{p}.0", x, stride))


def _ref_bottleneck(s: dict, p: str, x: torch.Tensor) -> torch.Tensor:
    y = F.relu(_ref_bn(s, f"{p}.bn1", _ref_conv(s, f"{p}.conv1", x)))
    y = F.relu(_ref_bn(s, f"{p}.bn2", _ref_conv(s, f"{p}.conv2", y)))
    y = _ref_bn(s, f"{p}.bn3", _ref_conv(s, f"{p}.conv3", y))
    shortcut = _ref_conv_bn(s, f"{p}.downsample", x) if f"{p}.downsample.0.weight" in s else x
    return F.relu(y + shortcut)


def _ref_basic(s: dict, p: str, x: torch.Tensor) -> torch.Tensor:
    y = F.relu(_ref_bn(s, f"{p}.bn1", _ref_conv(s, f"{p}.conv1", x)))
    return F.relu(_ref_bn(s, f"{p}.bn2", _ref_conv(s, f"{p}.conv2", y)) + x)


def _ref_transition(s: dict, p: str, xs: list, n_cur: int) -> list:
    out = []
    for i in range(n_cur):
        if i < len(xs):
            has_conv = f"{p}.{i}.0.weight" in s
            out.append(F.relu(_ref_conv_bn(s, f"{p}.{i}", xs[i])) if has_conv else xs[i])
        else:
            y = xs[-1]
            for step in range(i + 1 - len(xs)):
                y = F.relu(_ref_conv_bn(s, f"{p}.{i}.{step}", y, stride=2))
            out.append(y)
    return out


def _ref_module(s: dict, p: str, xs: list, blocks: int) -> list:
    xs = list(xs)
    for b in range(len(xs)):
        for k in range(blocks):
            xs[b] = _ref_basic(s, f"{p}.branches.{b}.{k}", xs[b])
    out = []
    for i in range(len(xs)):
        total = torch.zeros_like(xs[i])
        for j in range(len(xs)):
            if j > i:
                y = _ref_conv_bn(s, f"{p}.fuse_layers.{i}.{j}", xs[j])
                y = F.interpolate(y, size=xs[i].shape[-2:], mode="bilinear", align_corners=False)
            elif j == i:
                y = xs[j]
            else:
                y = xs[j]
                for step in range(i - j):
                    y = _ref_conv_bn(s, f"{p}.fuse_layers.{i}.{j}.{step}", y, stride=2)
                    if step < i - j - 1:
                        y = F.relu(y)
            total = total + y
        out.append(F.relu(total))
    return out


def official_forward(s: dict, x: torch.Tensor, layer1_blocks: int, modules: tuple[int, ...],
                     blocks: int) -> list:
    x = F.relu(_ref_bn(s, "bn1", _ref_conv(s, "conv1", x, stride=2)))
    x = F.relu(_ref_bn(s, "bn2", _ref_conv(s, "conv2", x, stride=2)))
    for b in range(layer1_blocks):
        x = _ref_bottleneck(s, f"layer1.{b}", x)
    xs = [x]
    for n, stage in enumerate((2, 3, 4)):
        xs = _ref_transition(s, f"transition{stage - 1}", xs, stage)
        for m in range(modules[n]):
            xs = _ref_module(s, f"stage{stage}.{m}", xs, blocks)
    return xs


@pytest.mark.parametrize(
    "stem, layer1_planes, layer1_blocks, modules, blocks",
    [(16, 16, 1, (1, 1, 1), 1),  # hrnet_tiny
     (64, 16, 2, (1, 2, 2), 2)],  # no layer1 projection, several modules and blocks
)
def test_forward_equals_official_forward(
    stem: int, layer1_planes: int, layer1_blocks: int, modules: tuple[int, ...], blocks: int
) -> None:
    widths = (8, 16, 32, 64)
    shapes = official_hrnet_shapes(widths, stem, layer1_planes, layer1_blocks, modules, blocks,
                                   head=False)
    g = torch.Generator().manual_seed(0)
    state = {}
    for k, shape in shapes.items():
        if k.endswith("num_batches_tracked"):
            state[k] = torch.tensor(1)
        elif k.endswith("running_var"):
            state[k] = torch.rand(shape, generator=g) + 0.5
        else:
            std = 1.0 if len(shape) == 1 else math.sqrt(1 / math.prod(shape[1:]))
            state[k] = torch.randn(shape, generator=g) * std
    model = HRNet(widths, stem_width=stem, layer1_planes=layer1_planes,
                  layer1_blocks=layer1_blocks, modules_per_stage=modules,
                  blocks_per_branch=blocks).eval()
    model.load_state_dict(state)
    x = torch.randn(2, 3, 67, 45, generator=g)
    with torch.no_grad():
        ours = model(x)
        expected = official_forward(state, x, layer1_blocks, modules, blocks)
    assert len(ours) == len(expected) == 4
    for a, b in zip(ours, expected):
        assert a.abs().max() > 0
        torch.testing.assert_close(a, b)


def test_tiny_forward_backward_batch_2() -> None:
    torch.manual_seed(0)
    model = build_backbone("hrnet_tiny", output_stride=32).train()
    outs = model(torch.randn(2, 3, 48, 40))
    assert [o.shape[-2:] for o in outs] == [(12, 10), (6, 5), (3, 3), (2, 2)]
    sum(o.mean() for o in outs).backward()
    for k, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), k
    assert model.conv1.weight.grad.abs().sum() > 0


def test_every_branch_reaches_every_output() -> None:
    """The fusion mixes branches: the stride-4 output depends on the stride-32 branch."""
    torch.manual_seed(0)
    model = build_backbone("hrnet_tiny", output_stride=32).eval()
    fuse = model.stage4[0].fuse_layers[0][3]  # stride 32 -> stride 4
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        before = model(x)[0]
        fuse[0].weight.mul_(2)
        after = model(x)[0]
    assert not torch.allclose(before, after)


def test_init_scheme() -> None:
    model = cached_model("hrnetv2_w18")
    assert all(torch.all(m.weight == 1) and torch.all(m.bias == 0)
               for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    w = model.stage3[0].branches[1][0].conv1.weight  # kaiming fan_out relu: sqrt(2 / (36 * 9))
    assert w.std().item() == pytest.approx(math.sqrt(2 / (36 * 9)), rel=0.1)


# ---------------------------------------------------------------------------------------
# Construction options
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["hrnet_tiny", "hrnetv2_w18"])
def test_bn_momentum_reaches_every_batchnorm(name: str) -> None:
    model = build_backbone(name, output_stride=32, bn_momentum=0.01)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == sum(k.endswith("running_mean") for k in backbone_shapes(name))
    assert all(m.momentum == 0.01 for m in bns)
    default = cached_model(name)
    assert {m.momentum for m in default.modules() if isinstance(m, nn.BatchNorm2d)} == {0.1}


def test_group_norm_layer() -> None:
    model = build_backbone("hrnet_tiny", output_stride=32,
                           norm_layer=lambda c: nn.GroupNorm(8, c), bn_momentum=0.01)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert any(isinstance(m, nn.GroupNorm) for m in model.modules())
    outs = model(torch.randn(1, 3, 40, 40))
    assert [o.shape[-2:] for o in outs] == [(10, 10), (5, 5), (3, 3), (2, 2)]


@pytest.mark.parametrize("output_stride", [8, 16])
@pytest.mark.parametrize("name", ["hrnet_tiny", "hrnetv2_w48"])
def test_output_stride_other_than_32_raises(name: str, output_stride: int) -> None:
    with pytest.raises(ValueError, match="HRNet has fixed strides 4, 8, 16 and 32") as err:
        build_backbone(name, output_stride=output_stride)
    assert f"got {output_stride}" in str(err.value) and "output_stride=32" in str(err.value)


def test_build_backbone_default_output_stride_raises() -> None:
    """build_backbone defaults to output stride 16, which HRNet does not have."""
    with pytest.raises(ValueError, match="output_stride must be 32"):
        build_backbone("hrnet_tiny")


# ---------------------------------------------------------------------------------------
# Loading official files
# ---------------------------------------------------------------------------------------


def assert_loaded(model: nn.Module, ckpt: dict[str, torch.Tensor]) -> None:
    own = model.state_dict()
    assert own, "empty state dict"
    for k, v in own.items():
        assert torch.equal(v, ckpt[k]), k


def test_load_fake_official_classification_file(tmp_path) -> None:
    ckpt = fake_checkpoint("hrnetv2_w18")
    path = tmp_path / "hrnetv2_w18_imagenet_pretrained.pth"
    torch.save(ckpt, path)
    model = build_backbone("hrnetv2_w18", output_stride=32, pretrained=path)
    assert_loaded(model, ckpt)
    report = model.pretrained_report
    assert sorted(report.ignored) == [
        "classifier.weight", "final_layer.0.weight", "incre_modules.0.0.conv1.weight"
    ]
    assert report.missing == [] and report.unexpected == []
    assert report.loaded == len(model.state_dict())
    assert report.path == str(path)


def test_load_data_parallel_prefix_nested_in_state_dict(tmp_path) -> None:
    ckpt = fake_checkpoint("hrnet_tiny", seed=1)
    path = tmp_path / "dp.pth"
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in ckpt.items()}}, path)
    model = build_backbone("hrnet_tiny", output_stride=32, pretrained=path)
    assert_loaded(model, ckpt)
    report = model.pretrained_report
    assert report.unexpected == [] and report.missing == [] and len(report.ignored) == 3


def test_w32_file_into_w18_raises(tmp_path) -> None:
    path = tmp_path / "hrnetv2_w32_imagenet_pretrained.pth"
    torch.save(fake_checkpoint("hrnetv2_w32"), path)
    with pytest.raises(CheckpointError) as err:
        build_backbone("hrnetv2_w18", output_stride=32, pretrained=path)
    msg = str(err.value)
    assert str(path) in msg and "another architecture" in msg and "hrnetv2_w18" in msg
