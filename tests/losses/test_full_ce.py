import pytest
import torch
import torch.nn.functional as F

from scaleseg.losses import full_cross_entropy
from tests.memory_probe import LargestTensor


def materialised(x, E, t, tau, distance, ignore=255):
    d2 = ((x[:, None, :] - E[None]) ** 2).sum(-1)  # (N, C): what the chunked loss never builds
    logits = -d2 / tau if distance == "squared" else -d2.sqrt() / tau
    return F.cross_entropy(logits, t, ignore_index=ignore)


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("distance", ["squared", "euclidean"])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("budget", [256 * 2**20, 3000])  # one tile; many tiles in both directions
def test_equals_cross_entropy_on_materialised_logits(distance, normalize, budget):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(300, 10, generator=g)
    E = torch.randn(257, 10, generator=g)
    if normalize:
        x, E = F.normalize(x, dim=1), F.normalize(E, dim=1)
    else:
        x, E = x * 0.3, E * 0.3
    t = torch.randint(0, 257, (300,), generator=g)
    t[::7] = 255
    xa, Ea = x.clone().requires_grad_(), E.clone().requires_grad_()
    loss = full_cross_entropy(xa, Ea, t, 0.05, 255, distance, budget_bytes=budget)
    loss.backward()
    xr, Er = x.clone().requires_grad_(), E.clone().requires_grad_()
    ref = materialised(xr, Er, t, 0.05, distance)
    ref.backward()
    assert abs(loss.item() - ref.item()) / abs(ref.item()) < 1e-5
    assert rel(xa.grad, xr.grad) < 1e-5
    assert rel(Ea.grad, Er.grad) < 1e-5


def test_never_materialises_pixels_by_classes():
    g = torch.Generator().manual_seed(0)
    n, C = 4096, 20_000
    x = F.normalize(torch.randn(n, 12, generator=g), dim=1).requires_grad_()
    E = F.normalize(torch.randn(C, 12, generator=g), dim=1).requires_grad_()
    t = torch.randint(0, C, (n,), generator=g)
    with LargestTensor() as probe:  # our tiles (PyTorch's chunked linear CE is one opaque op to the probe)
        full_cross_entropy(x, E, t, budget_bytes=2**22, implementation="tiled").backward()
    assert "aten.addmm" in probe.ops  # the tiles were computed under the probe, backward included
    assert probe.numel <= max(2**22 // 4, C * 12) and probe.numel < n * C / 50


def test_all_ignored_and_bad_target():
    x, E = torch.randn(4, 3, requires_grad=True), torch.randn(5, 3, requires_grad=True)
    loss = full_cross_entropy(x, E, torch.full((4,), 255), ignore_index=255)
    assert loss.item() == 0.0
    loss.backward()
    assert not x.grad.any()
    with pytest.raises(ValueError, match="target value 9"):
        full_cross_entropy(x, E, torch.tensor([0, 1, 9, 255]))
