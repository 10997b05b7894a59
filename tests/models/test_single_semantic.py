"""The pyramid's matched baseline (S&F Table 6, "Single (standard)"): a single-level output behind the
pyramid's semantic head (model.head.single_head=semantic), and the loss-gradient diagnostic.

References are written here from the paper's equations with plain tensor operations (explicit softmax
attention, F.adaptive_avg_pool2d), not with the modules under test.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F

from scaleseg.analysis.gradients import loss_gradient_norms, mean_gradient_norms
from scaleseg.config import load_config
from scaleseg.errors import ConfigError
from scaleseg.models import build_model
from scaleseg.models.heads.pyramid import SemanticHead
from scaleseg.models.heads.single import SingleLevelHead

SEMANTIC = ["model.head.single_head=semantic", "model.head.pyramid.semantic_channels=16",
            "model.head.pyramid.context_bins=[1,2]"]
PYRAMID = ["model.head.structure=pyramid", "model.head.pyramid.semantic_channels=16",
           "model.head.pyramid.unity_channels=8", "model.head.pyramid.context_bins=[1,2]",
           "model.head.pyramid.strides=[4,8]"]


def model_of(overrides, num_classes=7, seed=0):
    torch.manual_seed(seed)
    return build_model(load_config(None, overrides).model, num_classes, 255)


def conv1x1(seq_conv, x):
    """A Conv2d(1x1) / Conv1d(1) as a matrix product (+ bias)."""
    w = seq_conv.weight.reshape(seq_conv.weight.shape[0], -1)
    y = torch.einsum("oc,bc...->bo...", w, x)
    if seq_conv.bias is not None:
        y = y + seq_conv.bias.reshape(1, -1, *([1] * (x.dim() - 2)))
    return y


def bn_relu(bn, x):
    shape = (1, -1, *([1] * (x.dim() - 2)))
    y = (x - bn.running_mean.reshape(shape)) / torch.sqrt(bn.running_var.reshape(shape) + bn.eps)
    return torch.relu(y * bn.weight.reshape(shape) + bn.bias.reshape(shape))


def cbr(seq, x):
    return bn_relu(seq[1], conv1x1(seq[0], x))


def reference_semantic_single(head: SingleLevelHead, features: torch.Tensor) -> torch.Tensor:
    """S&F Eq. 3-9 for one level (L = 1), eval mode: X = CBR(features); theta = concat of adaptive average
    pools of X (Eq. 6); X' = CBR([softmax(q k^T / sqrt(Dk)) v, X]) (Eq. 8-9); ConvBlock; the scorer's 1x1."""
    sem = head.semantic_head
    x = cbr(sem.project, features)
    B, D, h, w = x.shape
    theta = torch.cat([F.adaptive_avg_pool2d(x, b).flatten(2) for b in sem.bins], dim=2)  # (B, D, T)
    ca = sem.aggregate[0]
    q = conv1x1(ca.query, x).flatten(2).transpose(1, 2)  # (B, n, Dk)
    k = conv1x1(ca.key, theta).transpose(1, 2)  # (B, T, Dk)
    v = conv1x1(ca.value, theta).transpose(1, 2)  # (B, T, D)
    att = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(q.shape[-1]), dim=-1) @ v  # (B, n, D)
    att = att.transpose(1, 2).reshape(B, D, h, w)
    x = cbr(ca.aggregate, torch.cat([att, x], dim=1))
    x = cbr(sem.blocks[0], x)
    return conv1x1(head.scorer.classifier, x)


def randomise_bn(model):
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)


def test_semantic_single_head_is_the_papers_head_with_one_level():
    model = model_of(SEMANTIC).eval()
    head = model.head
    assert isinstance(head, SingleLevelHead) and isinstance(head.semantic_head, SemanticHead)
    assert head.semantic_head.context and len(head.semantic_head.aggregate) == 1 and len(head.semantic_head.update) == 0
    randomise_bn(model)
    features = torch.randn(2, model.decoder.out_channels, 9, 11)
    got = head(features)["scores"]
    assert got.shape == (2, 7, 9, 11)
    torch.testing.assert_close(got, reference_semantic_single(head, features), rtol=1e-4, atol=1e-5)


def test_without_context_the_single_semantic_head_is_project_then_convblock():
    model = model_of([*SEMANTIC, "model.head.pyramid.context=false"]).eval()
    randomise_bn(model)
    head = model.head
    assert not hasattr(head.semantic_head, "aggregate")
    features = torch.randn(1, model.decoder.out_channels, 6, 5)
    expected = conv1x1(head.scorer.classifier, cbr(head.semantic_head.blocks[0], cbr(head.semantic_head.project, features)))
    torch.testing.assert_close(head(features)["scores"], expected, rtol=1e-4, atol=1e-5)


def test_the_single_semantic_head_has_the_pyramids_finest_level_layers():
    """Same parameter names and shapes as the pyramid's semantic head has for its finest level (the matched
    baseline differs from the pyramid by the coarse levels, the context updates and the unity head only)."""
    single = {k: v.shape for k, v in model_of(SEMANTIC).head.semantic_head.state_dict().items()}
    pyramid = {k: v.shape for k, v in model_of(PYRAMID).head.semantic_head.state_dict().items()}
    finest = {re.sub(r"^(aggregate|blocks)\.1\.", r"\1.0.", k): v for k, v in pyramid.items()
              if k.startswith(("project.", "aggregate.1.", "blocks.1."))}
    assert single == finest


def test_plain_is_the_default_and_the_pyramid_refuses_single_head_semantic():
    assert model_of([]).head.semantic_head is None
    with pytest.raises(ConfigError, match="single_head"):
        load_config(None, [*PYRAMID, "model.head.single_head=semantic"])
    with pytest.raises(ConfigError, match="single_head"):
        load_config(None, ["model.head.single_head=pyramid"])


def test_the_single_semantic_head_trains_predicts_and_takes_group_norm():
    for extra in ([], ["model.norm=group", "model.group_norm_channels=8"], ["model.head.scorer=embedding", "model.head.embedding.num_neighbours=3"]):
        model = model_of([*SEMANTIC, *extra]).train()
        images, labels = torch.randn(2, 3, 32, 32), torch.randint(0, 7, (2, 32, 32))
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        losses = []
        for _ in range(8):
            loss = model.loss(model(images), labels)["loss"]
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        assert losses[-1] < losses[0], (extra, losses)
        assert model.head.semantic_head.project[0].weight.grad is not None
        assert model.predict(images).shape == (2, 32, 32)


def test_loss_gradient_norms_equal_a_finite_difference_free_reference():
    """Per term, the norm of d term / d features equals autograd of that term alone on a fresh graph."""
    model = model_of(PYRAMID)
    images, labels = torch.randn(2, 3, 32, 32), torch.randint(0, 7, (2, 32, 32))
    bn_before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    torch.manual_seed(5)  # the decoder's dropout
    norms = loss_gradient_norms(model, images, labels)
    assert set(norms) == {"ce", "unity"}
    for k, v in model.state_dict().items():  # the caller's model is untouched
        if "running" in k:
            torch.testing.assert_close(v, bn_before[k])
    for term in ("ce", "unity"):
        ref = model_of(PYRAMID).train()
        ref.load_state_dict(model.state_dict())
        torch.manual_seed(5)
        features = ref.decoder(ref.backbone(images)).detach().requires_grad_(True)
        value = ref.head.loss(ref.head(features), labels)[term]
        (grad,) = torch.autograd.grad(value, features)
        assert norms[term] == pytest.approx(float(grad.double().norm()), rel=1e-5)
    for m in model.modules():  # the same value on both batches
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    once = loss_gradient_norms(model, images, labels)
    summary = mean_gradient_norms(model, [(images, labels), (images, labels)])
    assert summary["batches"] == 2
    assert summary["unity_to_ce"] == pytest.approx(once["unity"] / once["ce"], rel=1e-5)


def test_loss_gradients_of_an_embedding_head_report_the_margin_term_as_zero():
    """ESS Eq. 7 acts on the class table alone: no gradient reaches the features."""
    model = model_of([*SEMANTIC, "model.head.scorer=embedding", "model.head.embedding.num_neighbours=3"])
    norms = loss_gradient_norms(model, torch.randn(2, 3, 32, 32), torch.randint(0, 7, (2, 32, 32)))
    assert norms["ce"] > 0
    assert [v for k, v in norms.items() if k != "ce"] == [0.0] * (len(norms) - 1)
