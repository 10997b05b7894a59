"""model.norm = group: Group Normalization in backbone, decoder and head (ESS Table 5, "GN").

References: the same configuration built with BatchNorm (which norm layers exist, where, how wide), each
image run alone (batch independence), a hand-made torchvision-style BN state dict, the config messages.
"""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch
from torch import nn

from scaleseg.config import ModelConfig, load_config
from scaleseg.engine.trainer import Trainer
from scaleseg.errors import ConfigError
from scaleseg.models import build_model
from scaleseg.models.backbones import build_backbone
from scaleseg.models.heads.pyramid import conv1d_norm_relu
from scaleseg.models.norm import GroupNormFactory, make_norm, norm_1d

BN_STATISTICS = ("running_mean", "running_var", "num_batches_tracked")


def is_norm(m: nn.Module) -> bool:
    return isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm))


def norms(module: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in module.named_modules() if is_norm(m)}


def model_config(backbone: str, structure: str = "single", scorer: str = "linear", norm: str = "group",
                 group_norm_channels: int = 16, **decoder) -> ModelConfig:
    """A small model; HRNet (and a ResNet with hrnet_fusion) at output stride 32."""
    cfg = ModelConfig(backbone=backbone, norm=norm, group_norm_channels=group_norm_channels)
    for key, value in decoder.items():
        setattr(cfg.decoder, key, value)
    if backbone.startswith("hrnet"):
        cfg.decoder.type = "hrnet_fusion"
    if cfg.decoder.type == "hrnet_fusion":
        cfg.output_stride = 32
    cfg.head.structure, cfg.head.scorer = structure, scorer
    cfg.head.pyramid.unity_channels, cfg.head.pyramid.semantic_channels = 16, 32
    cfg.head.pyramid.strides = (16, 8, 4)
    cfg.head.embedding.embed_dim = 8
    cfg.validate("model")
    return cfg


# (backbone, structure, scorer, channels per group, decoder overrides): every backbone family, both
# structures and scorers, both decoders; 16 (the paper's) wherever the widths allow it. MobileNetV2
# (24-channel blocks) and hrnet_tiny (an 8-channel branch) need 8; see test_group_size_must_divide_widths.
CASES = [
    ("resnet_tiny", "single", "linear", 16, {"low_level_channels": 16}),
    ("resnet_tiny", "pyramid", "embedding", 16, {"low_level_channels": 32}),
    ("resnet_tiny", "pyramid", "linear", 16, {"type": "hrnet_fusion", "fusion_channels": (16, 16, 32, 32)}),
    ("mobilenet_v2", "single", "embedding", 8, {"channels": 32}),
    ("mobilenet_v2", "pyramid", "linear", 8, {"channels": 32}),
    ("hrnet_tiny", "single", "linear", 8, {}),
    ("hrnet_tiny", "pyramid", "embedding", 8, {}),
]


@pytest.mark.parametrize("backbone, structure, scorer, cpg, decoder", CASES)
def test_every_norm_is_group_norm(backbone, structure, scorer, cpg, decoder):
    torch.manual_seed(0)
    batch = build_model(model_config(backbone, structure, scorer, "batch", cpg, **decoder), 20, 255)
    group = build_model(model_config(backbone, structure, scorer, "group", cpg, **decoder), 20, 255)
    bn, gn = norms(batch), norms(group)
    # the BatchNorm model is the reference for where norm layers are and how wide they are
    assert all(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in bn.values())
    assert set(gn) == set(bn) and gn
    for name, m in gn.items():
        assert type(m) is nn.GroupNorm, name
        assert m.num_channels == bn[name].num_features, name
        assert m.num_groups == m.num_channels // cpg and m.num_channels % cpg == 0, name
        assert m.affine and torch.all(m.weight == 1) and torch.all(m.bias == 0), name
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in group.modules())
    # norms in every part that has them: HRNet's fusion decoder only concatenates, the single head is a 1x1 conv
    expected = {"backbone": True, "decoder": backbone != "hrnet_tiny", "head": structure == "pyramid"}
    for part, has_norm in expected.items():
        assert any(is_norm(m) for m in getattr(batch, part).modules()) == has_norm, part
        assert any(isinstance(m, nn.GroupNorm) for m in getattr(group, part).modules()) == has_norm, part
    if structure == "pyramid":  # the context update's Conv1d norm: BatchNorm1d with batch, GroupNorm with group
        assert isinstance(batch.head.semantic_head.update[0].update[1], nn.BatchNorm1d)
        assert type(group.head.semantic_head.update[0].update[1]) is nn.GroupNorm
    # same parameters otherwise (GN's weight/bias are BN's; the BN statistics are gone) and same outputs' shapes
    bn_keys = {k for k in batch.state_dict() if not k.endswith(BN_STATISTICS)}
    assert set(group.state_dict()) == bn_keys
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out_b, out_g = batch.eval()(images), group.eval()(images)
    shapes = lambda out: {k: [t.shape for t in (v if isinstance(v, list) else [v])] for k, v in out.items()}
    assert shapes(out_g) == shapes(out_b)
    assert group.dense(images).shape == batch.dense(images).shape


def flat(outputs: dict) -> list[torch.Tensor]:
    return [t for v in outputs.values() for t in (v if isinstance(v, list) else [v])]


@pytest.mark.parametrize("backbone, structure, scorer, cpg, decoder", [CASES[0], CASES[1], CASES[6]])
def test_group_norm_output_is_independent_of_the_batch(backbone, structure, scorer, cpg, decoder):
    """In train mode (the mode the low-batch remedy is about) a GN model's output for a batch of 2 equals
    each image run alone. The control: with BatchNorm an image's output changes with the image beside it
    (BatchNorm cannot run one image alone in train mode at all: the ASPP pooling has one value per channel)."""
    torch.manual_seed(0)
    x0, x1, x2 = torch.randn(3, 1, 3, 64, 64)
    for norm in ("group", "batch"):
        model = build_model(model_config(backbone, structure, scorer, norm, cpg, dropout=0.0, **decoder), 20, 255)
        model.train()
        with torch.no_grad():
            pair = flat(model(torch.cat([x0, x1])))
            other_pair = flat(model(torch.cat([x0, x2])))
            alone = [flat(model(x)) for x in (x0, x1)] if norm == "group" else None
        for level, joint in enumerate(pair):
            beside_x2 = other_pair[level][:1]
            if norm == "group":
                torch.testing.assert_close(joint, torch.cat([alone[0][level], alone[1][level]]), rtol=1e-4, atol=1e-5)
                torch.testing.assert_close(joint[:1], beside_x2, rtol=1e-4, atol=1e-5)
            else:
                assert not torch.allclose(joint[:1], beside_x2, rtol=1e-3, atol=1e-3)


def test_backbone_bn_momentum_touches_batch_norm_only():
    group = build_model(model_config("resnet_tiny", norm="group", low_level_channels=16), 20, 255)
    batch = build_model(model_config("resnet_tiny", norm="batch", low_level_channels=16), 20, 255)
    assert {m.momentum for m in batch.backbone.modules() if isinstance(m, nn.BatchNorm2d)} == {0.01}
    assert not any(hasattr(m, "momentum") for m in group.modules() if is_norm(m))


# ---------------------------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------------------------


def test_batch_size_one_needs_group_norm():
    cfg = load_config(None, ["data.batch_size=1", "model.norm=group"])
    assert (cfg.data.batch_size, cfg.model.norm, cfg.model.group_norm_channels) == (1, "group", 16)
    with pytest.raises(ConfigError) as err:
        load_config(None, ["data.batch_size=1"])
    msg = str(err.value)
    assert msg.startswith("data.batch_size = 1: BatchNorm (in the ASPP image-pooling branch) needs at least 2")
    assert "train.grad_accum" in msg and msg.endswith("or model.norm=group")
    for norm in ("batch", "group"):
        with pytest.raises(ConfigError, match=r"data\.batch_size = 0: must be > 0"):
            load_config(None, ["data.batch_size=0", f"model.norm={norm}"])
    assert load_config(None).model.norm == "batch"  # the default is unchanged


@pytest.mark.parametrize("value", [0, -16])
def test_group_norm_channels_must_be_positive(value):
    with pytest.raises(ConfigError, match=rf"model\.group_norm_channels = {value}: must be >= 1"):
        load_config(None, ["model.norm=group", f"model.group_norm_channels={value}"])
    with pytest.raises(ConfigError, match="model.group_norm_channels"):
        make_norm("group", value)


def test_unknown_norm_kind_is_refused():
    with pytest.raises(ConfigError, match=r"model\.norm = 'layer' is not allowed; choose one of 'batch', 'group'"):
        load_config(None, ["model.norm=layer"])
    with pytest.raises(ConfigError, match="model.norm = 'instance'"):
        make_norm("instance")


@pytest.mark.parametrize("overrides, width, part", [
    ([], 24, "the decoder (model.decoder.channels, model.decoder.low_level_channels)"),  # resnet_tiny's default 24
    (["model.backbone=mobilenet_v2"], 24, "the backbone (model.backbone = mobilenet_v2)"),
    (["model.decoder.low_level_channels=16", "model.head.structure=pyramid", "model.head.pyramid.semantic_channels=40"],
     40, "the pyramid head (model.head.pyramid.unity_channels, model.head.pyramid.semantic_channels)"),
    (["model.decoder.low_level_channels=16", "model.head.single_head=semantic", "model.head.pyramid.semantic_channels=40"],
     40, "the single head's semantic layers (model.head.pyramid.semantic_channels)"),
    (["model.backbone=hrnet_tiny", "model.decoder.type=hrnet_fusion", "model.output_stride=32",
      "model.group_norm_channels=32"], 16, "the backbone (model.backbone = hrnet_tiny)"),  # 32 > the stem's 16
])
def test_group_size_must_divide_widths(overrides, width, part):
    cfg = load_config(None, ["model.norm=group"] + overrides)
    cpg = cfg.model.group_norm_channels
    with pytest.raises(ConfigError) as err:
        build_model(cfg.model, 20, 255)
    msg = str(err.value)
    assert f"model.group_norm_channels = {cpg} does not divide the {width} channels of a norm layer in {part}" in msg
    assert f"({math.gcd(cpg, width)} fits this layer)" in msg and "model.norm=batch" in msg
    # the same widths are fine with BatchNorm, which ignores group_norm_channels
    build_model(load_config(None, overrides).model, 20, 255)


def test_norm_factories():
    assert make_norm("batch") is nn.BatchNorm2d and norm_1d(nn.BatchNorm2d) is nn.BatchNorm1d
    assert norm_1d(None) is nn.BatchNorm1d
    factory = make_norm("group", 4)
    assert isinstance(factory, GroupNormFactory) and norm_1d(factory) is factory
    gn = factory(12)
    assert (gn.num_groups, gn.num_channels) == (3, 12)
    # GroupNorm by hand: each sample's group of 4 channels (x all positions) to mean 0, variance 1
    x = torch.randn(2, 12, 5, 7)
    g = x.view(2, 3, -1)
    want = ((g - g.mean(-1, keepdim=True)) / torch.sqrt(g.var(-1, unbiased=False, keepdim=True) + gn.eps)).view_as(x)
    torch.testing.assert_close(gn(x), want, rtol=1e-5, atol=1e-5)
    # the same factory serves the pyramid's 1-d convs: (N, C, T) tokens
    layer = conv1d_norm_relu(6, 12, factory)
    assert type(layer[1]) is nn.GroupNorm and layer(torch.randn(2, 6, 10)).shape == (2, 12, 10)
    assert isinstance(conv1d_norm_relu(6, 12)[1], nn.BatchNorm1d)


# ---------------------------------------------------------------------------------------------
# ImageNet (BatchNorm) weights into a GroupNorm backbone
# ---------------------------------------------------------------------------------------------


def torchvision_style_file(path, name: str, head: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A BatchNorm backbone's state dict with random values everywhere (statistics included) plus
    classification-head keys, saved at `path`, as a torchvision ImageNet file looks."""
    g = torch.Generator().manual_seed(3)
    state = {}
    for key, value in build_backbone(name).state_dict().items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(1234)
        elif key.endswith("running_var"):
            state[key] = torch.rand(value.shape, generator=g) + 0.5
        else:
            state[key] = torch.randn(value.shape, generator=g)
    state.update(head)
    torch.save(state, path)
    return state


@pytest.mark.parametrize("name, cpg, head", [
    ("resnet_tiny", 16, {"fc.weight": torch.zeros(1000, 128), "fc.bias": torch.zeros(1000)}),
    ("mobilenet_v2", 8, {"features.18.0.weight": torch.zeros(1280, 320, 1, 1), "classifier.1.bias": torch.zeros(1000)}),
])
def test_batch_norm_weights_load_into_group_norm(tmp_path, caplog, name, cpg, head):
    path = tmp_path / f"{name}.pth"
    state = torchvision_style_file(path, name, head)
    with caplog.at_level(logging.WARNING, logger="scaleseg"):
        model = build_backbone(name, pretrained=path, norm_layer=make_norm("group", cpg))
    report = model.pretrained_report
    group_norms = norms(model)
    assert group_norms and all(type(m) is nn.GroupNorm for m in group_norms.values())
    for key, value in model.state_dict().items():  # convs, and GN weight/bias from BN weight/bias
        assert torch.equal(value, state[key]), key
    for layer, m in group_norms.items():
        assert torch.equal(m.weight, state[f"{layer}.weight"]) and torch.equal(m.bias, state[f"{layer}.bias"])
    statistics = sorted(f"{layer}.{s}" for layer in group_norms for s in BN_STATISTICS)
    assert len(statistics) == 3 * len(group_norms)
    assert report.ignored == sorted(statistics + list(head))
    assert report.missing == [] and report.unexpected == []
    assert report.loaded == len(model.state_dict())
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]

    # the same file into the BatchNorm backbone: the statistics are loaded, only the head is ignored
    batch = build_backbone(name, pretrained=path)
    assert batch.pretrained_report.ignored == sorted(head)
    assert batch.pretrained_report.loaded == len(state) - len(head)
    assert torch.equal(batch.state_dict()["bn1.running_var" if name == "resnet_tiny" else "features.0.1.running_var"],
                       state["bn1.running_var" if name == "resnet_tiny" else "features.0.1.running_var"])


def test_pretrained_group_norm_model_from_config(tmp_path):
    path = tmp_path / "resnet_tiny.pth"
    state = torchvision_style_file(path, "resnet_tiny", {"fc.weight": torch.zeros(10, 128), "fc.bias": torch.zeros(10)})
    cfg = load_config(None, ["model.norm=group", "model.decoder.low_level_channels=16", f"model.pretrained={path}"])
    model = build_model(cfg.model, 20, 255)
    assert torch.equal(model.backbone.layer3[0].bn2.weight, state["layer3.0.bn2.weight"])
    assert "layer3.0.bn2.running_mean" in model.backbone.pretrained_report.ignored


# ---------------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------------


def test_training_with_group_norm_and_one_image_per_batch(tmp_path, tiny_overrides):
    work = tmp_path / "gn"
    cfg = load_config(None, tiny_overrides + [
        "model.norm=group", "data.batch_size=1", "model.decoder.low_level_channels=16", "train.iters=4",
        "train.checkpoint_interval=4",
    ])
    result = Trainer(cfg, work_dir=work).run()
    rows = [json.loads(line) for line in (work / "scalars.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if r["split"] == "train"]
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses)
    assert math.isfinite(result["mIoU"])
    saved = load_config(work / "config.yaml")
    assert (saved.model.norm, saved.data.batch_size) == ("group", 1)
    weights = torch.load(work / "iter_000004.pth", weights_only=True)["model"]
    assert not any(k.endswith("running_mean") for k in weights)
    assert any(k.endswith("bn1.weight") for k in weights)
