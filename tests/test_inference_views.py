"""Inference without waste for the linear scorer: one view is decided on its logits (no softmax,
no second C x H x W map); averaged views average probabilities, as the plain formula does."""

import pytest
import torch
import torch.nn.functional as F

from scaleseg.config import EvalConfig, load_config
from scaleseg.engine.inference import infer_dense, predict_labels
from scaleseg.models import build_model
from scaleseg.models.heads.scorers import deciding_one_view
from tests.memory_probe import LargestTensor

NARROW = ["model.decoder.channels=16", "model.decoder.low_level_channels=8"]


@pytest.fixture(scope="module")
def linear_model():
    torch.manual_seed(0)
    cfg = load_config(None, NARROW + ["data.num_classes=300"])
    return build_model(cfg.model, 300, ignore_index=-1).eval()


def test_one_view_is_decided_on_the_logits(linear_model):
    images = torch.randn(2, 3, 40, 56)
    with torch.no_grad():
        probabilities = linear_model.dense(images)  # outside the one-view context: averageable
    torch.testing.assert_close(probabilities.sum(1), torch.ones(2, 40, 56))
    with LargestTensor() as probe:
        labels = predict_labels(linear_model, images, EvalConfig())
    assert torch.equal(labels, probabilities.argmax(1))
    assert not any("softmax" in op for op in probe.ops)
    # the largest tensor is the one upsampled C x H x W logit map, not a second copy beside it
    assert probe.numel == 2 * 300 * 40 * 56
    with torch.no_grad(), deciding_one_view():
        logits = linear_model.dense(images)
    torch.testing.assert_close(logits.softmax(1), probabilities)


@pytest.mark.parametrize("cfg", [EvalConfig(flip=True), EvalConfig(scales=(1.0, 0.75), flip=True),
                                 EvalConfig(scales=(0.5,)),
                                 EvalConfig(mode="slide", crop_size=(32, 32), stride=(16, 16), flip=True)])
def test_averaged_views_average_probabilities(linear_model, cfg):
    images = torch.randn(1, 3, 40, 56)
    views = []
    with torch.no_grad():
        for scale in cfg.scales:
            scaled = images
            if scale != 1:
                size = (round(40 * scale), round(56 * scale))
                scaled = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
            for flip in (False, True) if cfg.flip else (False,):
                view = scaled.flip(-1) if flip else scaled
                if cfg.mode == "slide":
                    from scaleseg.engine.inference import slide_dense

                    p = slide_dense(linear_model, view, cfg.crop_size, cfg.stride)
                else:
                    p = linear_model.dense(view)  # probabilities
                p = p.flip(-1) if flip else p
                views.append(F.interpolate(p, size=(40, 56), mode="bilinear", align_corners=False)
                             if p.shape[-2:] != (40, 56) else p)
        want = torch.stack(views).mean(0)
    got = infer_dense(linear_model, images, cfg)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert torch.equal(predict_labels(linear_model, images, cfg), want.argmax(1))
