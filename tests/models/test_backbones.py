"""Backbones: torchvision key/shape compatibility, output strides, dilation, weight loading.

The expected torchvision state dicts are generated here from the published architecture
descriptions (not from scaleseg's code) and checked against torchvision's documented
parameter counts before being compared with scaleseg's modules.
"""

from __future__ import annotations

import functools
import logging
import math

import pytest
import torch
from torch import nn

from scaleseg.errors import CheckpointError
from scaleseg.models.backbones import BACKBONES, LoadReport, build_backbone, load_pretrained
from scaleseg.models.backbones.mobilenetv2 import MobileNetV2
from scaleseg.models.backbones.resnet import ResNet, resnet18

# parameter/buffer name -> shape
Shapes = dict[str, tuple[int, ...]]

# ---------------------------------------------------------------------------------------
# Independent reference: torchvision's state-dict keys and shapes, classifier included.
# ---------------------------------------------------------------------------------------


def _conv(keys: Shapes, name: str, out_ch: int, in_ch_per_group: int, k: int) -> None:
    keys[f"{name}.weight"] = (out_ch, in_ch_per_group, k, k)


def _bn(keys: Shapes, name: str, ch: int) -> None:
    for suffix in ("weight", "bias", "running_mean", "running_var"):
        keys[f"{name}.{suffix}"] = (ch,)
    keys[f"{name}.num_batches_tracked"] = ()


def tv_resnet_shapes(
    bottleneck: bool,
    layers: list[int],
    widths: tuple[int, ...] = (64, 128, 256, 512),
    stem: int = 64,
    num_classes: int = 1000,
) -> Shapes:
    """torchvision ResNet: 7x7 stem; v1.5 blocks; projection shortcut where shape changes."""
    keys: Shapes = {}
    _conv(keys, "conv1", stem, 3, 7)
    _bn(keys, "bn1", stem)
    in_ch = stem
    for stage, (planes, blocks) in enumerate(zip(widths, layers), start=1):
        out_ch = planes * (4 if bottleneck else 1)
        for b in range(blocks):
            p = f"layer{stage}.{b}"
            if bottleneck:
                _conv(keys, f"{p}.conv1", planes, in_ch, 1)
                _bn(keys, f"{p}.bn1", planes)
                _conv(keys, f"{p}.conv2", planes, planes, 3)
                _bn(keys, f"{p}.bn2", planes)
                _conv(keys, f"{p}.conv3", out_ch, planes, 1)
                _bn(keys, f"{p}.bn3", out_ch)
            else:
                _conv(keys, f"{p}.conv1", planes, in_ch, 3)
                _bn(keys, f"{p}.bn1", planes)
                _conv(keys, f"{p}.conv2", planes, planes, 3)
                _bn(keys, f"{p}.bn2", planes)
            strided = b == 0 and stage > 1
            if b == 0 and (strided or in_ch != out_ch):
                _conv(keys, f"{p}.downsample.0", out_ch, in_ch, 1)
                _bn(keys, f"{p}.downsample.1", out_ch)
            in_ch = out_ch
    keys["fc.weight"] = (num_classes, in_ch)
    keys["fc.bias"] = (num_classes,)
    return keys


MNV2_SETTING = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]


def tv_mobilenet_v2_shapes(num_classes: int = 1000) -> Shapes:
    """torchvision MobileNetV2 (width 1.0): stem 32, 17 inverted residuals, 1x1 to 1280."""
    keys: Shapes = {}
    _conv(keys, "features.0.0", 32, 3, 3)
    _bn(keys, "features.0.1", 32)
    in_ch, idx = 32, 1
    for t, c, n, _ in MNV2_SETTING:
        for _ in range(n):
            hidden = in_ch * t
            p = f"features.{idx}.conv"
            if t == 1:
                _conv(keys, f"{p}.0.0", hidden, 1, 3)  # depthwise
                _bn(keys, f"{p}.0.1", hidden)
                _conv(keys, f"{p}.1", c, hidden, 1)
                _bn(keys, f"{p}.2", c)
            else:
                _conv(keys, f"{p}.0.0", hidden, in_ch, 1)
                _bn(keys, f"{p}.0.1", hidden)
                _conv(keys, f"{p}.1.0", hidden, 1, 3)  # depthwise
                _bn(keys, f"{p}.1.1", hidden)
                _conv(keys, f"{p}.2", c, hidden, 1)
                _bn(keys, f"{p}.3", c)
            in_ch, idx = c, idx + 1
    _conv(keys, "features.18.0", 1280, 320, 1)
    _bn(keys, "features.18.1", 1280)
    keys["classifier.1.weight"] = (num_classes, 1280)
    keys["classifier.1.bias"] = (num_classes,)
    return keys


# name -> (full torchvision shapes, classifier prefixes, documented total params or None)
REFERENCE = {
    "resnet18": (tv_resnet_shapes(False, [2, 2, 2, 2]), ("fc.",), 11_689_512),
    "resnet34": (tv_resnet_shapes(False, [3, 4, 6, 3]), ("fc.",), 21_797_672),
    "resnet50": (tv_resnet_shapes(True, [3, 4, 6, 3]), ("fc.",), 25_557_032),
    "resnet101": (tv_resnet_shapes(True, [3, 4, 23, 3]), ("fc.",), 44_549_160),
    "resnet_tiny": (
        tv_resnet_shapes(False, [1, 1, 1, 1], widths=(16, 32, 64, 128), stem=16),
        ("fc.",),
        None,
    ),
    "mobilenet_v2": (tv_mobilenet_v2_shapes(), ("features.18.", "classifier."), 3_504_872),
}
# (low_level_channels, out_channels)
CHANNELS = {
    "resnet18": (64, 512), "resnet34": (64, 512), "resnet50": (256, 2048),
    "resnet101": (256, 2048), "resnet_tiny": (16, 128), "mobilenet_v2": (24, 320),
}
NAMES = list(REFERENCE)
BUFFER_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")


def backbone_shapes(name: str) -> Shapes:
    """Reference shapes without the classification head."""
    full, head, _ = REFERENCE[name]
    return {k: s for k, s in full.items() if not k.startswith(head)}


def fake_checkpoint(name: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random state dict with torchvision's full key set (classifier included)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, shape in REFERENCE[name][0].items():
        if k.endswith("num_batches_tracked"):
            out[k] = torch.randint(1, 10_000, (), generator=g)
        else:
            out[k] = torch.randn(shape, generator=g)
    return out


@functools.lru_cache(maxsize=None)
def cached_model(name: str, output_stride: int) -> nn.Module:
    """Eval-mode backbone, shared by read-only tests."""
    return BACKBONES[name](output_stride=output_stride).eval()


# ---------------------------------------------------------------------------------------
# Parameter names, shapes and counts
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [n for n in NAMES if REFERENCE[n][2] is not None])
def test_reference_matches_documented_torchvision_totals(name: str) -> None:
    full, _, total = REFERENCE[name]
    params = [s for k, s in full.items() if not k.endswith(BUFFER_SUFFIXES)]
    assert sum(math.prod(s) for s in params) == total


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_keys_and_shapes_match_torchvision(name: str) -> None:
    ours = {k: tuple(v.shape) for k, v in cached_model(name, 16).state_dict().items()}
    expected = backbone_shapes(name)
    assert set(ours) - set(expected) == set(), "keys torchvision does not have"
    assert set(expected) - set(ours) == set(), "torchvision keys we lack"
    assert ours == expected


@pytest.mark.parametrize(
    "name, expected_params",
    [
        ("resnet18", 11_689_512 - (512 * 1000 + 1000)),
        ("resnet50", 25_557_032 - (2048 * 1000 + 1000)),
        ("resnet101", 44_549_160 - (2048 * 1000 + 1000)),
        ("mobilenet_v2", 3_504_872 - (320 * 1280 + 2 * 1280) - (1280 * 1000 + 1000)),
    ],
)
def test_parameter_count_is_torchvision_minus_classifier(name: str, expected_params: int) -> None:
    model = cached_model(name, 16)
    assert sum(p.numel() for p in model.parameters()) == expected_params


@pytest.mark.parametrize("name", NAMES)
def test_output_stride_does_not_change_parameter_shapes(name: str) -> None:
    shapes = {
        os_: {k: tuple(v.shape) for k, v in cached_model(name, os_).state_dict().items()}
        for os_ in (8, 16, 32)
    }
    assert shapes[8] == shapes[16] == shapes[32]


@pytest.mark.parametrize("name", NAMES)
def test_channel_attributes(name: str) -> None:
    model = cached_model(name, 8)
    channels = model.feature_info.channels()
    assert len(channels) == 4 and (channels[0], channels[-1]) == CHANNELS[name]
    assert model.feature_info.reduction() == [4, 8, 8, 8]  # dilated stages keep stride 8
    assert model.output_stride == 8


# ---------------------------------------------------------------------------------------
# Output shapes and dilation
# ---------------------------------------------------------------------------------------

# Big models get a smaller (still odd) input to keep the file fast.
INPUT_HW = {"resnet34": (45, 67), "resnet50": (45, 67), "resnet101": (33, 47)}


@pytest.mark.parametrize("output_stride", [8, 16, 32])
@pytest.mark.parametrize("name", NAMES)
def test_forward_shapes(name: str, output_stride: int) -> None:
    h, w = INPUT_HW.get(name, (97, 131))
    low_ch, out_ch = CHANNELS[name]
    model = cached_model(name, output_stride)
    with torch.no_grad():
        features = model(torch.randn(2, 3, h, w))
    low, out = features[0], features[-1]
    assert low.shape == (2, low_ch, math.ceil(h / 4), math.ceil(w / 4))
    assert out.shape == (2, out_ch, math.ceil(h / output_stride), math.ceil(w / output_stride))
    assert torch.isfinite(out).all()
    # every map as feature_info says: strides 4, 8, 16, 32, each capped at the output stride
    info = model.feature_info
    assert info.reduction() == [min(s, output_stride) for s in (4, 8, 16, 32)]
    for x, ch, red in zip(features, info.channels(), info.reduction(), strict=True):
        assert x.shape == (2, ch, math.ceil(h / red), math.ceil(w / red))


def test_forward_shapes_even_input() -> None:
    with torch.no_grad():
        low, *_, out = cached_model("mobilenet_v2", 16)(torch.randn(1, 3, 64, 96))
    assert low.shape == (1, 24, 16, 24) and out.shape == (1, 320, 4, 6)


# torchvision's replace_stride_with_dilation rule, per output stride: stage ->
# (stride of the first block, dilation of the conv that would be strided, later dilation).
# Bottleneck's only 3x3 conv is conv2; BasicBlock's strided conv is conv1, then conv2.
RESNET_DILATION = {
    32: {"layer2": (2, 1, 1), "layer3": (2, 1, 1), "layer4": (2, 1, 1)},
    16: {"layer2": (2, 1, 1), "layer3": (2, 1, 1), "layer4": (1, 1, 2)},
    8: {"layer2": (2, 1, 1), "layer3": (1, 1, 2), "layer4": (1, 2, 4)},
}


@pytest.mark.parametrize("output_stride", [8, 16, 32])
@pytest.mark.parametrize("name, conv3x3_names", [("resnet50", ["conv2"]),
                                                 ("resnet18", ["conv1", "conv2"])])
def test_resnet_dilation(name: str, conv3x3_names: list[str], output_stride: int) -> None:
    model = cached_model(name, output_stride)
    for stage, (first_stride, first_dil, later_dil) in RESNET_DILATION[output_stride].items():
        blocks = list(getattr(model, stage))
        assert blocks[0].downsample[0].stride == (first_stride, first_stride)
        for i, block in enumerate(blocks):
            for j, conv_name in enumerate(conv3x3_names):
                conv = getattr(block, conv_name)
                first = i == 0 and j == 0
                stride, dil = (first_stride, first_dil) if first else (1, later_dil)
                where = f"{stage}.{i}.{conv_name}"
                assert conv.kernel_size == (3, 3), where
                assert conv.dilation == (dil, dil), where
                assert conv.padding == (dil, dil), where
                assert conv.stride == (stride, stride), where


# torchvision's strided blocks are features.2, 4, 7 and 14. A stage that trades its stride for
# dilation keeps the previous dilation in its first block (as ResNet and the published
# DeepLabV3+/ESS MobileNetV2 do): feature index -> (depthwise stride, depthwise dilation).
MNV2_DILATION = {
    32: {**{i: (1, 1) for i in range(1, 18)}, 2: (2, 1), 4: (2, 1), 7: (2, 1), 14: (2, 1)},
    16: {**{i: (1, 1) for i in range(1, 15)}, 2: (2, 1), 4: (2, 1), 7: (2, 1),
         15: (1, 2), 16: (1, 2), 17: (1, 2)},
    8: {**{i: (1, 1) for i in range(1, 8)}, 2: (2, 1), 4: (2, 1),
        **{i: (1, 2) for i in range(8, 15)}, 15: (1, 4), 16: (1, 4), 17: (1, 4)},
}


@pytest.mark.parametrize("output_stride", [8, 16, 32])
def test_mobilenet_v2_dilation(output_stride: int) -> None:
    model = cached_model("mobilenet_v2", output_stride)
    assert sorted(MNV2_DILATION[output_stride]) == list(range(1, 18))
    for idx, (stride, dil) in MNV2_DILATION[output_stride].items():
        block = model.features[idx]
        dw = block.conv[0][0] if idx == 1 else block.conv[1][0]
        assert dw.groups == dw.in_channels == dw.out_channels
        assert dw.stride == (stride, stride), f"features.{idx}"
        assert dw.dilation == (dil, dil), f"features.{idx}"
        assert dw.padding == (dil, dil)


@pytest.mark.parametrize(
    "name, output_stride",
    [("resnet_tiny", 8), ("resnet_tiny", 16), ("resnet18", 8), ("resnet18", 16),
     ("resnet50", 8), ("mobilenet_v2", 8), ("mobilenet_v2", 16)],
)
def test_dilation_is_a_trous_equivalent_to_stride(name: str, output_stride: int) -> None:
    """Same weights: the dilated output, read every 32/OS pixels, equals the stride-32 output.

    This only holds if the removed strides are replaced by the right dilations (a model
    without dilation, or with it in the wrong blocks, sees other receptive fields).
    """
    torch.manual_seed(0)
    strided = BACKBONES[name](output_stride=32).eval()
    dilated = BACKBONES[name](output_stride=output_stride).eval()
    dilated.load_state_dict(strided.state_dict())
    x = torch.randn(1, 3, *INPUT_HW.get(name, (97, 131)))
    with torch.no_grad():
        low_s, *_, out_s = strided(x)
        low_d, *_, out_d = dilated(x)
    step = 32 // output_stride
    torch.testing.assert_close(low_d, low_s)
    sampled = out_d[..., ::step, ::step]
    assert sampled.shape == out_s.shape
    # Tolerance relative to the output's scale: MobileNetV2's randomly initialised
    # activations shrink through the blocks (eval-mode BN with unit running stats).
    torch.testing.assert_close(sampled, out_s, rtol=1e-4, atol=1e-4 * out_s.abs().max().item())


# ---------------------------------------------------------------------------------------
# Construction options
# ---------------------------------------------------------------------------------------


# resnet34/101 differ from resnet18/50 only in block counts; skipped to keep the file fast.
@pytest.mark.parametrize("name", ["resnet18", "resnet50", "resnet_tiny", "mobilenet_v2"])
def test_bn_momentum_reaches_every_batchnorm(name: str) -> None:
    model = build_backbone(name, bn_momentum=0.01)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == sum(k.endswith("running_mean") for k in backbone_shapes(name))
    assert all(m.momentum == 0.01 for m in bns)


def test_default_bn_momentum_is_untouched() -> None:
    model = build_backbone("resnet_tiny")
    assert {m.momentum for m in model.modules() if isinstance(m, nn.BatchNorm2d)} == {0.1}


@pytest.mark.parametrize("name", ["resnet_tiny", "mobilenet_v2"])
def test_group_norm_layer(name: str) -> None:
    model = build_backbone(name, norm_layer=lambda c: nn.GroupNorm(8, c), bn_momentum=0.01)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert any(isinstance(m, nn.GroupNorm) for m in model.modules())
    low, *_, out = model(torch.randn(1, 3, 40, 40))
    assert low.shape[-2:] == (10, 10) and out.shape[-2:] == (3, 3)


def test_init_matches_torchvision_scheme() -> None:
    model = resnet18()
    assert all(torch.all(m.weight == 1) and torch.all(m.bias == 0)
               for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    w = model.layer3[1].conv2.weight  # kaiming fan_out relu: std = sqrt(2 / (256 * 9))
    assert w.std().item() == pytest.approx(math.sqrt(2 / (256 * 9)), rel=0.05)


def test_unknown_backbone_lists_known_names() -> None:
    with pytest.raises(ValueError) as err:
        build_backbone("resnet152")
    for name in NAMES:
        assert name in str(err.value)


@pytest.mark.parametrize("output_stride", [4, 12, 64])
def test_bad_output_stride(output_stride: int) -> None:
    with pytest.raises(ValueError, match="output_stride"):
        build_backbone("resnet_tiny", output_stride=output_stride)
    with pytest.raises(ValueError, match="output_stride"):
        MobileNetV2(output_stride=output_stride)


def test_tiny_forward_backward_batch_8() -> None:
    torch.manual_seed(0)
    model = build_backbone("resnet_tiny").train()
    low, *_, out = model(torch.randn(8, 3, 128, 128))
    assert low.shape == (8, 16, 32, 32) and out.shape == (8, 128, 8, 8)
    (low.mean() + out.mean()).backward()
    for k, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), k
    assert model.conv1.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------
# load_pretrained
# ---------------------------------------------------------------------------------------


def assert_loaded(model: nn.Module, ckpt: dict[str, torch.Tensor]) -> None:
    own = model.state_dict()
    for k, v in own.items():
        assert torch.equal(v, ckpt[k]), k


@pytest.mark.parametrize("name, output_stride", [("resnet18", 8), ("resnet_tiny", 16),
                                                 ("mobilenet_v2", 8), ("mobilenet_v2", 32)])
def test_load_fake_torchvision_checkpoint(tmp_path, name: str, output_stride: int) -> None:
    ckpt = fake_checkpoint(name)
    path = tmp_path / f"{name}.pth"
    torch.save(ckpt, path)
    model = BACKBONES[name](output_stride=output_stride)
    report = load_pretrained(model, path)
    assert isinstance(report, LoadReport)
    assert_loaded(model, ckpt)
    head = REFERENCE[name][1]
    assert sorted(report.ignored) == sorted(k for k in ckpt if k.startswith(head))
    assert report.ignored  # the classifier is reported, not silently dropped
    assert report.missing == [] and report.unexpected == []
    assert report.loaded == len(model.state_dict())
    assert report.path == str(path)


def test_load_data_parallel_prefix_nested_in_state_dict(tmp_path) -> None:
    ckpt = fake_checkpoint("resnet18", seed=1)
    path = tmp_path / "dp.pth"
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in ckpt.items()}}, path)
    model = resnet18()
    report = load_pretrained(model, path)
    assert_loaded(model, ckpt)
    assert report.unexpected == [] and set(report.ignored) == {"fc.weight", "fc.bias"}


def test_load_nested_under_model(tmp_path) -> None:
    ckpt = fake_checkpoint("mobilenet_v2", seed=2)
    path = tmp_path / "m.pth"
    torch.save({"model": ckpt}, path)
    model = build_backbone("mobilenet_v2", pretrained=path)
    assert_loaded(model, ckpt)
    assert model.pretrained_report.loaded == len(model.state_dict())


def test_missing_file(tmp_path) -> None:
    path = tmp_path / "nope" / "resnet50.pth"
    with pytest.raises(CheckpointError, match="does not exist") as err:
        build_backbone("resnet_tiny", pretrained=str(path))
    assert str(path) in str(err.value)


def test_corrupt_file(tmp_path) -> None:
    path = tmp_path / "corrupt.pth"
    path.write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0))
                     .to(torch.uint8).numpy().tobytes())
    with pytest.raises(CheckpointError) as err:
        load_pretrained(resnet18(), path)
    assert str(path) in str(err.value)
    assert isinstance(err.value.__cause__, Exception)


def test_file_without_state_dict(tmp_path) -> None:
    path = tmp_path / "list.pth"
    torch.save({"epoch": 3, "lr": 0.1}, path)
    with pytest.raises(CheckpointError, match="not a state dict") as err:
        load_pretrained(resnet18(), path)
    assert str(path) in str(err.value)


def test_wrong_shape_names_key_and_shapes(tmp_path) -> None:
    ckpt = fake_checkpoint("resnet18")
    ckpt["layer2.0.conv1.weight"] = torch.randn(128, 64, 5, 5)
    path = tmp_path / "bad_shape.pth"
    torch.save(ckpt, path)
    with pytest.raises(CheckpointError) as err:
        load_pretrained(resnet18(), path)
    msg = str(err.value)
    assert str(path) in msg and "layer2.0.conv1.weight" in msg
    assert "(128, 64, 5, 5)" in msg and "(128, 64, 3, 3)" in msg


def test_checkpoint_of_another_architecture(tmp_path) -> None:
    path = tmp_path / "resnet18.pth"
    torch.save(fake_checkpoint("resnet18"), path)
    model = cached_model("resnet50", 16)
    before = model.conv1.weight.clone()
    with pytest.raises(CheckpointError) as err:
        load_pretrained(model, path)
    assert str(path) in str(err.value) and "another architecture" in str(err.value)
    assert torch.equal(model.conv1.weight, before)  # nothing was half-loaded


def test_checkpoint_sharing_no_key(tmp_path) -> None:
    path = tmp_path / "mnv2.pth"
    torch.save(fake_checkpoint("mobilenet_v2"), path)
    with pytest.raises(CheckpointError, match="not a resnet18 checkpoint") as err:
        build_backbone("resnet18", pretrained=path)
    assert str(path) in str(err.value)


def test_partial_checkpoint_warns_and_reports(tmp_path, caplog) -> None:
    ckpt = fake_checkpoint("resnet_tiny")
    del ckpt["layer4.0.conv2.weight"], ckpt["layer4.0.bn2.weight"]
    ckpt["extra.weight"] = torch.zeros(3)
    path = tmp_path / "partial.pth"
    torch.save(ckpt, path)
    with pytest.raises(CheckpointError, match="2 resnet_tiny keys are missing .*1 of its keys are unexpected"):
        build_backbone("resnet_tiny", pretrained=path)  # strict by default
    with caplog.at_level(logging.WARNING, logger="scaleseg"):
        model = build_backbone("resnet_tiny", pretrained=path, pretrained_strict=False)
    report = model.pretrained_report
    assert report.missing == ["layer4.0.conv2.weight", "layer4.0.bn2.weight"]
    assert report.unexpected == ["extra.weight"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("2 keys missing" in m and "layer4.0.conv2.weight" in m for m in warnings)
    assert any("1 keys unexpected" in m and "extra.weight" in m for m in warnings)
    assert torch.equal(model.conv1.weight, ckpt["conv1.weight"])


def test_old_checkpoint_without_num_batches_tracked_is_complete(tmp_path, caplog) -> None:
    """Pre-2018 torchvision files have no num_batches_tracked; that is not 'missing'."""
    ckpt = {k: v for k, v in fake_checkpoint("resnet18").items()
            if not k.endswith("num_batches_tracked")}
    path = tmp_path / "old.pth"
    torch.save(ckpt, path)
    with caplog.at_level(logging.WARNING, logger="scaleseg"):
        model = build_backbone("resnet18", pretrained=path)
    assert model.pretrained_report.missing == []
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert torch.equal(model.layer1[0].bn1.running_var, ckpt["layer1.0.bn1.running_var"])


def test_no_pretrained_leaves_report_none() -> None:
    assert build_backbone("resnet_tiny").pretrained_report is None
    assert isinstance(build_backbone("resnet_tiny"), ResNet)
