"""model.head.embedding.table: the published "free" class table against the "sphere" one (unit rows, put
back on the sphere after every optimizer step). The step each gets is checked against the algebra of
docs/ess.md with materialised logits and a hand-written tangent projection."""

import pytest
import torch
import torch.nn.functional as F

from scaleseg import ESSHead
from scaleseg.config import load_config
from scaleseg.engine.checkpoint import load_checkpoint
from scaleseg.engine.trainer import Trainer
from scaleseg.errors import ConfigError
from scaleseg.models.heads import EmbeddingScorer

TAU = 0.1


def reference_gradient(U, x, t):
    """dL/du of the exact softmax cross-entropy over logits -||x - u_c||^2 / tau, materialised, by
    autograd on a leaf holding the unit rows themselves (no normalisation in the graph)."""
    U = U.detach().clone().requires_grad_(True)
    logits = -torch.cdist(x, U).pow(2) / TAU
    F.cross_entropy(logits, t).backward()
    return U.grad


def one_sgd_step(table, lr, seed=0):
    """One plain SGD step (no momentum, no weight decay) of the scorer's exact loss on fixed unit pixel
    embeddings, then `after_optimizer_step`; -> (rows before, rows after, the scorer)."""
    torch.manual_seed(seed)
    scorer = EmbeddingScorer(8, 30, embed_dim=6, temperature=TAU, loss="full", margin_weight=0.0, table=table)
    x = F.normalize(torch.randn(200, 6), dim=1)
    t = torch.randint(0, 30, (200,))
    before = scorer.class_embeddings.detach().clone()
    scores = x.t().reshape(1, 6, 10, 20)
    loss = scorer.loss(scores, t.view(1, 10, 20))["ce"]
    opt = torch.optim.SGD([scorer.class_embeddings], lr=lr)
    loss.backward()
    opt.step()
    scorer.after_optimizer_step()
    return before, scorer.class_embeddings.detach().clone(), x, t


def test_sphere_rows_start_and_stay_unit_and_turn_by_lr_times_the_tangent_gradient():
    lr = 0.5
    before, after, x, t = one_sgd_step("sphere", lr)
    torch.testing.assert_close(before.norm(dim=1), torch.ones(30))  # initialised on the sphere
    torch.testing.assert_close(after.norm(dim=1), torch.ones(30))  # and put back on it
    g = reference_gradient(before, x, t)
    tangent = g - (g * before).sum(1, keepdim=True) * before  # (I - u u^T) g, row by row
    want = F.normalize(before - lr * tangent, dim=1)  # Riemannian SGD with the normalising retraction
    torch.testing.assert_close(after, want, rtol=1e-5, atol=1e-6)
    assert (after - before).norm(dim=1).max() > 1e-3  # the step moved the rows


def test_free_rows_turn_by_lr_over_their_squared_norm():
    """The published table: a row of norm r turns by lr (I - u u^T) g / r^2, to first order (the reason a
    from-scratch run needed a 30x table LR: r^2 ~ d / 3 at the uniform(-1, 1) init)."""
    lr = 1e-3  # small: the first-order statement
    before, after, x, t = one_sgd_step("free", lr)
    assert before.abs().max() <= 1.0 and not torch.allclose(before.norm(dim=1), torch.ones(30))
    r = before.norm(dim=1, keepdim=True)
    u = before / r
    g = reference_gradient(u, x, t)
    tangent = g - (g * u).sum(1, keepdim=True) * u
    turned = F.normalize(after, dim=1) - u
    want = -lr * tangent / r**2
    assert (turned - want).abs().max() < 0.01 * want.abs().max()  # second order and float32 rounding
    assert abs(float((r**2).mean()) - 6 / 3) < 0.4  # E||e||^2 = d / 3 at the uniform(-1, 1) init
    torch.testing.assert_close(after, before - lr * tangent / r)  # exact: the raw row's step, no retraction


def test_trainer_keeps_the_sphere_table_on_the_sphere(tmp_path, tiny_overrides):
    """Through the trainer (momentum 0.95 and weight decay on the table, warm-up, clipping): every row of
    the checkpointed sphere table is a unit vector; the free table's are not."""
    rows = {}
    for table in ("free", "sphere"):
        cfg = load_config(None, tiny_overrides + ["model.head.scorer=embedding", f"model.head.embedding.table={table}",
                                                  "optim.warmup_iters=2", "optim.clip_grad_norm=5"])
        Trainer(cfg, work_dir=tmp_path / table).run()
        state = load_checkpoint(tmp_path / table / "iter_000006.pth")["model"]
        rows[table] = state["head.scorer.class_embeddings"].norm(dim=1)
    torch.testing.assert_close(rows["sphere"], torch.ones(40))
    assert (rows["free"] - 1).abs().min() > 0.05


def test_pyramid_shares_one_sphere_table(tmp_path):
    from scaleseg.models import build_model

    cfg = load_config(None, ["data.num_classes=20", "model.head.scorer=embedding", "model.head.structure=pyramid",
                             "model.head.embedding.table=sphere", "model.decoder.channels=16",
                             "model.decoder.low_level_channels=8", "model.head.pyramid.semantic_channels=16",
                             "model.head.pyramid.unity_channels=8"])
    model = build_model(cfg.model, 20, 255)
    table = model.head.class_table(raw=True)
    with torch.no_grad():
        table.mul_(3.0)
    model.after_optimizer_step()
    for scorer in model.head.scorers:
        assert scorer.class_embeddings is table
    torch.testing.assert_close(table.norm(dim=1), torch.ones(20))


def test_api_head_sphere_table_and_its_step():
    head = ESSHead(16, 50, embed_dim=8, table="sphere")
    torch.testing.assert_close(head.class_embeddings.norm(dim=1), torch.ones(50))
    with torch.no_grad():
        head.class_embeddings.mul_(2.0)
    head.after_optimizer_step()
    torch.testing.assert_close(head.class_embeddings.norm(dim=1), torch.ones(50))
    free = ESSHead(16, 50, embed_dim=8)
    before = free.class_embeddings.detach().clone()
    free.after_optimizer_step()  # the published table: untouched
    assert torch.equal(free.class_embeddings, before)


def test_bad_table_settings_are_refused():
    with pytest.raises(ConfigError, match="table"):
        load_config(None, ["model.head.embedding.table=ball"])
    with pytest.raises(ConfigError, match="table = sphere needs model.head.embedding.normalize = true"):
        load_config(None, ["model.head.scorer=embedding", "model.head.embedding.table=sphere",
                           "model.head.embedding.normalize=false"])
    with pytest.raises(ValueError, match="table = 'ball'"):
        EmbeddingScorer(8, 10, table="ball")
