import math

import pytest
import torch
import torch.nn.functional as F

from scaleseg.losses import knn_cross_entropy
from scaleseg.losses.knn_ce import nearest_negatives, random_negatives
from tests.memory_probe import LargestTensor


def eq6_reference(x, E, t, k, tau, ignore, distance):
    """Eq. 6 evaluated directly, pixel by pixel in float64: the target plus the k classes nearest
    to x other than the target, softmax over those k + 1 logits."""
    losses = []
    for i in range(x.shape[0]):
        if int(t[i]) == ignore:
            continue
        d2 = ((x[i][None] - E) ** 2).sum(1)  # (C,)
        order = [int(c) for c in torch.argsort(d2.detach()) if int(c) != int(t[i])][:k]
        cand = [int(t[i])] + order
        dist = d2[cand] if distance == "squared" else d2[cand].sqrt()
        logits = -dist / tau
        losses.append(-(logits[0] - torch.logsumexp(logits, 0)))
    return torch.stack(losses).mean()


def make_case(n=120, C=30, d=8, seed=0, near_target=True):
    g = torch.Generator().manual_seed(seed)
    E = F.normalize(torch.randn(C, d, generator=g), dim=1)
    t = torch.randint(0, C, (n,), generator=g)
    t[:10] = 0  # class 0 (the published code's t - 1 bug put the target in twice here)
    noise = torch.randn(n, d, generator=g)
    x = F.normalize(E[t] * 2 + noise * 0.6, dim=1) if near_target else F.normalize(noise, dim=1)
    t[-15:] = 255  # ignored pixels
    return x, E, t


@pytest.mark.parametrize("distance", ["squared", "euclidean"])
@pytest.mark.parametrize("near_target", [True, False])
def test_matches_direct_eq6_loss_and_gradients(distance, near_target):
    x, E, t = make_case(near_target=near_target)
    k, tau = 5, 0.05
    xa, Ea = x.clone().requires_grad_(), E.clone().requires_grad_()
    loss = knn_cross_entropy(xa, Ea, t, k, tau, 255, "nearest", distance)
    loss.backward()
    xr, Er = x.double().requires_grad_(), E.double().requires_grad_()
    ref = eq6_reference(xr, Er, t, k, tau, 255, distance)
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    torch.testing.assert_close(xa.grad.double(), xr.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(Ea.grad.double(), Er.grad, rtol=1e-4, atol=1e-6)
    if near_target:  # the case the published code got wrong: the target is the nearest class
        found = torch.cdist(x, E).argmin(1)
        assert (found[t != 255] == t[t != 255]).float().mean() > 0.5


def test_negatives_exclude_the_target_and_are_distinct():
    x, E, t = make_case()
    valid = t != 255
    neg = nearest_negatives(x[valid], E, t[valid], 6)
    assert neg.shape == (int(valid.sum()), 6)
    assert not (neg == t[valid][:, None]).any()
    assert all(len(set(row.tolist())) == 6 for row in neg)
    d = torch.cdist(x[valid], E)
    d[torch.arange(len(neg)), t[valid]] = math.inf
    torch.testing.assert_close(d.gather(1, neg), d.sort(1).values[:, :6])


def test_random_negatives_are_distinct_uniform_non_targets():
    g = torch.Generator().manual_seed(0)
    t = torch.randint(0, 12, (20_000,), generator=g)
    neg = random_negatives(t, 12, 4, generator=g)
    assert not (neg == t[:, None]).any()
    assert ((neg >= 0) & (neg < 12)).all()
    assert (neg.sort(1).values.diff(dim=1) > 0).all()  # distinct within a row
    # each non-target class is chosen with probability 4/11: check for the rows with target 3
    rows = neg[t == 3]
    freq = torch.bincount(rows.flatten(), minlength=12).double() / len(rows)
    assert freq[3] == 0
    others = torch.cat([freq[:3], freq[4:]])
    assert torch.allclose(others, torch.full_like(others, 4 / 11), atol=0.03)


def test_random_negatives_loss_uses_k_plus_one_logits():
    x, E, t = make_case()
    loss = knn_cross_entropy(x, E, t, 5, ignore_index=255, negatives="random", generator=torch.Generator().manual_seed(0))
    assert math.isfinite(loss.item()) and loss.item() > 0


def test_all_ignored_gives_zero_with_zero_gradient():
    x, E = torch.randn(5, 4, requires_grad=True), torch.randn(9, 4, requires_grad=True)
    loss = knn_cross_entropy(x, E, torch.full((5,), 255), 3, ignore_index=255)
    assert loss.item() == 0.0
    loss.backward()
    assert not x.grad.any() and not E.grad.any()


def test_ignored_pixels_are_not_searched():
    x, E, t = make_case(n=200)
    t[:] = 255
    t[:3] = 1
    with LargestTensor() as probe:
        knn_cross_entropy(x, E, t, 4, ignore_index=255)
    # the search saw 3 pixels, not 200: no tensor as large as 200 x C
    assert probe.numel < 200 * E.shape[0]


def test_argument_errors():
    x, E, t = make_case()
    with pytest.raises(ValueError, match="k = 30"):
        knn_cross_entropy(x, E, t, 30, ignore_index=255)
    with pytest.raises(ValueError, match="distance"):
        knn_cross_entropy(x, E, t, 3, ignore_index=255, distance="cosine")
    bad = t.clone()
    bad[0] = 77
    with pytest.raises(ValueError, match="target value 77"):
        knn_cross_entropy(x, E, bad, 3, ignore_index=255)
