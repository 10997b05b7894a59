"""The cached max-margin regulariser (ESS Eq. 7 at O(C d) per step) against brute-force Eq. 7."""

import pytest
import torch
import torch.nn.functional as F

from scaleseg.losses import MarginCache, margin_regularizer
from scaleseg.losses.margin import margin_hinge, nearest_other_classes
from scaleseg.search import ClassIndex
from tests.memory_probe import LargestTensor


def eq7_brute_force(E, m):
    """ESS Eq. 7 from the full C x C distance matrix, in float64."""
    d = torch.cdist(E, E) + torch.diag(torch.full((E.shape[0],), float("inf"), dtype=E.dtype))
    return torch.relu(m - d.min(1).values).mean()


def table(C=300, d=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(C, d, generator=g), dim=1)


@pytest.mark.parametrize("candidates", [1, 3])
def test_right_after_a_refresh_value_and_gradient_are_exact(candidates):
    E = table()
    cache = MarginCache(300, refresh=5, candidates=candidates)
    Ea, Er = E.clone().requires_grad_(), E.double().clone().requires_grad_()
    loss = cache(Ea, 0.4)  # the first step refreshes
    ref = eq7_brute_force(Er, 0.4)
    assert ref.item() > 0.01
    loss.backward()
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    torch.testing.assert_close(Ea.grad.double(), Er.grad, rtol=1e-4, atol=1e-6)
    assert int(cache.steps) == 1 and (cache.partners >= 0).all()


def test_between_refreshes_a_lower_bound_then_exact_again():
    """SGD on the table: the cached pairs go stale (the cached value can only be lower, each d_i^cached
    >= d_i), and the refresh at step `refresh` restores the exact value."""
    E = table(C=200, d=4, seed=1).requires_grad_()
    cache = MarginCache(200, refresh=4)
    opt = torch.optim.SGD([E], lr=2.0)
    gaps = []
    for step in range(9):
        with torch.no_grad():
            exact = eq7_brute_force(E.double(), 0.5).item()
        loss = cache(E, 0.5)
        if step % 4 == 0:
            assert loss.item() == pytest.approx(exact, rel=1e-5), step  # refreshed at steps 0, 4, 8
        else:
            assert loss.item() <= exact + 1e-6, step
        gaps.append(exact - loss.item())
        opt.zero_grad()
        (loss - 0.3 * E.pow(3).sum()).backward()  # move the classes around
        opt.step()
        with torch.no_grad():
            E.copy_(F.normalize(E, dim=1))
    assert max(gaps) > 1e-4  # the pairs did go stale in between
    assert int(cache.steps) == 9


def test_refresh_one_is_the_exact_regulariser_every_step():
    E = table(C=100, seed=2)
    cache = MarginCache(100, refresh=1)
    for shift in (0.0, 0.3, 0.6):
        moved = F.normalize(E + shift * torch.roll(E, 1, 0), dim=1)
        assert cache(moved, 0.5).item() == pytest.approx(eq7_brute_force(moved.double(), 0.5).item(), rel=1e-5)


def test_outside_training_exact_and_state_untouched():
    E = table(C=80, seed=3)
    cache = MarginCache(80, refresh=10)
    cache(E, 0.5)
    state = {k: v.clone() for k, v in cache.state_dict().items()}
    moved = F.normalize(E + 0.5 * torch.roll(E, 1, 0), dim=1)
    assert cache(moved, 0.5, training=False).item() == pytest.approx(eq7_brute_force(moved.double(), 0.5).item(), rel=1e-5)
    assert all(torch.equal(state[k], v) for k, v in cache.state_dict().items())


def test_state_round_trips_through_a_state_dict():
    E = table(C=120, seed=4)
    a = MarginCache(120, refresh=7)
    a(E, 0.5)
    b = MarginCache(120, refresh=7)
    b.load_state_dict(a.state_dict())
    moved = F.normalize(E + 0.2 * torch.roll(E, 1, 0), dim=1)
    assert torch.equal(a(moved, 0.5), b(moved, 0.5))  # the same stale pairs: the same value
    assert int(a.steps) == int(b.steps) == 2


def test_memory_bounded_at_many_classes():
    C = 20_000
    E = F.normalize(torch.randn(C, 12), dim=1).requires_grad_()
    cache = MarginCache(C, refresh=50)
    cache(E, 0.2)  # the refresh (the C x C search, bounded by its budget)
    with LargestTensor() as probe:  # a step between refreshes: O(C d)
        loss = cache(E, 0.2, budget_bytes=2**22)
        loss.backward()
    assert probe.numel <= C * 12
    assert "aten.topk" not in probe.ops and "aten.addmm" not in probe.ops  # no search at all
    # (the exact regulariser's bound: tests/losses/test_margin.py::test_many_classes_without_a_c_by_c_matrix)


def test_hinge_graph_holds_only_the_active_pairs():
    E = table(C=500, d=3, seed=5).requires_grad_()
    partners = nearest_other_classes(E.detach(), 1)
    with LargestTensor() as probe:
        loss = margin_hinge(E, partners, 0.03)  # a small margin: few active pairs
    active = torch.cdist(E, E).fill_diagonal_(9).min(1).values < 0.03
    assert 0 < int(active.sum()) < 100
    assert loss.item() == pytest.approx(eq7_brute_force(E.detach().double(), 0.03).item(), rel=1e-5)
    assert probe.numel <= 500 * 3  # the distances of all pairs without gradient, one row each
    loss.backward()
    touched = torch.zeros(500, dtype=torch.bool)
    touched[active] = True
    touched[partners[active, 0]] = True
    assert torch.equal(E.grad.abs().sum(1) > 0, touched)  # gradient to both ends of the active pairs only


def test_refresh_through_the_class_index():
    C = 3000
    g = torch.Generator().manual_seed(6)
    centres = F.normalize(torch.randn(30, 12, generator=g), dim=1)
    E = F.normalize(centres[torch.randint(0, 30, (C,), generator=g)] + 0.1 * torch.randn(C, 12, generator=g), dim=1)
    index = ClassIndex(C, 12, probes=8)
    index.rebuild(E)
    approx = nearest_other_classes(E, 1, index=index)
    exact = nearest_other_classes(E, 1)
    assert (approx != torch.arange(C)[:, None]).all()
    assert (approx == exact).float().mean() > 0.95
    cache = MarginCache(C, refresh=3)
    value = cache(E, 0.3, index=index).item()
    assert value <= eq7_brute_force(E.double(), 0.3).item() + 1e-6  # approximate pairs: never above Eq. 7


def test_float64_gradcheck():
    E = table(C=12, d=3, seed=7).double().requires_grad_()
    assert torch.autograd.gradcheck(lambda e: margin_regularizer(e, 0.9), (E,))
    cache = MarginCache(12, refresh=2, candidates=2)
    assert torch.autograd.gradcheck(lambda e: cache(e, 0.9, training=False), (E,))
    partners = nearest_other_classes(E.detach(), 2)
    assert torch.autograd.gradcheck(lambda e: margin_hinge(e, partners, 0.9), (E,))


def test_bad_arguments():
    with pytest.raises(ValueError, match="refresh"):
        MarginCache(10, refresh=0)
    assert MarginCache(1)(torch.randn(1, 3), 0.2).item() == 0.0
