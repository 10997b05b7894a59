"""Specialize and Fuse: pyramid targets, relabelling, Eq. 1, Eq. 2, the heads, the model around them.

References are independent of the code under test: per-cell Python loops over explicit pixel sets,
hand-built cases, and the exact label map itself.
"""

from __future__ import annotations

import itertools
import random

import pytest
import torch
import torch.nn.functional as F

from scaleseg.config import EvalConfig, load_config
from scaleseg.engine.inference import infer_dense, predict_labels
from scaleseg.engine.optim import build_optimizer
from scaleseg.losses.pyramid import (
    UNITY_IGNORE,
    cell_targets,
    check_strides,
    done_by_coarser,
    pyramid_targets,
)
from scaleseg.models import build_model
from scaleseg.models.heads.pyramid import PyramidHead, UnityHead, fuse
from scaleseg.models.heads.scorers import LinearScorer
from tests.memory_probe import LargestTensor

IGNORE = 255


def blocky_labels(B: int, H: int, W: int, num_classes: int, block: int, seed: int, ignore_frac: float = 0.05,
                  noise_frac: float = 0.002):
    """Random labels constant on block x block squares (so unity cells exist at coarse levels), with
    a sprinkling of single-pixel noise and ignore pixels."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randint(0, num_classes, (B, -(-H // block), -(-W // block)), generator=g)
    labels = coarse.repeat_interleave(block, 1).repeat_interleave(block, 2)[:, :H, :W].clone()
    noise = torch.rand(B, H, W, generator=g) < noise_frac
    labels[noise] = torch.randint(0, num_classes, (int(noise.sum()),), generator=g)
    labels[torch.rand(B, H, W, generator=g) < ignore_frac] = IGNORE
    return labels


def brute_force_cells(labels: torch.Tensor, stride: int):
    """Per-cell loop: the set of valid labels of the pixels the cell covers (inside the image)."""
    B, H, W = labels.shape
    h, w = -(-H // stride), -(-W // stride)
    semantic = torch.full((B, h, w), IGNORE, dtype=torch.long)
    unity = torch.full((B, h, w), UNITY_IGNORE, dtype=torch.long)
    for b, i, j in itertools.product(range(B), range(h), range(w)):
        values = {
            int(labels[b, y, x])
            for y in range(i * stride, min((i + 1) * stride, H))
            for x in range(j * stride, min((j + 1) * stride, W))
        } - {IGNORE}
        if len(values) == 1:
            semantic[b, i, j], unity[b, i, j] = values.pop(), 1
        elif len(values) > 1:
            unity[b, i, j] = 0
    return semantic, unity


# ------------------------------------------------------------------ ground-truth pyramids


@pytest.mark.parametrize("size", [(37, 53), (64, 64), (33, 95)])
def test_pyramid_targets_match_brute_force_on_odd_sizes(size):
    labels = blocky_labels(2, *size, num_classes=5, block=16, seed=sum(size))
    targets = pyramid_targets(labels, (4, 8, 16, 32), IGNORE)
    for level, stride in enumerate((32, 16, 8, 4)):
        semantic, unity = brute_force_cells(labels, stride)
        h, w = semantic.shape[-2:]
        # padded cells beyond the image are all-ignore; the first h x w cells cover the image
        assert torch.equal(targets.semantic[level][:, :h, :w], semantic), stride
        assert torch.equal(targets.unity[level][:, :h, :w], unity), stride
        assert targets.semantic[level].shape[-2:] == (-(-size[0] // 32) * 32 // stride, -(-size[1] // 32) * 32 // stride)
    assert any(bool((u == 1).any()) for u in targets.unity[:2]) and bool((targets.unity[-1] == 0).any())


def test_ignore_rule_in_a_cell_hand_case():
    t = torch.tensor([[[3, IGNORE, 3, 4], [3, 3, 4, 4], [IGNORE, IGNORE, 7, 7], [IGNORE, IGNORE, 7, IGNORE]]])
    semantic, unity = cell_targets(t, 2, IGNORE)
    # cells: {3, ignore} -> unity 3; {3, 4} -> mix; all ignore -> ignored; {7, ignore} -> unity 7
    assert semantic.tolist() == [[[3, IGNORE], [IGNORE, 7]]]
    assert unity.tolist() == [[[1, 0], [UNITY_IGNORE, 1]]]


def test_cell_targets_are_exact_for_large_class_ids():
    big = 2**24 + 1  # not representable in float32: a float min/max would merge it with 2**24
    t = torch.tensor([[[big, big], [big, 2**24]]])
    semantic, unity = cell_targets(t, 2, IGNORE)
    assert unity.item() == 0
    semantic, unity = cell_targets(torch.full((1, 2, 2), big), 2, IGNORE)
    assert semantic.item() == big and unity.item() == 1


@pytest.mark.parametrize("strides", [(4, 8, 16, 32), (32, 4), (8, 2, 4, 16)])
def test_check_strides_orders_coarse_to_fine(strides):
    assert check_strides(strides) == tuple(sorted(strides, reverse=True))


@pytest.mark.parametrize("strides", [(8, 12), (4, 4, 8), (0, 4)])
def test_check_strides_rejects_non_nesting(strides):
    with pytest.raises(ValueError):
        check_strides(strides)


# ------------------------------------------------------------------ fuse (Eq. 2)


def one_hot(labels: torch.Tensor, C: int) -> torch.Tensor:
    """(B, h, w) -> (B, C, h, w); ignored cells get the zero vector."""
    valid = labels != IGNORE
    out = F.one_hot(torch.where(valid, labels, 0), C).permute(0, 3, 1, 2).float()
    return out * valid[:, None]


def gt_pyramid_inputs(labels: torch.Tensor, strides, C: int):
    """The ground-truth pyramids as predictions: semantic one-hot, unity 0/1, the finest level = the labels."""
    strides = check_strides(strides)
    targets = pyramid_targets(labels, strides, IGNORE)
    coarse = [one_hot(s, C) for s in targets.semantic[:-1]]
    unity = [(u == 1).float() for u in targets.unity[:-1]]
    return coarse, unity, one_hot(labels, C), strides


@pytest.mark.parametrize("strides", [(4, 8, 16, 32), (4, 32), (2, 4, 8)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fusing_ground_truth_pyramids_reproduces_the_labels(strides, seed):
    C = 6
    rng = random.Random(seed)
    block = max(strides) * rng.choice([1, 2])
    labels = blocky_labels(2, rng.randint(33, 70), rng.randint(33, 70), C, block=block, seed=seed, noise_frac=5e-4)
    coarse, unity, finest, strides = gt_pyramid_inputs(labels, strides, C)
    for tau in (rng.uniform(1e-3, 1 - 1e-3), 0.5, 0.999):
        fused, level = fuse(coarse, unity, strides, finest, tau)
        valid = labels != IGNORE
        assert torch.equal(fused.argmax(1)[valid], labels[valid])
        # and the coarse levels did take part
        assert bool((level < len(strides) - 1).any())


def test_tau_at_least_one_gives_the_finest_level_alone():
    C = 5
    labels = blocky_labels(1, 64, 64, C, block=32, seed=3)
    coarse, unity, finest, strides = gt_pyramid_inputs(labels, (4, 8, 16, 32), C)
    noisy_finest = torch.randn_like(finest)
    for tau in (1.0, 1.5):
        fused, level = fuse(coarse, [torch.ones_like(u) for u in unity], strides, noisy_finest, tau)
        assert torch.equal(fused, noisy_finest)
        assert bool((level == 3).all())


def random_predictions(B=2, H=64, W=64, K=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    strides = (32, 16, 8, 4)
    coarse = [torch.randn(B, K, H // s, W // s, generator=g) for s in strides[:-1]]
    unity = [torch.rand(B, H // s, W // s, generator=g) for s in strides[:-1]]
    finest = torch.randn(B, K, H, W, generator=g)
    return coarse, unity, finest, strides


def test_changing_done_by_coarser_or_mixed_cells_leaves_the_fused_output_unchanged():
    tau = 0.5
    coarse, unity, finest, strides = random_predictions()
    fused, level = fuse(coarse, unity, strides, finest, tau)
    # per level: the cells actually used are unity (>= tau) and not done by a coarser unity cell
    done = done_by_coarser([torch.ones_like(u, dtype=torch.long) for u in unity], strides, "done_by_coarser",
                           unity, tau)
    for index in range(3):
        used = (unity[index] >= tau) & ~done[index]
        assert bool(used.any()) and bool((~used).any())
        changed = [c.clone() for c in coarse]
        changed[index] = torch.where(used[:, None], changed[index], changed[index] + 100.0)
        assert torch.equal(fuse(changed, unity, strides, finest, tau)[0], fused)
        # control: changing a used cell does change the output
        changed[index] = torch.where(used[:, None], changed[index] + 100.0, changed[index])
        assert not torch.equal(fuse(changed, unity, strides, finest, tau)[0], fused)
    # the finest level only matters where no coarse level was used
    fine_done = F.interpolate(done[3][:, None].float(), scale_factor=4)[:, 0].bool() | (level < 3)
    changed = torch.where(fine_done[:, None], finest + 100.0, finest)
    assert torch.equal(fuse(coarse, unity, strides, changed, tau)[0], fused)


def test_fuse_level_map_is_the_coarsest_unity_level_brute_force():
    tau = 0.6
    coarse, unity, finest, strides = random_predictions(B=1, H=32, W=64, seed=5)
    _, level = fuse(coarse, unity, strides, finest, tau)
    for y, x in itertools.product(range(32), range(64)):
        expected = 3
        for index, s in enumerate(strides[:-1]):
            if unity[index][0, y // s, x // s] >= tau:
                expected = index
                break
        assert level[0, y, x] == expected


# ------------------------------------------------------------------ relabelling


def test_relabelling_hand_cases():
    """Strides (16, 8, 4) on a 16 x 48 image: three coarsest cells.
    cell 0: ground-truth unity, predicted 0.95 -> true positive: all its descendants are done;
    cell 1: ground-truth unity, predicted 0.5  -> false negative: nothing below is done;
    cell 2: ground-truth mix,   predicted 0.99 -> false positive: nothing below is done.
    At level 2 (stride 8), the top-left child of cell 1 is a true positive itself: its four stride-4
    children are done."""
    strides = (16, 8, 4)
    gt = [torch.tensor([[[1, 1, 0]]]), torch.zeros(1, 2, 6, dtype=torch.long), torch.zeros(1, 4, 12, dtype=torch.long)]
    gt[1][0, :, 0:4] = 1  # children of the two unity cells are unity
    probs = [torch.tensor([[[0.95, 0.5, 0.99]]]), torch.zeros(1, 2, 6)]
    probs[1][0, 0, 2] = 0.97  # top-left child of cell 1
    done = done_by_coarser(gt, strides, "done_by_coarser", probs, tau=0.9)
    assert done[0].tolist() == [[[False, False, False]]]
    assert done[1][0].tolist() == [[True, True, False, False, False, False]] * 2
    expected = torch.zeros(4, 12, dtype=torch.bool)
    expected[:, 0:4] = True  # below cell 0
    expected[0:2, 4:6] = True  # below the level-2 true positive
    assert torch.equal(done[2][0], expected)

    simple = done_by_coarser(gt, strides, "simple_fix")  # ground-truth unity cells, predictions unused
    assert simple[1][0].tolist() == [[True, True, True, True, False, False]] * 2
    assert bool(simple[2][0, :, :8].all()) and not bool(simple[2][0, :, 8:].any())
    naive = done_by_coarser(gt, strides, "naive")
    assert not any(bool(d.any()) for d in naive)
    # the threshold is the relabelling's: at 0.96 the level-1 cell 0 is no longer a true positive
    done = done_by_coarser(gt, strides, "done_by_coarser", probs, tau=0.96)
    assert not bool(done[1].any()) and int(done[2].sum()) == 4


def test_done_by_coarser_matches_an_ancestor_loop():
    strides = (32, 16, 8, 4)
    labels = blocky_labels(2, 64, 96, 4, block=16, seed=7)
    targets = pyramid_targets(labels, strides, IGNORE)
    g = torch.Generator().manual_seed(1)
    probs = [torch.rand(u.shape, generator=g) for u in targets.unity[:-1]]
    done = done_by_coarser(targets.unity, strides, "done_by_coarser", probs, 0.5)
    for level, s in enumerate(strides):
        for b, i, j in itertools.product(range(2), range(64 // s), range(96 // s)):
            ancestors = [(a, i * s // strides[a], j * s // strides[a]) for a in range(level)]
            expected = any(targets.unity[a][b, y, x] == 1 and probs[a][b, y, x] >= 0.5 for a, y, x in ancestors)
            assert bool(done[level][b, i, j]) == expected


# ------------------------------------------------------------------ the head and Eq. 1


def small_head(K: int = 5, strides=(16, 8, 4), context: bool = True, **kwargs) -> PyramidHead:
    scorers = [LinearScorer(8, K, IGNORE) for _ in strides]
    return PyramidHead(scorers, 6, strides=strides, unity_channels=4, semantic_channels=8, context=context,
                       context_bins=(1, 2), ignore_index=IGNORE, **kwargs)


def leaf_outputs(K: int, H: int, W: int, strides, unity_logit: float | None = None, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    semantic = [torch.randn(1, K, H // s, W // s, generator=g).requires_grad_() for s in strides]
    unity = [
        (torch.full((1, H // s, W // s), unity_logit) if unity_logit is not None else torch.randn(1, H // s, W // s, generator=g))
        .requires_grad_()
        for s in strides[:-1]
    ]
    return {"semantic": semantic, "unity": unity}


def test_loss_is_finite_with_zero_gradient_on_levels_without_valid_cells():
    """A uniform label map and confident unity predictions: the coarsest level is a true positive
    everywhere, so every finer level is done by coarser; Eq. 1 then equals, by hand, CE of the coarsest
    level / L + BCE(coarsest unity, 1) / (L - 1)."""
    strides, K = (16, 8, 4), 5
    head = small_head(K, strides, loss_resolution="full")
    outputs = leaf_outputs(K, 32, 32, strides, unity_logit=5.0)
    target = torch.full((1, 32, 32), 2)
    terms = head.loss(outputs, target)
    loss = terms["ce"] + terms["unity"]
    loss.backward()
    ce0 = F.cross_entropy(outputs["semantic"][0].detach(), torch.full((1, 2, 2), 2))
    bce0 = F.binary_cross_entropy_with_logits(torch.tensor(5.0), torch.tensor(1.0))
    assert torch.isfinite(loss)
    assert torch.allclose(terms["ce"], ce0 / 3) and torch.allclose(terms["unity"], bce0 / 2)
    for finer in outputs["semantic"][1:] + outputs["unity"][1:]:
        assert finer.grad is not None and bool((finer.grad == 0).all())
    assert bool((outputs["semantic"][0].grad != 0).any())


@pytest.mark.parametrize("policy", ["done_by_coarser", "simple_fix", "naive"])
@pytest.mark.parametrize("loss_resolution", ["full", "decoder"])
def test_eq1_matches_a_per_cell_reference(policy, loss_resolution):
    strides, K, H, W = (16, 8, 4), 4, 32, 48
    head = small_head(K, strides, relabel=policy, loss_resolution=loss_resolution, tau=0.5)
    target = blocky_labels(1, H, W, K, block=8, seed=11)
    outputs = leaf_outputs(K, H, W, strides, seed=2)
    terms = head.loss(outputs, target)

    # reference: per cell, its pixel set decides unity and label; an ancestor decides "done"
    cells = [brute_force_cells(target, s) for s in strides]
    probs = [torch.sigmoid(u.detach()) for u in outputs["unity"]]

    def is_done(level, i, j):
        for a in range(level):
            y, x = i * strides[level] // strides[a], j * strides[level] // strides[a]
            gt_unity = cells[a][1][0, y, x] == 1
            if policy == "simple_fix" and gt_unity:
                return True
            if policy == "done_by_coarser" and gt_unity and probs[a][0, y, x] >= 0.5:
                return True
        return False

    ce_sum, bce_sum = 0.0, 0.0
    for level, s in enumerate(strides):
        scores = outputs["semantic"][level].detach()
        if level < len(strides) - 1:
            t = cells[level][0].clone()
            u = cells[level][1].clone()
            for i, j in itertools.product(range(H // s), range(W // s)):
                if is_done(level, i, j):
                    t[0, i, j], u[0, i, j] = IGNORE, UNITY_IGNORE
            ce_sum += F.cross_entropy(scores, t, ignore_index=IGNORE) if bool((t != IGNORE).any()) else 0.0
            valid = u != UNITY_IGNORE
            logits = outputs["unity"][level].detach()
            bce_sum += F.binary_cross_entropy_with_logits(logits[valid], u[valid].float())
        else:
            if loss_resolution == "full":
                scores = F.interpolate(scores, size=(H, W), mode="bilinear", align_corners=False)
                t = target.clone()
            else:  # each cell's majority label (issue 20: the top-left pixel shifted predictions)
                from tests.models.test_label_alignment import brute_force_majority

                t = brute_force_majority(target, (H // s, W // s))
            for y, x in itertools.product(range(t.shape[1]), range(t.shape[2])):
                cell = (y // s, x // s) if loss_resolution == "full" else (y, x)
                if is_done(level, *cell):
                    t[0, y, x] = IGNORE
            ce_sum += F.cross_entropy(scores, t, ignore_index=IGNORE)
    assert torch.allclose(terms["ce"], torch.as_tensor(ce_sum / 3), atol=1e-5)
    assert torch.allclose(terms["unity"], torch.as_tensor(bce_sum / 2), atol=1e-5)


def test_unity_head_is_min_over_the_cell_of_the_pixel_to_centroid_classifier():
    torch.manual_seed(0)
    head = UnityHead(6, 4, factors=(4, 2)).eval()
    x = torch.randn(2, 6, 8, 8)
    out = head(x)
    xu = head.project(x)
    for level, f in enumerate((4, 2)):
        assert out[level].shape == (2, 8 // f, 8 // f)
        for b, i, j in itertools.product(range(2), range(8 // f), range(8 // f)):
            patch = xu[b : b + 1, :, i * f : (i + 1) * f, j * f : (j + 1) * f]
            centroid = head.centroid(patch.mean(dim=(2, 3), keepdim=True))
            logits = head.classifier(head.pixel(patch) - centroid)
            assert torch.allclose(out[level][b, i, j], logits.min(), atol=1e-5)


def test_simplest_semantic_head_has_no_context_module():
    with_context, simplest = small_head(context=True), small_head(context=False)
    assert hasattr(with_context.semantic_head, "aggregate") and not hasattr(simplest.semantic_head, "aggregate")
    assert sum(p.numel() for p in simplest.parameters()) < sum(p.numel() for p in with_context.parameters())
    x = torch.randn(2, 6, 8, 8)
    for head in (with_context, simplest):
        out = head(x)
        assert [tuple(s.shape) for s in out["semantic"]] == [(2, 5, 2, 2), (2, 5, 4, 4), (2, 5, 8, 8)]
        assert [tuple(u.shape) for u in out["unity"]] == [(2, 2, 2), (2, 4, 4)]


def test_contextual_module_passes_coarse_context_to_finer_levels():
    """Eq. 4-5: the finest level's output depends on the features everywhere (through the pooled
    context), not only on its own cell; without the module it depends on its own pixel only."""
    torch.manual_seed(0)
    x = torch.randn(1, 6, 8, 8)
    moved = x.clone()
    moved[..., 0, 0] += 5.0
    for context, expect_change in ((True, True), (False, False)):
        head = small_head(context=context).eval()
        far = head(x)["semantic"][-1][..., 7, 7]
        assert torch.equal(far, head(moved)["semantic"][-1][..., 7, 7]) != expect_change


# ------------------------------------------------------------------ the model


def pyramid_model(C: int, *overrides: str):
    cfg = load_config(None, [
        "model.head.structure=pyramid", "model.head.pyramid.semantic_channels=16",
        "model.head.pyramid.unity_channels=8", "model.decoder.channels=16", "model.decoder.low_level_channels=8",
        *overrides,
    ])
    return build_model(cfg.model, C, IGNORE), cfg


@pytest.mark.parametrize("scorer", ["linear", "embedding"])
def test_a_few_steps_lower_the_loss_on_a_fixed_batch(scorer):
    torch.manual_seed(0)
    model, _ = pyramid_model(8, f"model.head.scorer={scorer}", "model.head.pyramid.relabel=naive",
                             "model.head.embedding.num_neighbours=3")
    # the linear classifier starts at std 0.01 (as published) and needs a larger step to move in 35 steps
    opt = torch.optim.SGD(model.parameters(), lr=0.2 if scorer == "linear" else 0.05, momentum=0.9)
    images, target = torch.randn(4, 3, 64, 64), blocky_labels(4, 64, 64, 8, block=16, seed=0)
    losses = []
    for _ in range(35):
        terms = model.loss(model(images), target)
        opt.zero_grad()
        terms["loss"].backward()
        opt.step()
        losses.append((terms["ce"].item(), terms["unity"].item()))
    assert losses[-1][0] < 0.6 * losses[0][0] and losses[-1][1] < 0.6 * losses[0][1], losses


def test_embedding_scorers_share_one_class_table_listed_once():
    model, cfg = pyramid_model(50, "model.head.scorer=embedding")
    tables = {id(s.class_embeddings) for s in model.head.scorers}
    assert len(tables) == 1
    groups = model.param_groups()
    ids = [id(p) for params in groups.values() for p in params]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    assert groups["class_embeddings"] == [model.head.scorers[0].class_embeddings]
    build_optimizer(model, cfg.optim)  # a parameter in two groups would raise here


@pytest.mark.parametrize("scorer", ["linear", "embedding"])
def test_model_on_odd_sizes_pads_and_crops(scorer):
    model, _ = pyramid_model(
        7, f"model.head.scorer={scorer}", "model.head.embedding.embed_dim=6", "model.head.embedding.num_neighbours=3"
    )
    images, target = torch.randn(2, 3, 45, 70), torch.randint(0, 7, (2, 45, 70))
    out = model(images)
    assert out["semantic"][0].shape[-2:] == (2, 3) and out["semantic"][-1].shape[-2:] == (16, 24)  # 64 x 96 padded
    terms = model.loss(out, target)
    terms["loss"].backward()
    assert torch.isfinite(terms["loss"]) and {"ce", "unity"} <= set(terms)
    model.eval()
    dense, counts = model.dense_with_counts(images)
    assert dense.shape == (2, 7 if scorer == "linear" else 6, 45, 70)
    assert torch.equal(model.dense(images), dense)
    fractions = model.head.summarize_counts(counts)
    assert set(fractions) == {"level_stride_32", "level_stride_16", "level_stride_8", "level_stride_4"}
    assert sum(fractions.values()) == pytest.approx(100.0, abs=0.02)
    assert int(counts["level_pixels"].sum()) == 2 * 45 * 70


def test_multi_scale_flip_and_slide_fuse_each_view():
    """Each view is fused on its own, then the dense maps are averaged: with scales (1, 0.5) and flip,
    the result equals the mean of the four per-view fused maps brought back to the image."""
    torch.manual_seed(0)
    model, _ = pyramid_model(5)
    model.eval()
    images = torch.randn(1, 3, 40, 56)
    cfg = EvalConfig(scales=(1.0, 0.5), flip=True)
    dense = infer_dense(model, images, cfg)
    views = []
    for scale in (1.0, 0.5):
        scaled = images if scale == 1 else F.interpolate(images, size=(20, 28), mode="bilinear", align_corners=False)
        for flip in (False, True):
            fused, _ = model.head.fuse_outputs(model(scaled.flip(-1) if flip else scaled), scaled.shape[-2:])
            fused = fused.flip(-1) if flip else fused
            views.append(F.interpolate(fused, size=(40, 56), mode="bilinear", align_corners=False) if scale != 1 else fused)
    assert torch.allclose(dense, torch.stack(views).mean(0), atol=1e-6)
    slide = predict_labels(model, images, EvalConfig(mode="slide", crop_size=(32, 32), stride=(16, 16)))
    assert slide.shape == (1, 40, 56)


@pytest.mark.parametrize("loss", ["knn", "full"])
def test_pyramid_with_embedding_scorer_never_builds_c_by_pixels(loss):
    C, B, H, W = 100_000, 2, 32, 32
    torch.manual_seed(0)
    model, cfg = pyramid_model(
        C, "model.head.scorer=embedding", f"model.head.embedding.loss={loss}", "model.head.loss_resolution=full",
        "model.head.embedding.search_budget_mb=16",
        "model.head.embedding.search_index=auto",  # the class index at 100,000: no exact C x C refresh (minutes)
    )
    opt = build_optimizer(model, cfg.optim)
    images, target = torch.randn(B, 3, H, W), torch.randint(0, C, (B, H, W))
    target[:, :16] = 5  # unity cells exist
    with LargestTensor() as probe:
        model.loss(model(images), target)["loss"].backward()
        opt.step()
        model.eval()
        labels = predict_labels(model, images, EvalConfig())
    assert "aten.convolution_backward" in probe.ops
    assert labels.shape == (B, H, W) and int(labels.max()) < C
    assert probe.numel < C * B * H * W / 20, (probe.numel, probe.op)
    assert probe.numel <= max(16 * 2**20 // 4, C * 12), (probe.numel, probe.op)


# ------------------------------------------------------------------ backbones for the pyramid (section 5.1.2)


@pytest.mark.parametrize(
    "backbone, widths",
    [("hrnet_tiny", (8, 16, 32, 64)), ("resnet_tiny", (6, 8, 10, 12))],
)
def test_stride_4_fusion_decoder_feeds_the_pyramid(backbone, widths):
    """HRNet: its four branches upsampled to stride 4 and concatenated; ResNet (standard, output stride
    32): each stage reduced to the fusion widths first (the 'light decoder')."""
    torch.manual_seed(0)
    model, _ = pyramid_model(
        6, f"model.backbone={backbone}", "model.output_stride=32", "model.decoder.type=hrnet_fusion",
        "model.decoder.fusion_channels=[6,8,10,12]",
    )
    assert model.decoder.out_channels == sum(widths)
    images = torch.randn(2, 3, 50, 66)
    stages = model.backbone(F.pad(images, (0, 30, 0, 14)))  # padded to 64 x 96
    assert [s.shape[-1] for s in stages] == [24, 12, 6, 3]
    features = model.decoder(stages)
    assert features.shape == (2, sum(widths), 16, 24)
    # the stride-4 part of the features is the (reduced) first stage itself
    first = stages[0] if model.decoder.reduce is None else model.decoder.reduce[0](stages[0])
    assert torch.equal(features[:, : first.shape[1]], first)
    terms = model.loss(model(images), torch.randint(0, 6, (2, 50, 66)))
    terms["loss"].backward()
    assert torch.isfinite(terms["loss"])
    assert model.backbone.conv1.weight.grad is not None


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.backbone=hrnet_tiny", "model.output_stride=32"], "decoder.type: hrnet_fusion"),
        (["model.decoder.type=hrnet_fusion"], "output_stride: 32"),
        (["model.backbone=mobilenet_v2", "model.decoder.type=hrnet_fusion", "model.output_stride=32"], "mobilenet_v2"),
        (["model.head.pyramid.strides=[8,16,32]"], "stride 4"),
        (["model.head.pyramid.strides=[4,12,16]"], "not a multiple"),
        (["model.head.pyramid.tau=0"], "tau"),
    ],
)
def test_config_errors_name_the_key_and_the_fix(overrides, message):
    from scaleseg.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


@pytest.mark.parametrize("name", ["ade20k_hrnet48", "ade20k_r101"])
def test_paper_configs_build_the_papers_model(name):
    """Section 5.1.3: D = 720 backbone features for both backbones, D_u 64, D_s 512, L = 4, tau 0.9."""
    from pathlib import Path

    cfg = load_config(Path(__file__).parents[2] / "configs" / "pyramid" / f"{name}.yaml", ["model.pretrained=null"])
    assert (cfg.data.batch_size, cfg.data.train_pipeline.crop_size) == (16, (512, 512))
    model = build_model(cfg.model, cfg.data.num_classes, cfg.data.ignore_index)
    head = model.head
    assert model.decoder.out_channels == 720
    assert head.strides == (32, 16, 8, 4) and head.tau == 0.9 and head.relabel_policy == "done_by_coarser"
    assert head.unity_head.project[0].out_channels == 64 and head.semantic_head.project[0].out_channels == 512
    assert [s.classifier.out_channels for s in head.scorers] == [150] * 4
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 64))
    assert [tuple(s.shape[-2:]) for s in out["semantic"]] == [(2, 2), (4, 4), (8, 8), (16, 16)]


@pytest.mark.parametrize("name", ["cocostuff10k_hrnet48", "cocostuff10k_r101"])
def test_the_coco_stuff_pyramid_configs_use_the_papers_171_classes(name):
    """S&F section 5: COCO-Stuff with "91 stuff and 80 thing classes" (the HRNet-OCR protocol), where the
    ESS paper's COCO-Stuff 10k runs use 182."""
    from pathlib import Path

    from scaleseg.data.datasets.cocostuff import CLASSES_171

    cfg = load_config(Path(__file__).parents[2] / "configs" / "pyramid" / f"{name}.yaml", ["model.pretrained=null"])
    assert cfg.data.dataset == "cocostuff10k" and cfg.data.num_classes == len(CLASSES_171) == 171
    ess = load_config(Path(__file__).parents[2] / "configs" / "_base_" / "datasets" / "cocostuff10k.yaml", [])
    assert ess.data.num_classes == 182


# ------------------------------------------------------------------ S&F Table 9 and the unity head's precision / recall


def _reference_table9(model, out, target, C: int, tau: float):
    """Per-pixel reference: the level each pixel is assigned by the predicted unity (coarsest cell with
    p >= tau), each level's own decision (argmax of the logits, or the nearest unit class embedding) repeated
    over its cells, then the plain metrics over each group; unity precision / recall from a per-cell loop."""
    from scaleseg.metrics import SegmentationMetrics

    head = model.head
    strides = head.strides
    B, H, W = target.shape
    L = len(strides)
    probs = [torch.sigmoid(u) for u in out["unity"]]
    ys, xs = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    level = torch.full((B, H, W), L - 1)
    for index in reversed(range(L - 1)):
        s = strides[index]
        unity = probs[index][:, ys // s, xs // s] >= tau  # (B, H, W)
        level[unity] = index

    def decision(scores):
        if head.scorers[-1].class_table() is None:  # linear: the logits' argmax
            return scores.argmax(1)
        classes = F.normalize(head.scorers[-1].class_embeddings, dim=1)
        return torch.einsum("bdhw,cd->bchw", F.normalize(scores, dim=1), classes).argmax(1)

    preds = [decision(scores)[:, ys // s, xs // s] for scores, s in zip(out["semantic"][:-1], strides[:-1])]
    finest = out["semantic"][-1]
    size = (finest.shape[-2] * strides[-1], finest.shape[-1] * strides[-1])
    preds.append(decision(F.interpolate(finest, size=size, mode="bilinear", align_corners=False)[..., :H, :W]))
    table = {}
    for g, s in enumerate(strides):
        for j, s2 in enumerate(strides):
            metrics = SegmentationMetrics(C, IGNORE)
            metrics.update(preds[j], torch.where(level == g, target, torch.full_like(target, IGNORE)))
            value = metrics.compute()["mIoU"]
            if value == value:
                table[(s, s2)] = 100 * value
    unity = {}
    for index, s in enumerate(strides[:-1]):
        _, truth = brute_force_cells(target, s)
        predicted = (probs[index] >= tau)[:, : truth.shape[1], : truth.shape[2]]  # padded cells are empty
        known = truth != UNITY_IGNORE
        tp, pred, true = (int(m.sum()) for m in (predicted & known & (truth == 1), predicted & known, known & (truth == 1)))
        unity[s] = (100 * tp / pred if pred else None, 100 * tp / true if true else None)  # None: nothing to count
    return table, unity, level


@pytest.mark.parametrize("scorer", ["linear", "embedding"])
def test_table9_and_unity_precision_recall_match_a_per_pixel_reference(scorer):
    torch.manual_seed(3)
    C = 6
    model, _ = pyramid_model(C, f"model.head.scorer={scorer}", "model.head.embedding.embed_dim=5",
                             "model.head.embedding.num_neighbours=3")
    model.eval()
    images = torch.randn(2, 3, 45, 70)
    target = blocky_labels(2, 45, 70, C, block=16, seed=1)
    with torch.no_grad():
        out = model(images)
        _, own = model.dense_with_counts(images, target)  # what evaluation calls
        assert torch.equal(own["table9"], model.head.dense_with_counts(out, (45, 70), target)[1]["table9"])
        # unity logits spread so that every level decides some pixels (the untrained head's are alike)
        g = torch.Generator().manual_seed(0)
        out["unity"] = [3 * torch.randn(u.shape, generator=g) for u in out["unity"]]
        dense, counts = model.head.dense_with_counts(out, (45, 70), target)
    tau = model.head.tau
    assert torch.equal(dense, model.head.dense(out, (45, 70)))  # the labels change nothing but the counts
    summary = model.head.summarize_counts(counts)
    table, unity, level = _reference_table9(model, out, target, C, tau)
    assert len(level.unique()) == 4
    got = {(int(k.split("pixels")[1].split("_")[0]), int(k.split("level")[1])): v
           for k, v in summary.items() if k.startswith("table9_")}
    assert set(got) == set(table) and len(table) >= 3 * 4
    for key, want in table.items():
        assert got[key] == pytest.approx(want, abs=0.006), key
    assert sum(p is not None for p, _ in unity.values()) >= 2
    for s, (precision, recall) in unity.items():
        for name, want in (("precision", precision), ("recall", recall)):
            key = f"unity_{name}_stride_{s}"
            assert (key not in summary) if want is None else summary[key] == pytest.approx(want, abs=0.006), key
    lines = "\n".join(model.head.describe_counts(summary))
    assert "S&F Table 9" in lines and "unity head precision / recall" in lines
    # evaluation's one-view call passes the labels through to the same tallies
    from scaleseg.engine.inference import predict_labels_with_counts

    labels, again = predict_labels_with_counts(model, images, EvalConfig(), target)
    assert torch.equal(again["table9"], own["table9"]) and torch.equal(again["unity_tp"], own["unity_tp"])
    assert torch.equal(labels, predict_labels(model, images, EvalConfig()))


# ------------------------------------------------------------------ ANL and ANL-multi (S&F Table 6's other columns)


def test_asymmetric_non_local_block_matches_its_equations_written_out():
    """APNB (ANL, Zhu et al. 2019): attention of every pixel over the pyramid-pooled keys, written here with
    F.adaptive_avg_pool2d and explicit softmax, against the module with the same weights."""
    from scaleseg.models.heads.pyramid import AsymmetricNonLocal

    torch.manual_seed(0)
    block = AsymmetricNonLocal(8, (1, 3, 6)).eval()
    x = torch.randn(2, 8, 11, 13)
    with torch.no_grad():
        k = block.key(x)  # (2, 4, 11, 13)
        v = block.value(x)
        keys, values = (torch.cat([F.adaptive_avg_pool2d(t, b).flatten(2) for b in (1, 3, 6)], dim=2)
                        for t in (k, v))  # (2, 4, 46)
        logits = torch.einsum("bcn,bcs->bns", k.flatten(2), keys) / 2.0  # sqrt(4)
        weights = logits.exp() / logits.exp().sum(dim=2, keepdim=True)
        attended = torch.einsum("bns,bcs->bcn", weights, values).reshape(2, 4, 11, 13)
        want = block.fuse(torch.cat([block.out(attended), x], dim=1))
        got = block(x)
    assert keys.shape[-1] == 1 + 9 + 36
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_anl_context_modes_place_the_blocks_as_table6_says():
    """"anl": one block on the head's input, seen by the unity and the semantic head alike; "anl_multi": one
    block per pyramid level in the semantic head, no coarse-to-fine module; both train."""
    from scaleseg.models.heads.pyramid import AsymmetricNonLocal

    torch.manual_seed(0)
    single, _ = pyramid_model(6, "model.head.pyramid.context=anl")
    head = single.head
    assert isinstance(head.anl, AsymmetricNonLocal) and not hasattr(head.semantic_head, "aggregate")
    assert not hasattr(head.semantic_head, "anl") and not hasattr(head.semantic_head, "anl_levels")
    seen = {}
    head.unity_head.register_forward_pre_hook(lambda m, args: seen.__setitem__("unity", args[0]))
    head.semantic_head.register_forward_pre_hook(lambda m, args: seen.__setitem__("semantic", args[0]))
    head.anl.register_forward_hook(lambda m, args, out: seen.__setitem__("anl", out))
    images, target = torch.randn(2, 3, 64, 64), torch.randint(0, 6, (2, 64, 64))
    single(images)
    assert seen["unity"] is seen["anl"] and seen["semantic"] is seen["anl"]
    multi, _ = pyramid_model(6, "model.head.pyramid.context=anl_multi")
    sem = multi.head.semantic_head
    assert len(sem.anl_levels) == 4 and not hasattr(sem, "aggregate") and not hasattr(multi.head, "anl")
    channels = [m.fuse[0].out_channels for m in sem.anl_levels]
    assert channels == [16] * 4  # on D_s, each level's own
    for model in (single, multi):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
        model.train()
        terms = model.loss(model(images), target)
        terms["loss"].backward()
        anl_params = [p for n, p in model.named_parameters() if ".anl" in n]
        assert anl_params and all(p.grad is not None and torch.isfinite(p.grad).all() for p in anl_params)
        optimizer.step()
    # the single-level output behind the semantic head takes the same modes (Table 6's first row)
    cfg = load_config(None, ["model.head.single_head=semantic", "model.head.pyramid.semantic_channels=16",
                             "model.decoder.channels=16", "model.decoder.low_level_channels=8",
                             "model.head.pyramid.context=anl"])
    plain_row = build_model(cfg.model, 6, IGNORE)
    assert isinstance(plain_row.head.semantic_head.anl, AsymmetricNonLocal)
    assert plain_row(images)["scores"].shape == (2, 6, 16, 16)
