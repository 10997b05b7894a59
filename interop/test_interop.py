"""The interop stage (`.ci/interop`): scaleseg beside the real torchvision, timm and
segmentation-models-pytorch, in a second venv (torch 2.14.1 + torchvision 0.29.1, which do not import
beside the main suite's torch 2.13.0 CPU wheel). Every check compares with the library itself:

* torchvision resnet50 / resnet101 / mobilenet_v2 weights (random init, saved as torchvision ships its
  ImageNet files) load into our backbones, and every stage's features agree, also at output strides 8
  and 16 against torchvision's `replace_stride_with_dilation`;
* timm's hrnet_w18 / w32 / w48 weights load into our HRNetV2 and the four branch maps agree;
* a timm encoder is a backbone as it is (`model.backbone=timm:<name>`, or the module itself);
* segmentation-models-pytorch's DeepLabV3Plus(resnet50) with our ESS head in place of its segmentation
  head trains at C = 20,000 with a peak memory near its C = 19 figure, while the stock model's grows;
  docs/api.md's smp block runs; an smp encoder's state dict loads into our backbone.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import segmentation_models_pytorch as smp
import timm
import torch
import torchvision

import scaleseg
from scaleseg.models.backbones import build_backbone

HERE = Path(__file__).resolve().parent
DOC = HERE.parent / "docs" / "api.md"


def randomise_bn(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random BatchNorm statistics and affine parameters, so that a wrong mapping cannot agree by accident."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=g) * 0.4 - 0.2)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(m.bias.shape, generator=g) * 0.2 - 0.1)
    return model.eval()


def tv_resnet_stages(model, x):
    x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
    out = []
    for layer in (model.layer1, model.layer2, model.layer3, model.layer4):
        x = layer(x)
        out.append(x)
    return out


DILATION = {32: [False, False, False], 16: [False, False, True], 8: [False, True, True]}


@pytest.mark.parametrize("name", ["resnet50", "resnet101"])
@pytest.mark.parametrize("output_stride", [32, 16, 8])
def test_torchvision_resnet_weights_give_torchvision_features(tmp_path, name, output_stride):
    torch.manual_seed(0)
    tv = randomise_bn(getattr(torchvision.models, name)(weights=None, replace_stride_with_dilation=DILATION[output_stride]))
    path = tmp_path / f"{name}.pth"
    torch.save(tv.state_dict(), path)  # as torchvision ships resnet50-11ad3fa6.pth: fc.* included
    ours = build_backbone(name, output_stride=output_stride, pretrained=path).eval()
    assert ours.pretrained_report.loaded == len([k for k in tv.state_dict() if not k.startswith("fc.")])
    x = torch.randn(1, 3, 67, 75)
    with torch.no_grad():
        want, got = tv_resnet_stages(tv, x), ours(x)
    assert len(got) == 4
    for stage, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=f"{name} os {output_stride} stage {stage}")


def test_torchvision_mobilenet_v2_weights_give_torchvision_features(tmp_path):
    """torchvision's MobileNetV2 has no dilated variant: compared at output stride 32 (our dilated ones are
    tested against the strided network in the main suite)."""
    torch.manual_seed(0)
    tv = randomise_bn(torchvision.models.mobilenet_v2(weights=None))
    path = tmp_path / "mobilenet_v2.pth"
    torch.save(tv.state_dict(), path)
    ours = build_backbone("mobilenet_v2", output_stride=32, pretrained=path).eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        want, start = [], 0
        h = x
        for end in (4, 7, 14, 18):  # the four maps: features.3, .6, .13, .17
            for layer in tv.features[start:end]:
                h = layer(h)
            want.append(h)
            start = end
        got = ours(x)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("width", [18, 32, 48])
def test_timm_hrnet_weights_give_timm_branch_maps(tmp_path, width):
    torch.manual_seed(0)
    tm = randomise_bn(timm.create_model(f"hrnet_w{width}", pretrained=False))
    path = tmp_path / f"hrnet_w{width}.pth"
    torch.save(tm.state_dict(), path)  # timm's keys are the official ones; its classification head is ignored
    # timm's HRNet is the classification one, whose fuse upsamples by nearest; the segmentation HRNet (HRNetV2,
    # which ours follows and S&F builds on) upsamples bilinearly: make timm's do the same, so the weights compare
    for module in list(tm.modules()):
        for name, child in module.named_children():
            if isinstance(child, torch.nn.Upsample):
                setattr(module, name, torch.nn.Upsample(scale_factor=child.scale_factor, mode="bilinear",
                                                        align_corners=False))
    ours = build_backbone(f"hrnetv2_w{width}", output_stride=32, pretrained=path).eval()
    report = ours.pretrained_report
    assert report.loaded == len(ours.state_dict()) - sum(k.endswith("num_batches_tracked") for k in report.missing)
    assert not report.unexpected and not [k for k in report.missing if not k.endswith("num_batches_tracked")]
    x = torch.randn(1, 3, 64, 96)  # a multiple of 32: timm's fuse upsamples by fixed factors (ours to exact sizes)
    with torch.no_grad():
        stem = tm.act2(tm.bn2(tm.conv2(tm.act1(tm.bn1(tm.conv1(x))))))
        want, got = tm.stages(stem), ours(x)
    assert len(got) == len(want) == 4
    for a, b in zip(got, want):
        # relative to each map's magnitude: random weights through HRNet's repeated fuse sums grow the maps to
        # ~1e9, where float rounding alone exceeds any absolute tolerance
        scale = b.abs().max()
        assert torch.isfinite(scale) and scale > 0
        torch.testing.assert_close(a / scale, b / scale, rtol=1e-4, atol=1e-5)


def test_a_timm_encoder_is_a_backbone_by_name_and_as_a_module():
    torch.manual_seed(0)
    model = scaleseg.build_model(40, "timm:resnet18", scorer="embedding", **{"decoder.channels": 32})
    assert model.backbone.feature_info.reduction() == [4, 8, 16, 16]  # output stride 16: dilated
    images, labels = torch.randn(2, 3, 64, 64), torch.randint(0, 40, (2, 64, 64))
    model.loss(model(images), labels)["loss"].backward()
    assert model.predict(images).shape == (2, 64, 64)
    encoder = timm.create_model("convnext_atto", features_only=True, pretrained=False)  # timm's own feature_info
    model = scaleseg.build_model(40, encoder, scorer="linear", **{"decoder.channels": 32})
    assert model.predict(torch.randn(1, 3, 64, 64)).shape == (1, 64, 64)


def test_an_smp_encoder_state_dict_loads_into_our_backbone(tmp_path):
    """A whole smp checkpoint (encoder.* + decoder.* + segmentation_head.*) gives its encoder's weights to our
    backbone. Compared on smp's Unet, whose encoder is undilated as ours at output stride 32 (smp's DeepLabV3Plus
    dilates every 3x3 conv of its last stage; torchvision's convention, which ours follows, keeps the first
    block's at dilation 1, so those maps differ by design); DeepLabV3Plus checkpoints load the same keys."""
    torch.manual_seed(0)
    model = smp.Unet("resnet50", encoder_weights=None, classes=5).eval()
    randomise_bn(model.encoder)
    path = tmp_path / "smp_unet.pth"
    torch.save(model.state_dict(), path)
    ours = build_backbone("resnet50", output_stride=32, pretrained=path).eval()
    assert ours.pretrained_report.loaded == len(model.encoder.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        want = model.encoder(x)[-4:]  # smp gives [x, stem, layer1..layer4]
        got = ours(x)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    deeplab = smp.DeepLabV3Plus("resnet50", encoder_weights=None, classes=5)
    torch.save(deeplab.state_dict(), tmp_path / "smp_deeplabv3plus.pth")
    loaded = build_backbone("resnet50", output_stride=16, pretrained=tmp_path / "smp_deeplabv3plus.pth")
    assert loaded.pretrained_report.loaded == len(deeplab.encoder.state_dict())


def run_smp(variant: str, num_classes: int, size: int = 64) -> dict:
    out = subprocess.run([sys.executable, str(HERE / "smp_step.py"), variant, str(num_classes), str(size)],
                         capture_output=True, text=True, timeout=600, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_smp_deeplabv3plus_with_the_ess_head_keeps_its_memory_at_20000_classes():
    """Peak resident memory of a training step (one process each): the stock model's grows with C, the ESS
    head's stays near its C = 19 figure."""
    peak = {(v, c): run_smp(v, c)["peak_rss_mb"] for v in ("stock", "ess") for c in (19, 20000)}
    stock_growth = peak["stock", 20000] - peak["stock", 19]
    ess_growth = peak["ess", 20000] - peak["ess", 19]
    print(json.dumps({f"{v} C={c}": round(m) for (v, c), m in peak.items()}))
    assert stock_growth > 1000  # MiB: the C x H x W logits, their gradient, the softmax
    assert ess_growth < 0.1 * stock_growth and peak["ess", 20000] < 1.25 * peak["ess", 19]


def test_the_smp_block_of_docs_api_runs():
    blocks = re.findall(r"<!--\s*interop:[^>]*-->\s*\n```python\n(.*?)```", DOC.read_text(), re.S)
    assert len(blocks) == 1
    ns: dict = {"__name__": "api_doc_smp"}
    exec(compile(blocks[0], str(DOC), "exec"), ns)
    assert ns["predicted"].shape == (2, 64, 64) and int(ns["predicted"].max()) < 20000
