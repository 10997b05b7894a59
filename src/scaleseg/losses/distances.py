"""Distance logits shared by the ESS losses: -||x - mu||^2 / tau (paper) or -||x - mu|| / tau
(the published code's form: with tau = 0.05 it is its factor 20)."""

from __future__ import annotations

import torch

DISTANCES = ("squared", "euclidean")
EPS = 1e-12  # floor under squared distances before a square root (its gradient at 0 is infinite)


def check_distance(distance: str) -> None:
    if distance not in DISTANCES:
        raise ValueError(f"distance must be one of {DISTANCES}, got {distance!r}")


def logits_from_squared(sq: torch.Tensor, tau: float, distance: str) -> torch.Tensor:
    """Logits from squared distances."""
    if distance == "squared":
        return -sq / tau
    return -sq.clamp_min(EPS).sqrt() / tau


def paired_logits(x: torch.Tensor, mu: torch.Tensor, tau: float, distance: str) -> torch.Tensor:
    """Logit of each row of x (N, d) against its own class vector(s) mu (N, d) or (N, m, d)."""
    if mu.dim() == 3:
        x = x.unsqueeze(1)
    sq = (x - mu).pow(2).sum(-1)
    return logits_from_squared(sq, tau, distance)


# Class-table helpers whose backward writes one (C, d) tensor. Autograd's own chains for these
# (normalisation, gather, subtraction, power, sum) make two to four (C, d) temporaries each; they run
# in the loss's backward, while the network's activations are held, and at C = 10^6 and d = 12 each is
# 46 MiB (`scaleseg bench memory ... --classes 19,1000000`, docs/benchmarks.md, "Peak memory"). Their
# forward runs outside autocast (in the table's dtype), as the reductions it replaces do under AMP.
_NORMALIZE_EPS = 1e-12  # F.normalize's


def _full_precision(t: torch.Tensor):
    return torch.autocast(t.device.type, enabled=False)


class _UnitRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, table: torch.Tensor) -> torch.Tensor:
        with _full_precision(table):
            norm = torch.linalg.vector_norm(table, dim=1, keepdim=True)
            scale = norm.clamp_min(_NORMALIZE_EPS)
            unit = table / scale
        # the table itself is saved, not `unit`: no second (C, d) tensor held from here to the backward
        ctx.save_for_backward(table, scale, norm > _NORMALIZE_EPS)
        return unit

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        table, scale, above = ctx.saved_tensors  # u = table / scale
        dots = torch.bmm(table.unsqueeze(1), grad.unsqueeze(2)).squeeze(2)  # (C, 1): e . g
        coef = dots.div_(scale.square()).mul_(above)  # (u . g) / ||e||, 0 below eps
        return torch.addcmul(grad, table, coef, value=-1.0).div_(scale)


def unit_rows(table: torch.Tensor) -> torch.Tensor:
    """The rows of a (C, d) table scaled to unit L2 norm, as F.normalize(table, dim=1): a row whose
    norm is below eps is divided by eps (its gradient g / eps). Backward: (g - u (u . g)) / ||e|| row
    by row, one (C, d) tensor; only the table (not u) is kept for it."""
    return _UnitRows.apply(table)


class _SquaredNorms(torch.autograd.Function):
    @staticmethod
    def forward(ctx, table: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(table)
        with _full_precision(table):
            return torch.bmm(table.unsqueeze(1), table.unsqueeze(2)).view(-1)  # (C,), no (C, d) temporary

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (table,) = ctx.saved_tensors
        return table * (2.0 * grad).unsqueeze(1)


def squared_norms(table: torch.Tensor) -> torch.Tensor:
    """||e_c||^2 of each row of a (C, d) table: table.pow(2).sum(1), with one (C, d) tensor in backward."""
    return _SquaredNorms.apply(table)


class _RowPairDistances(torch.autograd.Function):
    @staticmethod
    def forward(ctx, table: torch.Tensor, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        with _full_precision(table):
            diff = table.index_select(0, i).sub_(table.index_select(0, j))  # (a, d)
            sq = torch.bmm(diff.unsqueeze(1), diff.unsqueeze(2)).view(-1)
            dist = sq.clamp_min(EPS).sqrt()
        ctx.save_for_backward(diff, dist, sq > EPS, i, j)
        ctx.rows = table.shape[0]
        return dist

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        diff, dist, above, i, j = ctx.saved_tensors
        g = diff * torch.where(above, grad / dist, 0.0).unsqueeze(1)  # d dist / d e_i; -that for e_j
        out = diff.new_zeros((ctx.rows, diff.shape[1]))
        return out.index_add_(0, i, g).index_add_(0, j, g, alpha=-1.0), None, None


def row_pair_distances(table: torch.Tensor, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
    """||e_i - e_j|| for index vectors i, j (a,) into a (C, d) table, as
    (table[i] - table[j]).pow(2).sum(1).clamp_min(EPS).sqrt() (its gradient 0 where the squared
    distance is below EPS), with one (C, d) tensor in backward: the rows' gradients index-added into it."""
    return _RowPairDistances.apply(table, i, j)
