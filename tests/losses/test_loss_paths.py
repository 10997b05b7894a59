"""Safe defaults of the public losses (ignore_index -100, float64 kept) and agreement of their
implementation paths: kNN dense vs gathered logits, given candidates, exact linear vs tiled."""

import pytest
import torch
import torch.nn.functional as F

from scaleseg.losses import full_cross_entropy, knn_cross_entropy, margin_regularizer
from scaleseg.losses import full_ce
from scaleseg.losses.knn_ce import negatives_from_candidates
from scaleseg.search import ClassIndex, nearest_classes


def materialised(x, E, t, tau=0.05, ignore=-100):
    return F.cross_entropy(-((x[:, None, :] - E[None]) ** 2).sum(-1) / tau, t, ignore_index=ignore)


def case(n=400, C=300, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    E = F.normalize(torch.randn(C, d, generator=g), dim=1)
    t = torch.randint(0, C, (n,), generator=g)
    x = F.normalize(E[t] * 2 + 0.7 * torch.randn(n, d, generator=g), dim=1)
    return x, E, t


def test_class_255_is_a_class_by_default():
    """C > 255: the pixels of class 255 count (the old default ignore_index=255 dropped them)."""
    x, E, t = case(C=300)
    t[:40] = 255
    xa = x.clone().requires_grad_()
    loss = full_cross_entropy(xa, E, t)
    xr = x.clone().requires_grad_()
    ref = materialised(xr, E, t)
    loss.backward()
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    torch.testing.assert_close(xa.grad, xr.grad, rtol=1e-4, atol=1e-7)
    assert xa.grad[:40].abs().sum() > 0
    # the kNN loss too: with k = C - 1 it is the exact cross-entropy
    small = case(n=200, C=270, seed=1)
    xs, Es, ts = small
    ts[:30] = 255
    knn = knn_cross_entropy(xs, Es, ts, 269)
    assert knn.item() == pytest.approx(materialised(xs, Es, ts).item(), rel=1e-5)
    # -100 is ignored, as in F.cross_entropy
    ts[:30] = -100
    assert knn_cross_entropy(xs, Es, ts, 269).item() == pytest.approx(materialised(xs, Es, ts).item(), rel=1e-5)


def test_float64_inputs_are_computed_in_float64():
    x, E, t = case(n=50, C=20, d=4)
    for loss in (lambda a, b: knn_cross_entropy(a, b, t, 5), lambda a, b: full_cross_entropy(a, b, t)):
        assert loss(x.double(), E.double()).dtype == torch.float64
        assert loss(x, E).dtype == torch.float32
    assert margin_regularizer(E.double(), 0.5).dtype == torch.float64


@pytest.mark.parametrize("name", ["knn", "knn-gathered", "knn-euclidean", "full-linear", "full-tiled",
                                  "full-tiled-euclidean", "margin"])
def test_gradcheck(name):
    g = torch.Generator().manual_seed(3)
    x = F.normalize(torch.randn(14, 3, generator=g, dtype=torch.float64), dim=1).requires_grad_()
    E = F.normalize(torch.randn(9, 3, generator=g, dtype=torch.float64), dim=1).requires_grad_()
    t = torch.randint(0, 9, (14,), generator=g)
    t[:2] = -100
    fns = {
        "knn": lambda a, b: knn_cross_entropy(a, b, t, 3, 0.5),
        "knn-gathered": lambda a, b: knn_cross_entropy(a, b, t, 3, 0.5, budget_bytes=64),  # no dense logits
        "knn-euclidean": lambda a, b: knn_cross_entropy(a, b, t, 3, 0.5, distance="euclidean"),
        "full-linear": lambda a, b: full_cross_entropy(a, b, t, 0.5, implementation="linear"),
        "full-tiled": lambda a, b: full_cross_entropy(a, b, t, 0.5, implementation="tiled", budget_bytes=200),
        "full-tiled-euclidean": lambda a, b: full_cross_entropy(a, b, t, 0.5, distance="euclidean",
                                                                implementation="tiled"),
        "margin": lambda a, b: margin_regularizer(b, 0.9) + a.sum() * 0,
    }
    if name == "full-linear" and not full_ce.has_linear_cross_entropy():
        pytest.skip("this PyTorch has no F.linear_cross_entropy")
    assert torch.autograd.gradcheck(fns[name], (x, E))


@pytest.mark.parametrize("distance", ["squared", "euclidean"])
def test_knn_dense_and_gathered_logits_agree(distance):
    """Few classes: all logits from one matmul; many (or a small budget): the candidates gathered."""
    x, E, t = case(n=300, C=60)
    results = []
    for budget in (256 * 2**20, 1024):
        xa, Ea = x.clone().requires_grad_(), E.clone().requires_grad_()
        loss = knn_cross_entropy(xa, Ea, t, 6, distance=distance, budget_bytes=budget)
        loss.backward()
        results.append((loss.item(), xa.grad, Ea.grad))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-5)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(results[0][2], results[1][2], rtol=1e-4, atol=1e-6)


def test_knn_with_given_candidates_and_index():
    x, E, t = case(n=300, C=500)
    exact = nearest_classes(x, E, 8)
    # candidates equal to each pixel's own search: the same loss as searching
    assert knn_cross_entropy(x, E, t, 7, candidates=exact).item() == pytest.approx(
        knn_cross_entropy(x, E, t, 7).item(), rel=1e-6)
    # an index probing all its clusters is the exact search
    index = ClassIndex(500, 8, clusters=10, probes=10)
    index.rebuild(E)
    assert knn_cross_entropy(x, E, t, 7, index=index).item() == pytest.approx(knn_cross_entropy(x, E, t, 7).item(), rel=1e-6)
    # shared candidates: each pixel drops its own target and keeps k distinct negatives
    shared = exact[:1].expand(300, -1)
    neg = negatives_from_candidates(shared, t, 7)
    assert neg.shape == (300, 7) and not (neg == t[:, None]).any()
    with pytest.raises(ValueError, match="at least k \\+ 1"):
        negatives_from_candidates(exact[:, :7], t, 7)


def test_full_linear_and_tiled_agree_and_chunks_fit_the_budget(monkeypatch):
    if not full_ce.has_linear_cross_entropy():
        pytest.skip("this PyTorch has no F.linear_cross_entropy")
    x, E, t = case(n=1000, C=700)
    out = {}
    for impl in ("linear", "tiled"):
        xa, Ea = x.clone().requires_grad_(), E.clone().requires_grad_()
        loss = full_cross_entropy(xa, Ea, t, budget_bytes=2**20, implementation=impl)
        loss.backward()
        out[impl] = (loss.item(), xa.grad, Ea.grad)
    assert out["linear"][0] == pytest.approx(out["tiled"][0], rel=1e-5)
    torch.testing.assert_close(out["linear"][1], out["tiled"][1], rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(out["linear"][2], out["tiled"][2], rtol=1e-4, atol=1e-7)
    seen = {}
    real = F.linear_cross_entropy

    def spy(*args, options=None, **kwargs):
        seen["rows"] = options.batch_chunk_size
        return real(*args, options=options, **kwargs)

    monkeypatch.setattr(F, "linear_cross_entropy", spy)
    full_cross_entropy(x, E, t, budget_bytes=2**20)  # auto: the linear path for squared distances
    assert seen["rows"] * 700 * 4 * 3 <= 2**20  # a chunk's logits and their gradient within the budget
    # on a CPU about 4 MiB of logits per chunk and thread (cache-sized; at one thread 1.65x faster at
    # 20,000 classes than the budget's 838 rows), never above the budget, at least 16 rows where the
    # budget allows them; on a GPU the budget's
    rows = full_ce.linear_chunk_rows
    assert [rows(131072, 20000, 256 << 20, "cpu", t) for t in (1, 2)] == [52, 104]
    assert rows(131072, 20000, 256 << 20, "cuda") == 838
    assert [rows(n, c, 256 << 20, "cpu", 1) for n, c in ((131072, 10**6), (131072, 10**7), (100, 150))] == [16, 1, 100]
    with pytest.raises(ValueError, match="squared"):
        full_cross_entropy(x, E, t, distance="euclidean", implementation="linear")
    with pytest.raises(ValueError, match="implementation"):
        full_cross_entropy(x, E, t, implementation="fast")


@pytest.mark.parametrize("impl", ["linear", "tiled"])
def test_full_loss_at_a_low_temperature_flushes_subnormals_without_changing_the_result(impl, monkeypatch):
    """tau = 0.01: most softmax terms are exp() of logits 87 to 400 below their row's maximum, subnormal
    or zero in float32. The loss runs with them flushed to zero (the CPU's fast path): its value and
    gradients equal the same loss with subnormals kept (the flush made unavailable) and the float64
    materialised cross-entropy; the thread's mode is on inside the loss and back off after it."""
    if impl == "linear" and not full_ce.has_linear_cross_entropy():
        pytest.skip("this PyTorch has no F.linear_cross_entropy")
    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU cannot flush subnormal numbers (torch.set_flush_denormal: x86 with SSE3, AArch64)")
    torch.set_flush_denormal(False)
    g = torch.Generator().manual_seed(3)
    E = F.normalize(torch.randn(500, 16, generator=g), dim=1)
    t = torch.randint(0, 500, (600,), generator=g)
    x = F.normalize(E[t] + 0.5 * torch.randn(600, 16, generator=g), dim=1)
    p = torch.softmax(-((x[:, None] - E[None]) ** 2).sum(-1) / 0.01, dim=1)
    assert ((p > 0) & (p < 1.1754944e-38)).any()  # float32 does hold subnormal terms here

    def run(fn, **kw):
        xa, Ea = x.clone().requires_grad_(), E.clone().requires_grad_()
        loss = fn(xa, Ea, t, tau=0.01, **kw)
        loss.backward()
        return loss.item(), xa.grad, Ea.grad

    reference = run(lambda xa, Ea, t, tau: materialised(xa.double(), Ea.double(), t, tau=tau))
    assert not full_ce._flush_is_on()
    modes, real = [], full_ce._flush_is_on
    monkeypatch.setattr(full_ce, "_flush_is_on", lambda: modes.append(real()) or modes[-1])
    flushed = run(full_cross_entropy, implementation=impl)
    assert modes and not any(modes) and not real()  # off when asked, before the loss; off again after it
    monkeypatch.setattr(torch, "set_flush_denormal", lambda mode: False)  # as on a CPU that cannot flush
    kept = run(full_cross_entropy, implementation=impl)
    assert flushed[0] == pytest.approx(kept[0], rel=1e-6)
    for a, b, r in zip(flushed[1:], kept[1:], reference[1:]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-5)  # against the float64 logits
    assert flushed[0] == pytest.approx(reference[0], rel=1e-6)
    monkeypatch.undo()
    with full_ce.flushing_subnormals():
        assert real()
    assert not real()
