"""The exact search's two-pass path, the FAISS backends, the approximate class index and
block-shared candidates, each against a brute-force reference."""

import pytest
import torch
import torch.nn.functional as F

from scaleseg.losses.knn_ce import block_candidates
from scaleseg.search import ClassIndex, index_recall, kmeans, nearest_classes
from tests.memory_probe import LargestTensor, TableSizedAllocations


def brute(q, c, k):
    d = torch.cdist(q.double(), c.double())
    return d.topk(k, dim=1, largest=False).indices, d


def clustered(C, d=12, families=40, spread=0.2, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(families, d, generator=g), dim=1)
    return F.normalize(centres[torch.randint(0, families, (C,), generator=g)] + spread * torch.randn(C, d, generator=g), dim=1)


@pytest.mark.parametrize("n,C,k,budget", [(300, 9000, 8, 256 * 2**20), (257, 5000 + 37, 1, 2**20),
                                          (100, 4097, 5, 40_000), (64, 1100, 9, 2**22)])
def test_two_pass_search_is_exact(n, C, k, budget):
    """C beyond one tile (ragged last group included): group minima, then re-scoring."""
    torch.manual_seed(C)
    q, c = torch.randn(n, 12), torch.randn(C, 12)
    got = nearest_classes(q, c, k, budget_bytes=budget)
    want, d = brute(q, c, k)
    torch.testing.assert_close(d.gather(1, got), d.gather(1, want), rtol=1e-5, atol=1e-5)
    assert (got == want).float().mean() > 0.99
    assert (d.gather(1, got).diff(dim=1) >= -1e-6).all()  # nearest first


def test_float64_queries_are_searched_in_float64():
    """Two classes 1e-9 apart in distance: float32 cannot order them, float64 can."""
    q = torch.zeros(1, 2, dtype=torch.float64)
    c = torch.tensor([[1.0 + 2e-9, 0.0], [1.0 + 1e-9, 0.0], [3.0, 0.0]], dtype=torch.float64)
    assert nearest_classes(q, c, 1)[0, 0] == 1


def test_two_pass_search_memory_within_the_budget():
    q, c = torch.randn(1000, 12), torch.randn(30_000, 12)
    budget = 2**21  # 2 MiB against a 120 MB distance matrix
    with LargestTensor() as probe:
        got = nearest_classes(q, c, 8, budget_bytes=budget)
    assert probe.numel <= max(budget // 4, c.numel())
    want, d = brute(q[:200], c, 8)
    torch.testing.assert_close(d.gather(1, got[:200]), d.gather(1, want), rtol=1e-5, atol=1e-5)


def test_faiss_inner_product_gives_the_l2_order_for_any_vectors():
    pytest.importorskip("faiss", reason="faiss-cpu is in the test extras; install '.[test]'")
    torch.manual_seed(2)
    q, c = torch.randn(500, 12), torch.randn(3000, 12) * torch.rand(3000, 1) * 3  # rows of any length
    got = nearest_classes(q, c, 7, backend="faiss")
    want, d = brute(q, c, 7)
    torch.testing.assert_close(d.gather(1, got), d.gather(1, want), rtol=1e-4, atol=1e-4)


def test_kmeans_is_deterministic_and_reduces_the_error():
    x = clustered(3000, families=20, spread=0.05)
    a = kmeans(x, 20, 10, generator=torch.Generator().manual_seed(1))
    b = kmeans(x, 20, 10, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    start = kmeans(x, 20, 0, generator=torch.Generator().manual_seed(1))  # the drawn initial points

    def error(cent):
        return torch.cdist(x, cent).min(1).values.pow(2).mean()

    assert error(a) < 0.5 * error(start)


def test_class_index_lists_and_search():
    C = 6000
    E = clustered(C)
    index = ClassIndex(C, 12, clusters=40, probes=4)
    assert not index.is_built()
    index.rebuild(E)
    assert index.is_built() and index.offsets[0] == 0 and index.offsets[-1] == C
    assert torch.equal(index.order.long().sort().values, torch.arange(C))  # every class in exactly one list
    assign = torch.cdist(E, index.centroids).argmin(1)
    for cluster in (0, 17, 39):
        members = index.order[index.offsets[cluster] : index.offsets[cluster + 1]].long()
        assert (assign[members] == cluster).all()
    q = F.normalize(E[torch.randint(0, C, (500,))] + 0.05 * torch.randn(500, 12), dim=1)
    exact = nearest_classes(q, E, 8)
    found = index.search(q, E, 8)
    _, d = brute(q, E, 8)
    assert (d.gather(1, found).diff(dim=1) >= -1e-6).all()  # sorted, distinct, current distances
    assert all(len(set(row.tolist())) == 8 for row in found)
    assert index_recall(found, exact) > 0.9
    # probing every cluster is the exact search
    assert index_recall(index.search(q, E, 8, probes=40), exact) == 1.0
    # the index scores the current embeddings: moved classes are found at their new place
    moved, targets = E.clone(), torch.randperm(C, generator=torch.Generator().manual_seed(0))[:50]
    new = F.normalize(torch.randn(50, 12, generator=torch.Generator().manual_seed(1)), dim=1)
    moved[targets] = new
    assert torch.equal(index.search(new, moved, 1, probes=40)[:, 0], targets)


def test_class_index_search_and_reassignment_allocate_nothing_of_the_table_size():
    """They run in every training step, while the step's memory is held: the table is gathered cluster
    by cluster and the classes' moves measured in chunks, never copied whole (46 MiB at C = 10^6, d = 12)."""
    C = 200_000
    E = clustered(C, families=400)
    index = ClassIndex(C, 12, clusters=400, probes=4)
    index.rebuild(E)
    q = F.normalize(E[torch.randint(0, C, (256,))] + 0.05 * torch.randn(256, 12), dim=1)
    moved = E.clone()
    moved[:1000] = F.normalize(moved[:1000] + 0.3 * torch.randn(1000, 12), dim=1)
    with TableSizedAllocations(C * 12 // 4) as probe:
        found = index.search(q, E, 8)
        searched = index.assign(moved)
    assert probe.ops == []
    assert searched > 0 and index_recall(found, nearest_classes(q, E, 8)) > 0.9


def test_class_index_small_clusters_fall_back_to_exact():
    E = clustered(50)
    index = ClassIndex(50, 12, clusters=25, probes=1)  # about 2 classes per cluster < k
    index.rebuild(E)
    got = index.search(E[:20], E, 6)
    want, d = brute(E[:20], E, 6)
    torch.testing.assert_close(d.gather(1, got), d.gather(1, want), rtol=1e-5, atol=1e-5)


def test_class_index_refresh_cadence_and_state():
    E = clustered(2000)
    index = ClassIndex(2000, 12, probes=4, refresh=3)
    refreshed = [index.step(E + 0.01 * i) for i in range(7)]
    assert refreshed == [True, False, False, True, False, False, True]
    assert int(index.steps) == 7
    state = index.state_dict()
    assert set(state) == {"centroids", "order", "offsets", "steps"}
    twin = ClassIndex(2000, 12, probes=4, refresh=3)
    twin.load_state_dict(state)
    q = E[:100]
    assert torch.equal(twin.search(q, E, 5), index.search(q, E, 5))
    # deterministic: the same steps from scratch give the same index
    other = ClassIndex(2000, 12, probes=4, refresh=3)
    for i in range(7):
        other.step(E + 0.01 * i)
    assert all(torch.equal(a, b) for a, b in zip(other.state_dict().values(), state.values()))


def _members(index: ClassIndex) -> list[set[int]]:
    order, offsets = index.order.tolist(), index.offsets.tolist()
    return [set(order[offsets[i] : offsets[i + 1]]) for i in range(index.num_clusters)]


def test_class_index_reassigns_every_class_to_its_nearest_centroid_between_refreshes():
    """Between k-means refreshes the centroids stay and the inverted lists follow the classes: after a
    step that is not a refresh, each list holds exactly the classes whose nearest current centroid it is
    (brute force); with `reassign` beyond the refresh interval the lists stay those of the last refresh."""
    E = clustered(600)
    moved = F.normalize(E + 0.4 * torch.randn(E.shape, generator=torch.Generator().manual_seed(1)), dim=1)
    following = ClassIndex(600, 12, clusters=20, probes=3, refresh=10)
    frozen = ClassIndex(600, 12, clusters=20, probes=3, refresh=10, reassign=1000)
    for index in (following, frozen):
        assert index.step(E) is True  # first step: built
        centroids = index.centroids.clone()
        built = _members(index)
        assert index.step(moved) is False  # not a refresh
        assert torch.equal(index.centroids, centroids)
    nearest = torch.cdist(moved, following.centroids).argmin(dim=1)
    assert _members(following) == [set(torch.nonzero(nearest == i)[:, 0].tolist()) for i in range(20)]
    assert _members(frozen) == built and _members(following) != built
    # the followed lists find the moved classes' own neighbours again
    exact = nearest_classes(moved[:200], moved, 8)
    assert index_recall(following.search(moved[:200], moved, 8), exact) > index_recall(
        frozen.search(moved[:200], moved, 8), exact)


def test_reassignment_searches_only_the_classes_that_left_their_slack_and_stays_exact():
    """A class is searched again only once it has moved at least its slack (half the gap between its two
    nearest centroids) from where it was assigned; the lists still equal a brute-force assignment after
    many small steps, and after a state_dict round trip (the derived state is rebuilt, not loaded)."""
    g = torch.Generator().manual_seed(2)
    E = clustered(800)
    index = ClassIndex(800, 12, clusters=25, probes=3, refresh=1000)
    index.step(E)
    assert index.assign(E) == 0  # nothing moved: nothing searched
    searched_in_all = 0
    for _ in range(6):
        step = torch.zeros_like(E)
        touched = torch.randperm(800, generator=g)[:40]  # a few classes move per step, as in training
        step[touched] = 0.15 * torch.randn(40, 12, generator=g)
        E = F.normalize(E + step, dim=1)
        searched = index.assign(E)
        assert searched <= 40  # only the classes moved in this step can have left their slack
        searched_in_all += searched
        nearest = torch.cdist(E, index.centroids).argmin(dim=1)
        assert _members(index) == [set(torch.nonzero(nearest == c)[:, 0].tolist()) for c in range(25)]
    assert 0 < searched_in_all < 6 * 40  # some moves stayed within the slack, some did not
    twin = ClassIndex(800, 12, clusters=25, probes=3, refresh=1000)
    twin.load_state_dict(index.state_dict())
    assert set(index.state_dict()) == {"centroids", "order", "offsets", "steps"}
    assert twin.assign(E) == 800  # the derived state is rebuilt in full after a load
    assert torch.equal(twin.order, index.order) and torch.equal(twin.offsets, index.offsets)


def test_faiss_ivf_searches_the_same_clusters():
    pytest.importorskip("faiss", reason="faiss-cpu is in the test extras; install '.[test]'")
    E = clustered(5000)
    index = ClassIndex(5000, 12, clusters=50, probes=3)
    index.rebuild(E)
    q = F.normalize(E[:400] + 0.05 * torch.randn(400, 12), dim=1)
    ours, theirs = index.search(q, E, 8), index.search(q, E, 8, backend="faiss")
    _, d = brute(q, E, 8)
    torch.testing.assert_close(d.gather(1, theirs), d.gather(1, ours), rtol=1e-4, atol=1e-4)


def test_index_recall():
    exact = torch.tensor([[1, 2, 3], [4, 5, 6]])
    assert index_recall(torch.tensor([[3, 2, 1], [4, 9, 8]]), exact) == pytest.approx(4 / 6)


def test_block_candidates_are_the_block_means_neighbours():
    torch.manual_seed(0)
    E = F.normalize(torch.randn(300, 12), dim=1)
    x = F.normalize(torch.randn(2, 12, 10, 13), dim=1)  # 10 x 13: ragged blocks at the edges
    one = block_candidates(x, E, 5, 1)
    assert torch.equal(one.reshape(-1, 5), nearest_classes(x.permute(0, 2, 3, 1).reshape(-1, 12), E, 5))
    got = block_candidates(x, E, 5, 4)  # (2, 10, 13, 5)
    assert got.shape == (2, 10, 13, 5)
    for b, by, bx in [(0, 0, 0), (1, 2, 3), (0, 2, 1)]:  # blocks (rows 8-9 and columns 12 are partial)
        block = x[b, :, 4 * by : 4 * by + 4, 4 * bx : 4 * bx + 4]
        mean = F.normalize(block.reshape(12, -1).mean(1), dim=0)
        want = nearest_classes(mean[None], E, 5)[0]
        assert (got[b, 4 * by : 4 * by + 4, 4 * bx : 4 * bx + 4] == want).all()
    valid = torch.zeros(2, 10, 13, dtype=torch.bool)
    valid[1, 9, 12] = True  # a single labelled pixel: its block alone is searched
    with LargestTensor() as probe:
        only = block_candidates(x, E, 5, 4, valid=valid)
    assert probe.numel < 2 * 12 * 300
    assert (only[1, 8:, 12] == got[1, 8:, 12]).all()
