"""The class table's gradient in the ESS losses' backward: few (C, d) allocations.

The losses' backward runs while the network's activations are at their peak, and every tensor of the
class table's size allocated then adds to the step's peak (46 MiB each at C = 10^6, d = 12). The
table's helpers (`unit_rows`, `squared_norms`, `row_pair_distances`, one gather for a block's
candidates and its pixels' targets) keep that to the gradient buffer and its normalisation: here
counted op by op against autograd's own chains (14 to 16 such allocations per loss before them),
and the helpers' values and gradients checked against those chains. The counts are upper bounds: under
a dispatch mode autograd turns off its in-place paths (a gather's backward index-adds out of place, two
gradients meeting at one tensor are summed into a new one), which outside it allocate nothing."""

import pytest
import torch
import torch.nn.functional as F

from scaleseg.losses.distances import EPS, row_pair_distances, squared_norms, unit_rows
from scaleseg.losses.knn_ce import block_knn_cross_entropy, knn_cross_entropy
from scaleseg.losses.margin import margin_hinge, nearest_other_classes
from tests.memory_probe import LiveTableSized, TableSizedAllocations


C, D = 5000, 12


def losses():
    torch.manual_seed(0)
    x = F.normalize(torch.randn(2, D, 16, 16), dim=1)
    t = torch.randint(0, C, (2, 16, 16))
    return {
        "block": lambda E: block_knn_cross_entropy(x, E, t, 7, 4, 0.05, -1, budget_bytes=1 << 16),
        "knn": lambda E: knn_cross_entropy(x.permute(0, 2, 3, 1).reshape(-1, D), E, t.reshape(-1), 7, 0.05, -1,
                                           budget_bytes=1 << 16),
        "margin": lambda E: margin_hinge(E, nearest_other_classes(E.detach(), 2), 10.0),  # every hinge active
    }


@pytest.mark.parametrize("name,most", [("block", 3), ("knn", 5), ("margin", 3)])
def test_the_losses_backward_allocates_few_table_sized_tensors(name, most):
    raw = torch.nn.Parameter(torch.randn(C, D))
    loss = losses()[name](unit_rows(raw))
    with TableSizedAllocations(C * D) as probe:
        loss.backward()
    assert len(probe.ops) <= most, probe.ops
    # the same loss through autograd's own normalisation (the reference chain) allocates far more
    ref = torch.nn.Parameter(raw.detach().clone())
    loss_ref = losses()[name](F.normalize(ref, dim=1))
    with TableSizedAllocations(C * D) as reference:
        loss_ref.backward()
    assert len(reference.ops) > most
    assert loss.item() == pytest.approx(loss_ref.item(), rel=1e-6)
    torch.testing.assert_close(raw.grad, ref.grad, rtol=1e-4, atol=1e-6)


def test_the_normalised_table_is_not_held_for_the_backward():
    """unit_rows keeps the table it was given (the parameter: no memory) and (C,)-sized factors for its
    backward, not the unit rows: between the forward and the loss's backward, when the step's activations
    are held, no copy of the table's size is kept alive by it (F.normalize's chain keeps two)."""
    def saved_table_sized(normalise):
        raw = torch.nn.Parameter(torch.randn(C, D))
        kept = []

        def pack(t):
            if t.numel() >= C * D and t.untyped_storage().data_ptr() != raw.untyped_storage().data_ptr():
                kept.append(tuple(t.shape))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            normalise(raw).sum().backward()
        return kept

    assert saved_table_sized(unit_rows) == []
    assert len(saved_table_sized(lambda e: F.normalize(e, dim=1))) >= 1  # the reference does keep some


def test_table_helpers_equal_autograds_chains_in_value_and_gradient():
    torch.manual_seed(1)
    table = torch.randn(40, D, dtype=torch.float64)
    table[3] = 0.0  # a zero row: F.normalize divides by its eps, and its gradient is g / eps
    table[5] = table[6]  # a pair at distance 0: below EPS, no gradient through the floor
    g = torch.randn(40, D, dtype=torch.float64)
    i, j = torch.tensor([0, 5, 7, 7, 3]), torch.tensor([1, 6, 2, 9, 4])
    cases = [
        (unit_rows, lambda e: F.normalize(e, dim=1), g),
        (squared_norms, lambda e: e.pow(2).sum(1), g[:, 0]),
        (lambda e: row_pair_distances(e, i, j), lambda e: (e[i] - e[j]).pow(2).sum(1).clamp_min(EPS).sqrt(), g[:5, 0]),
    ]
    for ours, reference, weight in cases:
        a, b = table.clone().requires_grad_(), table.clone().requires_grad_()
        out_a, out_b = ours(a), reference(b)
        torch.testing.assert_close(out_a, out_b, rtol=1e-12, atol=0.0)
        (out_a * weight).sum().backward()
        (out_b * weight).sum().backward()
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-12)
    assert row_pair_distances(table.requires_grad_(), i, j)[1].item() == pytest.approx(EPS ** 0.5)


def test_table_helpers_keep_the_tables_precision_under_autocast():
    """Under AMP the reductions they replace (pow, sum, norm) run in float32; so do the helpers, where
    a bare bmm would run at the autocast dtype."""
    torch.manual_seed(2)
    table = torch.randn(30, D)
    i, j = torch.arange(0, 10), torch.arange(10, 20)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = (unit_rows(table), squared_norms(table), row_pair_distances(table, i, j))
    want = (F.normalize(table, dim=1), table.pow(2).sum(1), (table[i] - table[j]).norm(dim=1))
    for g, w in zip(got, want):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)


def test_the_backward_of_a_training_step_holds_few_table_sized_tensors_at_once():
    """The loss's backward is where a step's memory peaks (the network's activations are all held): in
    a step of the ESS head with the class index, at a table far larger than the network, at most three
    tensors of the table's size that the step made are alive at once from the backward's start to the
    optimizer step's end. Under the probe they are the regulariser's gradient of the normalised table
    and the loss's, a zeroed buffer and its index-added copy (in place outside the probe); the momentum
    buffer was made in the first step. Before unit_rows kept the table instead of the unit rows, the
    unit rows were a fourth."""
    from scaleseg.bench.memory import HEADS
    from scaleseg.config import load_config
    from scaleseg.engine.optim import build_optimizer
    from scaleseg.models import build_model

    classes = 60_000
    cfg = load_config(None, [*HEADS["ess-knn-fast"], f"data.num_classes={classes}", "model.backbone=resnet_tiny",
                             "model.head.loss_resolution=full", "model.decoder.channels=16",
                             "model.decoder.low_level_channels=8"])
    torch.manual_seed(0)
    model = build_model(cfg.model, classes, ignore_index=-1).train()
    optimizer = build_optimizer(model, cfg.optim)
    images, target = torch.randn(2, 3, 32, 32), torch.randint(0, classes, (2, 32, 32))
    for step in range(2):  # the second step: momentum exists, the index is built
        with LiveTableSized(classes * 12) as probe:
            probe.measuring = False
            loss = model.loss(model(images), target)["loss"]
            probe.measuring = True
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    assert probe.most <= 3, probe.at_most
    assert "div" not in probe.at_most, probe.at_most  # the normalised table (unit_rows' forward) is gone
