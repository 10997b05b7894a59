"""The embedding scorer's cheaper hard negatives and cached regulariser (ESS supplementary C) as
config switches: their losses against independent references, their state, exact resumes."""

import pytest
import torch
import torch.nn.functional as F

import scaleseg.engine.trainer as trainer_module
from scaleseg.config import load_config
from scaleseg.engine.checkpoint import load_checkpoint
from scaleseg.engine.trainer import Trainer
from scaleseg.errors import ConfigError
from scaleseg.losses import knn_cross_entropy, margin_regularizer
from scaleseg.models import build_model
from scaleseg.search import ClassIndex
from tests.engine.test_trainer import read_scalars

NARROW = ["model.decoder.channels=16", "model.decoder.low_level_channels=8", "model.head.scorer=embedding",
          "model.head.loss_resolution=full"]


def model_for(C, *overrides):
    cfg = load_config(None, NARROW + [f"data.num_classes={C}", *overrides])
    return build_model(cfg.model, C, ignore_index=-1), cfg


@pytest.mark.parametrize("key, value, message", [
    ("temperature", "nan", "temperature = nan: must be a finite number"),
    ("margin", "inf", "margin = inf: must be a finite number"),
    ("search_block", "0", "search_block = 0: must be > 0"),
    ("margin_refresh", "0", "margin_refresh = 0"),
    ("index_clusters", "-1", "index_clusters = -1"),
    ("index_probes", "0", "index_probes = 0"),
    ("search_index", "annoy", "search_index"),
])
def test_config_refuses_bad_values_naming_the_key(key, value, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        load_config(None, [f"model.head.embedding.{key}={value}"])
    with pytest.raises(ConfigError, match="distance = squared"):
        load_config(None, ["model.head.embedding.full_implementation=linear", "model.head.embedding.distance=euclidean"])


@pytest.mark.parametrize("budget_mb", [256, 1])  # all logits from one matmul; the per-block path
def test_block_shared_search_loss_equals_a_brute_force_reference(budget_mb):
    torch.manual_seed(0)
    model, _ = model_for(60, "model.head.embedding.search_block=3", "model.head.embedding.margin_weight=0",
                         f"model.head.embedding.search_budget_mb={budget_mb}")
    out = model(torch.randn(2, 3, 32, 32))
    target = torch.randint(0, 60, (2, 32, 32))
    target[0, :5] = -1
    ce = model.loss(out, target)["ce"]
    # the reference: upsample, normalise, mean of each 3 x 3 block, its 8 nearest classes by cdist
    x = F.normalize(F.interpolate(out["scores"], size=(32, 32), mode="bilinear"), dim=1)
    E = F.normalize(model.head.scorer.class_embeddings, dim=1)
    cand = torch.empty(2, 32, 32, 8, dtype=torch.int64)
    for b in range(2):
        for by in range(0, 32, 3):
            for bx in range(0, 32, 3):
                mean = F.normalize(x[b, :, by : by + 3, bx : bx + 3].reshape(12, -1).mean(1), dim=0)
                cand[b, by : by + 3, bx : bx + 3] = torch.cdist(mean[None], E.detach()).argsort(1)[0, :8]
    flat = x.permute(0, 2, 3, 1).reshape(-1, 12)
    want = knn_cross_entropy(flat, E, target.reshape(-1), 7, ignore_index=-1, candidates=cand.reshape(-1, 8))
    assert ce.item() == pytest.approx(want.item(), rel=1e-5)
    # one block per pixel is the per-pixel search
    model.head.scorer.search_block = 1
    assert model.loss(out, target)["ce"].item() == pytest.approx(
        knn_cross_entropy(flat, E, target.reshape(-1), 7, ignore_index=-1).item(), rel=1e-5)


def test_class_index_and_margin_cache_state_in_the_model():
    torch.manual_seed(0)
    model, _ = model_for(300, "model.head.embedding.search_index=ivf", "model.head.embedding.index_refresh=2",
                         "model.head.embedding.margin_refresh=3", "model.head.embedding.index_clusters=10")
    scorer = model.head.scorer
    assert isinstance(scorer.class_index, ClassIndex) and scorer.class_index.num_clusters == 10
    keys = set(model.state_dict())
    assert {"head.scorer.class_index.centroids", "head.scorer.class_index.order", "head.scorer.class_index.steps",
            "head.scorer.margin_cache.partners", "head.scorer.margin_cache.steps"} <= keys
    images, target = torch.randn(2, 3, 16, 16), torch.randint(0, 300, (2, 16, 16))
    model.eval()  # outside training: the exact search and Eq. 7, nothing stored
    terms = model.loss(model(images), target)
    assert not scorer.class_index.is_built() and int(scorer.margin_cache.steps) == 0
    E = scorer.classes().detach()
    assert terms["margin"].item() == pytest.approx(margin_regularizer(E, 0.2).item(), rel=1e-5)
    model.train()
    for _ in range(3):
        model.loss(model(images), target)
    assert scorer.class_index.is_built() and int(scorer.class_index.steps) == 3
    assert int(scorer.margin_cache.steps) == 3
    with torch.no_grad():  # no gradient: not a training step either
        model.loss(model(images), target)
    assert int(scorer.class_index.steps) == 3
    # the auto rule: an index from index_min_classes classes on
    assert model_for(300, "model.head.embedding.search_index=auto",
                     "model.head.embedding.index_min_classes=300")[0].head.scorer.class_index is not None
    assert model_for(299, "model.head.embedding.search_index=auto",
                     "model.head.embedding.index_min_classes=300")[0].head.scorer.class_index is None


@pytest.mark.parametrize("probes, full", [(10, True), (1, False)])
def test_class_index_recall_is_measured_on_the_training_pixels(monkeypatch, probes, full):
    """Every RECALL_INTERVAL steps the scorer measures the index's recall of the exact k + 1 nearest on
    the step's own pixels; probing every cluster is the exact search (100%), probing one is not."""
    from scaleseg.models.heads import scorers
    from scaleseg.search import index_recall, nearest_classes

    monkeypatch.setattr(scorers, "RECALL_INTERVAL", 2)
    torch.manual_seed(0)
    model, _ = model_for(300, "model.head.embedding.search_index=ivf", "model.head.embedding.index_clusters=10",
                         f"model.head.embedding.index_probes={probes}")
    scorer = model.head.scorer
    images, target = torch.randn(2, 3, 16, 16), torch.randint(0, 300, (2, 16, 16))
    model.train()
    model.loss(model(images), target)
    assert model.training_stats() == {}  # step 0: not measured yet
    out = model(images)
    model.loss(out, target)  # step 1: measured (steps % 2 == 0 after it)
    recall = model.training_stats()["index_recall"]
    with torch.no_grad():  # the same measurement by hand: every loss pixel (fewer than RECALL_PIXELS)
        x = F.normalize(F.interpolate(out["scores"], size=(16, 16), mode="bilinear", align_corners=False), dim=1)
        q = x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])
        E = scorer.classes()
        want = 100 * index_recall(scorer.class_index.search(q, E, 8), nearest_classes(q, E, 8))
    assert recall == pytest.approx(want)
    assert (recall == 100.0) is full


def test_pyramid_levels_share_the_index_and_the_cache_stepped_once_per_step():
    torch.manual_seed(0)
    model, _ = model_for(50, "model.head.structure=pyramid", "model.head.pyramid.semantic_channels=16",
                         "model.head.pyramid.unity_channels=8", "model.head.embedding.search_index=ivf",
                         "model.head.embedding.margin_refresh=5")
    scorers = model.head.scorers
    assert all(s.class_index is scorers[0].class_index and s.margin_cache is scorers[0].margin_cache for s in scorers)
    model.train()
    images, target = torch.randn(2, 3, 32, 32), torch.randint(0, 50, (2, 32, 32))
    for _ in range(2):
        model.loss(model(images), target)["loss"].backward()
    assert int(scorers[0].class_index.steps) == 2 and int(scorers[0].margin_cache.steps) == 2


@pytest.mark.parametrize("extra", [
    ["model.head.embedding.margin_refresh=2", "model.head.embedding.search_block=2"],
    ["model.head.embedding.search_index=ivf", "model.head.embedding.index_refresh=2",
     "model.head.embedding.index_clusters=5", "model.head.embedding.index_probes=2",
     "model.head.embedding.margin_refresh=4", "model.head.loss_resolution=full"],
])
def test_resume_continues_exactly_with_cached_state(tmp_path, tiny_overrides, monkeypatch, extra):
    """Interrupted after the checkpoint at iteration 3 (between refreshes of the index and of the
    regulariser's pairs), resumed: the same losses and weights, the cached state included (and with the
    index, its recall logged every RECALL_INTERVAL steps, here 2)."""
    from scaleseg.models.heads import scorers

    monkeypatch.setattr(scorers, "RECALL_INTERVAL", 2)
    overrides = tiny_overrides + ["model.head.scorer=embedding", *extra]
    straight = tmp_path / "straight"
    Trainer(load_config(None, overrides), work_dir=straight).run()
    crashed = tmp_path / "crashed"
    real_set_lr = trainer_module.set_poly_lr

    def crash_at_4(optimizer, it, total, warmup=0):
        if it == 3:
            raise KeyboardInterrupt
        real_set_lr(optimizer, it, total, warmup)

    monkeypatch.setattr(trainer_module, "set_poly_lr", crash_at_4)
    with pytest.raises(KeyboardInterrupt):
        Trainer(load_config(None, overrides), work_dir=crashed).run()
    monkeypatch.setattr(trainer_module, "set_poly_lr", real_set_lr)
    Trainer(load_config(None, overrides), work_dir=crashed, resume=True).run()
    a, _ = read_scalars(straight)
    b, _ = read_scalars(crashed)
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    assert [r.get("index_recall") for r in a] == [r.get("index_recall") for r in b]
    if "model.head.embedding.search_index=ivf" in extra:
        assert 0 < a[-1]["index_recall"] <= 100 and "index recall" in (straight / "train.log").read_text()
    else:
        assert "index_recall" not in a[-1]
    wa = load_checkpoint(straight / "iter_000006.pth")["model"]
    wb = load_checkpoint(crashed / "iter_000006.pth")["model"]
    assert any(k.endswith("margin_cache.steps") for k in wa) and int(wa["head.scorer.margin_cache.steps"]) == 6
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


@pytest.mark.parametrize("distance", ["squared", "euclidean"])
def test_block_loss_computed_per_block_equals_per_pixel_candidates(distance):
    """block_knn_cross_entropy (candidates gathered once per block) against knn_cross_entropy with
    each pixel's copy of its block's candidates: loss and gradients."""
    from scaleseg.losses import block_candidates
    from scaleseg.losses.knn_ce import block_knn_cross_entropy

    g = torch.Generator().manual_seed(4)
    C = 400
    E = F.normalize(torch.randn(C, 12, generator=g), dim=1)
    t = torch.randint(0, C, (2, 11, 14), generator=g)
    t[1, :3] = -1
    t[0, 5, 6] = -1
    x = F.normalize(E[t.clamp(min=0)].permute(0, 3, 1, 2) * 2 + 0.8 * torch.randn(2, 12, 11, 14, generator=g), dim=1)
    xa, Ea = x.clone().requires_grad_(), E.clone().requires_grad_()
    loss = block_knn_cross_entropy(xa, Ea, t, 7, 4, ignore_index=-1, distance=distance)
    loss.backward()
    xr, Er = x.clone().requires_grad_(), E.clone().requires_grad_()
    cand = block_candidates(x, E, 8, 4, valid=t != -1).reshape(-1, 8)
    ref = knn_cross_entropy(xr.permute(0, 2, 3, 1).reshape(-1, 12), Er, t.reshape(-1), 7, ignore_index=-1,
                            distance=distance, candidates=cand, budget_bytes=64)
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    torch.testing.assert_close(xa.grad, xr.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(Ea.grad, Er.grad, rtol=1e-4, atol=1e-6)
