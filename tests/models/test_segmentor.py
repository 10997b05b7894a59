import pytest
import torch
import torch.nn.functional as F

from scaleseg.config import EvalConfig, ModelConfig, OptimConfig
from scaleseg.engine.inference import infer_dense, predict_labels, slide_dense
from scaleseg.engine.optim import build_optimizer, poly_factor, set_poly_lr
from scaleseg.models import build_model
from scaleseg.models.decoders import default_aspp_dilations
from scaleseg.models.heads.single import nearest_downsample


def tiny_model(num_classes=11, **kw):
    cfg = ModelConfig(**kw)
    cfg.decoder.channels = 32
    cfg.decoder.low_level_channels = 8
    return build_model(cfg, num_classes, ignore_index=255)


@pytest.mark.parametrize("output_stride", [8, 16])
@pytest.mark.parametrize("size", [(64, 64), (67, 93)])
def test_deeplabv3plus_shapes(output_stride, size):
    model = tiny_model(output_stride=output_stride).eval()
    images = torch.randn(2, 3, *size)
    scores = model(images)["scores"]
    assert scores.shape == (2, 11, -(-size[0] // 4), -(-size[1] // 4))  # stride 4, C channels
    assert model.dense(images).shape == (2, 11, *size)
    labels = model.decide(model.dense(images))
    assert labels.shape == (2, *size) and labels.dtype == torch.int64


def test_aspp_rates_follow_output_stride():
    assert default_aspp_dilations(16) == (6, 12, 18)
    assert default_aspp_dilations(8) == (12, 24, 36)
    model = tiny_model(output_stride=8)
    rates = [b[0].dilation[0] for b in model.decoder.aspp.branches[1:4]]
    assert rates == [12, 24, 36]


def test_published_decoder_layout_resnet50():
    model = build_model(ModelConfig(backbone="resnet50"), 150, 255)
    dec = model.decoder
    assert dec.aspp.branches[0][0].in_channels == 2048 and dec.aspp.branches[0][0].out_channels == 256
    assert dec.aspp.project[0][0].in_channels == 5 * 256
    assert isinstance(dec.aspp.project[1], torch.nn.Dropout) and dec.aspp.project[1].p == 0.1
    assert dec.low_level_project[0].in_channels == 256 and dec.low_level_project[0].out_channels == 48
    assert dec.fuse[0].kernel_size == (3, 3) and dec.fuse[0].in_channels == 304
    clf = model.head.scorer.classifier
    assert (clf.in_channels, clf.out_channels, clf.kernel_size, clf.bias is not None) == (256, 150, (1, 1), True)


def test_linear_loss_matches_cross_entropy_on_upsampled_logits():
    torch.manual_seed(0)
    model = tiny_model()
    model.head.loss_resolution = "full"
    images = torch.randn(2, 3, 64, 64)
    target = torch.randint(0, 11, (2, 64, 64))
    target[:, :5] = 255
    out = model(images)
    want = F.cross_entropy(F.interpolate(out["scores"], size=(64, 64), mode="bilinear"), target, ignore_index=255)
    terms = model.loss(out, target)
    assert terms["ce"].item() == pytest.approx(want.item(), rel=1e-5)
    assert terms["loss"].item() == pytest.approx(want.item(), rel=1e-5)


def test_decoder_loss_resolution_downsamples_labels():
    torch.manual_seed(0)
    model = tiny_model()
    model.head.loss_resolution = "decoder"
    out = model(torch.randn(2, 3, 64, 64))
    target = torch.randint(0, 11, (2, 64, 64))
    small = F.interpolate(target[:, None].float(), size=(16, 16), mode="nearest")[:, 0].long()
    assert torch.equal(nearest_downsample(target, (16, 16)), small)
    # the loss takes each 4x4 cell's majority label (issue 20: the top-left pixel shifted predictions)
    from tests.models.test_label_alignment import brute_force_majority

    want = F.cross_entropy(out["scores"], brute_force_majority(target, (16, 16)))
    assert model.loss(out, target)["ce"].item() == pytest.approx(want.item(), rel=1e-5)


def test_all_ignored_gives_zero_loss_and_zero_gradient():
    model = tiny_model()
    out = model(torch.randn(2, 3, 32, 32))
    loss = model.loss(out, torch.full((2, 32, 32), 255))["loss"]
    assert loss.item() == 0.0
    loss.backward()
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())


def test_param_groups_backbone_lr_and_poly_schedule():
    model = tiny_model()
    cfg = OptimConfig(lr=0.01, poly_power=0.9)  # the backbone group: lr_mult 0.1 by default
    opt = build_optimizer(model, cfg)
    groups = {g["name"]: g for g in opt.param_groups}
    assert groups["backbone"]["lr"] == pytest.approx(0.001)
    assert groups["decoder"]["lr"] == pytest.approx(0.01)
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))
    set_poly_lr(opt, 50, 100)
    assert groups["decoder"]["lr"] == pytest.approx(0.01 * 0.5**0.9)
    assert groups["backbone"]["lr"] == pytest.approx(0.001 * 0.5**0.9)
    assert poly_factor(100, 100, 0.9) == 0.0
    assert poly_factor(0, 100, 0.9, warmup=10) == pytest.approx(0.1)


def test_backbone_bn_momentum_from_config():
    model = tiny_model(backbone_bn_momentum=0.01)
    bns = [m for m in model.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all(m.momentum == 0.01 for m in bns)
    assert all(m.momentum == 0.1 for m in model.decoder.modules() if isinstance(m, torch.nn.BatchNorm2d))


class PixelwiseModel(torch.nn.Module):
    """A translation-equivariant per-pixel model: sliding windows must reproduce whole-image output."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 5, 1)

    def dense(self, images):
        return self.conv(images).softmax(1)

    def dense_with_counts(self, images):  # what inference calls (Segmentor's contract): no head counts
        return self.dense(images), {}

    def decide(self, dense):
        return dense.argmax(1)


def test_slide_inference_equals_whole_for_pixelwise_model():
    torch.manual_seed(0)
    model = PixelwiseModel()
    images = torch.randn(1, 3, 50, 70)
    whole = model.dense(images)
    slid = slide_dense(model, images, crop_size=(20, 32), stride=(13, 21))
    torch.testing.assert_close(slid, whole)
    cfg = EvalConfig(mode="slide", crop_size=(20, 32), stride=(13, 21))
    assert torch.equal(predict_labels(model, images, cfg), whole.argmax(1))


def test_flip_and_scales_average():
    torch.manual_seed(0)
    model = PixelwiseModel()
    images = torch.randn(1, 3, 16, 16)
    flipped = EvalConfig(flip=True)
    # a pixelwise model is flip-equivariant: flip averaging changes nothing
    torch.testing.assert_close(infer_dense(model, images, flipped), model.dense(images))
    two = EvalConfig(scales=(1.0, 0.5))
    half = F.interpolate(model.dense(F.interpolate(images, size=(8, 8), mode="bilinear")), size=(16, 16), mode="bilinear")
    torch.testing.assert_close(infer_dense(model, images, two), (model.dense(images) + half) / 2)


def test_pretrained_weights_through_the_config(tmp_path):
    from scaleseg.config import load_config
    from scaleseg.models.backbones import build_backbone

    # a torchvision-style file: backbone weights plus a classifier the backbone does not have
    source = build_backbone("resnet18")
    state = {k: torch.randn_like(v.float()).to(v.dtype) if v.is_floating_point() else v
             for k, v in source.state_dict().items()}
    state["fc.weight"], state["fc.bias"] = torch.zeros(1000, 512), torch.zeros(1000)
    path = tmp_path / "resnet18-imagenet.pth"
    torch.save(state, path)
    cfg = load_config(None, ["model.backbone=resnet18", f"model.pretrained={path}"])
    model = build_model(cfg.model, 7, 255)
    own = model.backbone.state_dict()
    for key, value in own.items():
        assert torch.equal(value, state[key]), key
    assert model.backbone.pretrained_report.ignored == ["fc.bias", "fc.weight"]
