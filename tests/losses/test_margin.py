import pytest
import torch
import torch.nn.functional as F

from scaleseg.losses import margin_regularizer
from tests.memory_probe import LargestTensor


def eq7_reference(E, m):
    d = torch.cdist(E, E)  # (C, C)
    d = d + torch.diag(torch.full((E.shape[0],), float("inf"), dtype=E.dtype))
    return torch.relu(m - d.min(1).values).mean()


@pytest.mark.parametrize("C,d,m", [(40, 3, 0.6), (200, 4, 0.3), (2, 5, 3.0)])
def test_matches_the_c_by_c_formula(C, d, m):
    g = torch.Generator().manual_seed(C)
    E = F.normalize(torch.randn(C, d, generator=g), dim=1)
    Ea, Er = E.clone().requires_grad_(), E.double().clone().requires_grad_()
    loss = margin_regularizer(Ea, m, budget_bytes=2048)
    ref = eq7_reference(Er, m)
    assert ref.item() > 0  # the margin is active for some classes
    loss.backward()
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    torch.testing.assert_close(Ea.grad.double(), Er.grad, rtol=1e-4, atol=1e-6)


def test_many_classes_without_a_c_by_c_matrix():
    # C = 100,000 is covered by the one-training-step test in tests/models/test_embedding_scorer.py
    C = 20_000
    E = F.normalize(torch.randn(C, 12), dim=1).requires_grad_()
    with LargestTensor() as probe:
        loss = margin_regularizer(E, 0.2, budget_bytes=2**22)
        loss.backward()
    assert probe.numel <= max(2**22 // 4, C * 12) and probe.numel < C * C / 100
    assert E.grad.shape == E.shape and torch.isfinite(E.grad).all()


def test_single_class_and_duplicates():
    assert margin_regularizer(torch.randn(1, 4), 0.2).item() == 0.0
    E = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], requires_grad=True)
    loss = margin_regularizer(E, 0.2)
    assert loss.item() == pytest.approx(0.4 / 3, rel=1e-4)  # two identical classes at distance ~0, the third far
    loss.backward()
    assert torch.isfinite(E.grad).all()
