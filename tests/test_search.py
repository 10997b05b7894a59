import pytest
import torch
import torch.nn.functional as F

from scaleseg.search import nearest_classes, tile_shape
from tests.memory_probe import LargestTensor


def brute_force(q, c, k):
    d = torch.cdist(q.double(), c.double())  # (N, C), the full matrix the search avoids
    return d.argsort(dim=1)[:, :k], d


@pytest.mark.parametrize("n,C,k,budget", [(300, 50, 5, 256 * 2**20), (257, 1000, 8, 64 * 1024), (64, 999, 1, 4096),
                                          (5, 7, 7, 1024), (1000, 3000, 9, 200_000)])
def test_matches_a_full_sort(n, C, k, budget):
    torch.manual_seed(n + C)
    q, c = torch.randn(n, 6), torch.randn(C, 6)
    got = nearest_classes(q, c, k, budget_bytes=budget)
    want, d = brute_force(q, c, k)
    assert got.shape == (n, k) and got.dtype == torch.int64
    # distances in ascending order and equal to the true k smallest (robust to near-ties)
    torch.testing.assert_close(d.gather(1, got), d.gather(1, want), rtol=1e-5, atol=1e-5)
    assert (got == want).float().mean() > 0.99  # continuous random data: ties are rare


def test_unit_vectors_nearest_is_largest_dot_product():
    torch.manual_seed(0)
    q, c = F.normalize(torch.randn(500, 12), dim=1), F.normalize(torch.randn(80, 12), dim=1)
    assert torch.equal(nearest_classes(q, c, 1)[:, 0], (q @ c.T).argmax(1))


def test_memory_stays_within_the_budget():
    q, c = torch.randn(20_000, 12), torch.randn(30_000, 12)
    budget = 2**20  # 1 MiB, against a 2.4 GB full distance matrix
    rows, cols = tile_shape(20_000, 30_000, 5, budget)
    assert rows * (cols + 5) * 12 <= budget
    with LargestTensor() as probe:
        out = nearest_classes(q[:2000], c, 5, budget_bytes=budget)
    assert probe.numel <= max(budget // 4, c.numel())  # a tile, or a view of the (C, d) table itself
    want, _ = brute_force(q[:2000], c, 5)
    assert (out == want).float().mean() > 0.99


def test_no_gradient_and_bad_arguments():
    q = torch.randn(4, 3, requires_grad=True)
    c = torch.randn(6, 3, requires_grad=True)
    assert not nearest_classes(q, c, 2).requires_grad
    with pytest.raises(ValueError, match="k = 7"):
        nearest_classes(q, c, 7)
    with pytest.raises(ValueError, match=r"\(N, d\)"):
        nearest_classes(q, torch.randn(6, 4), 1)
    with pytest.raises(ValueError, match="unknown search backend"):
        nearest_classes(q, c, 1, backend="annoy")
    assert nearest_classes(torch.randn(0, 3), c, 2).shape == (0, 2)


def test_faiss_backend_returns_the_same_neighbours():
    pytest.importorskip("faiss", reason="faiss-cpu is in the test extras; install '.[test]'")
    torch.manual_seed(1)
    q, c = torch.randn(700, 12), torch.randn(400, 12)
    torch_idx = nearest_classes(q, c, 6)
    faiss_idx = nearest_classes(q, c, 6, backend="faiss", budget_bytes=100_000)
    _, d = brute_force(q, c, 6)
    torch.testing.assert_close(d.gather(1, faiss_idx), d.gather(1, torch_idx), rtol=1e-5, atol=1e-5)
    assert (faiss_idx == torch_idx).float().mean() > 0.99
