import pytest
import torch
import torch.nn.functional as F

from scaleseg.config import EvalConfig, load_config
from scaleseg.engine.inference import infer_dense, predict_labels
from scaleseg.engine.optim import build_optimizer, set_poly_lr
from scaleseg.models import build_model
from scaleseg.models.heads import EmbeddingScorer
from tests.memory_probe import LargestTensor

NARROW = ["model.decoder.channels=16", "model.decoder.low_level_channels=8", "model.head.scorer=embedding"]


def embedding_model(num_classes, *overrides):
    cfg = load_config(None, NARROW + [f"data.num_classes={num_classes}", *overrides])
    return build_model(cfg.model, num_classes, ignore_index=-1), cfg


def test_scorer_shapes_and_unit_vectors():
    model, _ = embedding_model(50)
    scorer = model.head.scorer
    assert isinstance(scorer, EmbeddingScorer)
    assert scorer.embed.out_channels == 12 and scorer.class_embeddings.shape == (50, 12)
    assert scorer.class_embeddings.abs().max() <= 1.0  # uniform(-1, 1) initialisation
    model.eval()
    images = torch.randn(2, 3, 40, 56)
    assert model(images)["scores"].shape == (2, 12, 10, 14)  # d channels at stride 4, never C
    dense = model.dense(images)
    assert dense.shape == (2, 12, 40, 56)
    torch.testing.assert_close(dense.norm(dim=1), torch.ones(2, 40, 56))


def test_prediction_is_the_nearest_class_embedding():
    model, _ = embedding_model(50)
    model.eval()
    dense = model.dense(torch.randn(2, 3, 32, 32))
    E = F.normalize(model.head.scorer.class_embeddings.detach(), dim=1)
    want = torch.einsum("bdhw,cd->bchw", dense, E).argmax(1)  # brute force: largest cosine = nearest
    assert torch.equal(model.decide(dense), want)


def test_without_normalisation_prediction_is_nearest_by_l2():
    model, _ = embedding_model(30, "model.head.embedding.normalize=false")
    model.eval()
    dense = model.dense(torch.randn(1, 3, 16, 16))
    E = model.head.scorer.class_embeddings.detach()
    x = dense.permute(0, 2, 3, 1).reshape(-1, 12)
    want = torch.cdist(x, E).argmin(1).view(1, 16, 16)
    assert torch.equal(model.decide(dense), want)
    assert not torch.allclose(dense.norm(dim=1), torch.ones(1, 16, 16))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("loss", ["knn", "full"])
def test_loss_terms_match_the_loss_functions(loss, dtype):
    """... in float32, and in float64 for a float64 model (not rounded to float32 on the way)."""
    from scaleseg.losses import full_cross_entropy, knn_cross_entropy, margin_regularizer

    torch.manual_seed(0)
    model, _ = embedding_model(40, f"model.head.embedding.loss={loss}", "model.head.loss_resolution=full")
    model.to(dtype)
    out = model(torch.randn(2, 3, 32, 32, dtype=dtype))
    target = torch.randint(0, 40, (2, 32, 32))
    target[:, :4] = -1
    terms = model.loss(out, target)
    x = F.normalize(F.interpolate(out["scores"], size=(32, 32), mode="bilinear"), dim=1)
    x = x.permute(0, 2, 3, 1).reshape(-1, 12)
    E = F.normalize(model.head.scorer.class_embeddings, dim=1)
    if loss == "knn":
        want = knn_cross_entropy(x, E, target.reshape(-1), 7, 0.05, -1)
    else:
        want = full_cross_entropy(x, E, target.reshape(-1), 0.05, -1)
    rel = 1e-5 if dtype == torch.float32 else 1e-12
    assert terms["ce"].dtype == terms["margin"].dtype == want.dtype == dtype
    assert terms["ce"].item() == pytest.approx(want.item(), rel=rel)
    assert terms["margin"].item() == pytest.approx(margin_regularizer(E, 0.2).item(), rel=rel)
    assert terms["loss"].item() == pytest.approx(terms["ce"].item() + terms["margin"].item(), rel=1e-6)


def test_class_embeddings_have_their_own_optimizer_group():
    model, cfg = embedding_model(20)
    opt = build_optimizer(model, cfg.optim)
    groups = {g["name"]: g for g in opt.param_groups}
    emb = groups["class_embeddings"]
    assert emb["params"] == [model.head.scorer.class_embeddings]
    assert emb["momentum"] == 0.95 and emb["poly_power"] == 0.95
    assert groups["head"]["momentum"] == 0.9 and groups["head"]["poly_power"] == 0.9
    set_poly_lr(opt, 50, 100)
    assert emb["lr"] == pytest.approx(cfg.optim.lr * 0.5**0.95)
    assert groups["head"]["lr"] == pytest.approx(cfg.optim.lr * 0.5**0.9)

    # optim.groups.class_embeddings.lr_mult scales the table's LR alone
    model, cfg = embedding_model(20, "optim.groups.class_embeddings.lr_mult=30")
    opt = build_optimizer(model, cfg.optim)
    groups = {g["name"]: g for g in opt.param_groups}
    set_poly_lr(opt, 50, 100)
    assert groups["class_embeddings"]["lr"] == pytest.approx(30 * cfg.optim.lr * 0.5**0.95)
    assert groups["head"]["lr"] == pytest.approx(cfg.optim.lr * 0.5**0.9)


def test_slide_inference_averages_embeddings_not_class_maps():
    model, _ = embedding_model(300)
    model.eval()
    images = torch.randn(1, 3, 48, 64)
    cfg = EvalConfig(mode="slide", crop_size=(32, 32), stride=(16, 16), flip=True)
    dense = infer_dense(model, images, cfg)
    assert dense.shape == (1, 12, 48, 64)  # d channels
    assert predict_labels(model, images, cfg).shape == (1, 48, 64)


@pytest.mark.parametrize("loss", ["knn", "full"])
def test_one_training_step_at_100k_classes_never_builds_c_by_pixels(loss):
    """The memory claim, structurally: forward, loss, backward, optimizer step and inference at
    C = 100,000 produce no tensor with C x (number of pixels) elements (nor C x C)."""
    C, B, H, W = 100_000, 2, 32, 32
    torch.manual_seed(0)
    model, cfg = embedding_model(
        C, f"model.head.embedding.loss={loss}", "model.head.loss_resolution=full",
        "model.head.embedding.search_budget_mb=16",
        "model.head.embedding.search_index=auto",  # the class index at 100,000: no exact C x C refresh (minutes)
    )
    opt = build_optimizer(model, cfg.optim)
    images, target = torch.randn(B, 3, H, W), torch.randint(0, C, (B, H, W))
    pixels = B * H * W
    with LargestTensor() as probe:
        loss_value = model.loss(model(images), target)["loss"]
        loss_value.backward()
        opt.step()
        model.eval()
        labels = predict_labels(model, images, EvalConfig())
    assert "aten.convolution_backward" in probe.ops  # backward ran under the probe
    assert labels.shape == (B, H, W) and int(labels.max()) < C
    assert probe.numel < C * pixels / 20, (probe.numel, probe.op)
    assert probe.numel <= max(16 * 2**20 // 4, C * 12), (probe.numel, probe.op)
