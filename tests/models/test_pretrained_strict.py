"""A weight file for another depth of the same family (same tensor shapes, other blocks) is refused,
naming the keys and the architecture the file looks like; `model.pretrained_strict=false` allows the
partial load. The load message mentions BN statistics only under GroupNorm."""

from __future__ import annotations

import logging

import pytest
import torch

from scaleseg.config import load_config
from scaleseg.errors import CheckpointError
from scaleseg.models import build_model
from scaleseg.models.backbones import BACKBONES, build_backbone, describe_weights, load_pretrained
from scaleseg.models.norm import make_norm


def torchvision_file(tmp_path, name: str) -> tuple:
    """Our backbone's state dict plus torchvision's classifier (fc), saved as <name>.pth."""
    g = torch.Generator().manual_seed(0)
    state = {k: (torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone())
             for k, v in BACKBONES[name]().state_dict().items()}
    width = 512 if name in ("resnet18", "resnet34") else 2048
    state.update({"fc.weight": torch.zeros(1000, width), "fc.bias": torch.zeros(1000)})
    path = tmp_path / f"{name}.pth"
    torch.save(state, path)
    return path, state


@pytest.mark.parametrize("file_arch, model_arch, first_key, kind", [
    ("resnet50", "resnet101", "layer3.6.", "missing"),      # 255 tensors of layer3.6-22 would stay random
    ("resnet101", "resnet50", "layer3.6.", "unexpected"),   # 306 tensors would be dropped
    ("resnet18", "resnet34", "layer1.2.", "missing"),
    ("resnet34", "resnet18", "layer1.2.", "unexpected"),
])
def test_weights_of_another_depth_are_refused(tmp_path, file_arch, model_arch, first_key, kind):
    path, _ = torchvision_file(tmp_path, file_arch)
    model = BACKBONES[model_arch]()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError) as err:
        load_pretrained(model, path)
    msg = str(err.value)
    assert str(path) in msg and f"looks like {file_arch}" in msg and f"not {model_arch}" in msg
    assert f"{kind}" in msg and first_key in msg
    assert "model.pretrained_strict=false" in msg
    for k, v in model.state_dict().items():  # nothing was half-loaded
        assert torch.equal(v, before[k]), k


def test_the_resnet50_into_resnet101_counts(tmp_path):
    path, state = torchvision_file(tmp_path, "resnet50")
    report = load_pretrained(BACKBONES["resnet101"](), path, strict=False)
    # layer3 blocks 6..22 (17 bottlenecks x 15 tensors, num_batches_tracked not counted) stay random
    assert len(report.missing) == 17 * 15 and report.unexpected == []
    assert report.loaded == len(state) - 2  # everything but fc
    assert all(k.startswith("layer3.") for k in report.missing)


def test_describe_weights_names_the_architecture(tmp_path):
    for name in ("resnet18", "resnet34", "resnet50", "resnet101", "resnet_tiny", "mobilenet_v2", "hrnet_tiny",
                 "hrnetv2_w18"):
        assert describe_weights(BACKBONES[name]().state_dict()) == name, name
    assert describe_weights({"a.weight": torch.zeros(1)}) is None


def test_pretrained_strict_false_allows_a_partial_load_with_warnings(tmp_path, caplog):
    path, state = torchvision_file(tmp_path, "resnet18")
    base = ["model.backbone=resnet34", f"model.pretrained={path}", "model.decoder.channels=16",
            "model.decoder.low_level_channels=8"]
    with pytest.raises(CheckpointError, match="model.pretrained_strict=false"):
        build_model(load_config(None, base).model, 5, 255)
    with caplog.at_level(logging.WARNING, logger="scaleseg"):
        model = build_model(load_config(None, [*base, "model.pretrained_strict=false"]).model, 5, 255)
    assert torch.equal(model.backbone.conv1.weight, state["conv1.weight"])
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("keys missing from the weight file" in m and "layer1.2." in m for m in warnings)


def test_load_message_mentions_bn_statistics_only_under_group_norm(tmp_path, caplog):
    path, _ = torchvision_file(tmp_path, "resnet18")
    with caplog.at_level(logging.INFO, logger="scaleseg"):
        build_backbone("resnet18", pretrained=path)
    batch = [r.getMessage() for r in caplog.records if "loaded" in r.getMessage()]
    assert len(batch) == 1 and "2 unused keys ignored: the classifier" in batch[0]
    assert "GroupNorm" not in batch[0] and "statistics" not in batch[0]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="scaleseg"):
        build_backbone("resnet18", pretrained=path, norm_layer=make_norm("group", 16))
    group = [r.getMessage() for r in caplog.records if "loaded" in r.getMessage()]
    assert len(group) == 1 and "the classifier (2) and the BatchNorm statistics" in group[0] and "GroupNorm" in group[0]


def test_a_path_under_home_is_expanded(tmp_path, monkeypatch):
    """README: model.pretrained=~/weights/resnet50-11ad3fa6.pth (the config check expands ~; so must the loader)."""
    monkeypatch.setenv("HOME", str(tmp_path))
    path, state = torchvision_file(tmp_path, "resnet18")
    model = build_backbone("resnet18", pretrained="~/resnet18.pth")
    assert model.pretrained_report.path == str(path)
    assert torch.equal(model.conv1.weight, state["conv1.weight"])


def test_a_segmentation_models_pytorch_state_dict_loads_its_encoder_part(tmp_path):
    """smp models hold their encoder under `encoder.` with torchvision's names below it (decoder and head
    beside it): those keys load, the rest of the model is not the backbone's business."""
    import torch

    from scaleseg.models.backbones import build_backbone

    source = build_backbone("resnet18")
    with torch.no_grad():
        for p in source.parameters():
            p.add_(torch.randn_like(p))
    state = {f"encoder.{k}": v for k, v in source.state_dict().items()}
    state.update({"encoder.fc.weight": torch.zeros(10, 512), "decoder.block.weight": torch.zeros(3),
                  "segmentation_head.0.weight": torch.zeros(5, 16, 1, 1)})
    path = tmp_path / "smp.pth"
    torch.save(state, path)
    loaded = build_backbone("resnet18", pretrained=path)
    assert loaded.pretrained_report.loaded == len(source.state_dict())
    for key, value in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
