"""Specialize and Fuse (seed 004, sections 3.1-3.2): pyramidal ground truth, "done by coarser"
relabelling and the unity term of S&F Eq. 1.

Conventions used throughout (and by `models/heads/pyramid.py`):

* Levels are ordered coarse to fine, as the paper's l = 1..L: ``strides = (32, 16, 8, 4)``. Each
  stride divides the previous one; a cell at stride s covers an s x s patch of pixels whose top-left
  corner is a multiple of s.
* Inputs whose size is not a multiple of the coarsest stride are padded at the bottom/right, labels
  with `ignore_index` (`pad_labels`).
* Ignore pixels inside a cell: they do not make the cell mixed. A cell whose valid pixels all share
  one label is a unity cell with that label; a cell with two or more labels is a mix cell; a cell with
  no valid pixel is ignored in both pyramids.
* Unity targets are int64: 1 unity, 0 mix, `UNITY_IGNORE` (-1) ignored. Semantic targets are class
  ids, `ignore_index` for mix, all-ignore and (after relabelling) done-by-coarser cells.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

UNITY_IGNORE = -1
RELABEL_POLICIES = ("done_by_coarser", "simple_fix", "naive")


@dataclass
class PyramidTargets:
    """Ground-truth pyramids, one entry per level, coarse to fine; each (B, H/s_l, W/s_l)."""

    semantic: list[torch.Tensor]  # int64 class ids, ignore_index where the cell is mixed or empty
    unity: list[torch.Tensor]  # int64: 1 unity, 0 mix, UNITY_IGNORE empty


def check_strides(strides) -> tuple[int, ...]:
    """The strides coarse to fine; each must divide the next coarser one (e.g. 32, 16, 8, 4 or 32, 4)."""
    strides = tuple(sorted((int(s) for s in strides), reverse=True))
    if not strides or min(strides) < 1 or len(set(strides)) != len(strides):
        raise ValueError(f"pyramid strides must be distinct positive integers, got {list(strides)}")
    for coarse, fine in zip(strides, strides[1:]):
        if coarse % fine:
            raise ValueError(f"pyramid stride {coarse} is not a multiple of the finer stride {fine}: cells must nest")
    return strides


def pad_labels(target: torch.Tensor, multiple: int, ignore_index: int) -> torch.Tensor:
    """(B, H, W) -> (B, H', W') with H', W' the next multiples of `multiple`, padded with ignore."""
    H, W = target.shape[-2:]
    ph, pw = -H % multiple, -W % multiple
    if ph == 0 and pw == 0:
        return target
    return F.pad(target, (0, pw, 0, ph), value=ignore_index)


def cell_targets(target: torch.Tensor, stride: int, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Semantic and unity targets of the cells of one level. `target` (B, H, W) with H, W multiples of
    `stride` (see `pad_labels`). Exact for any int64 class id: min/max over each cell, no float cast."""
    B, H, W = target.shape
    cells = target.reshape(B, H // stride, stride, W // stride, stride)
    valid = cells != ignore_index
    big = torch.iinfo(target.dtype).max
    low = torch.where(valid, cells, big).amin(dim=(2, 4))  # (B, h, w) smallest valid label
    high = torch.where(valid, cells, -1).amax(dim=(2, 4))  # (B, h, w) largest valid label
    nonempty = valid.any(dim=(2, 4))
    unity_cell = nonempty & (low == high)
    semantic = torch.where(unity_cell, low, torch.full_like(low, ignore_index))
    unity = torch.where(nonempty, unity_cell.long(), torch.full_like(low, UNITY_IGNORE))
    return semantic, unity


def pyramid_targets(target: torch.Tensor, strides, ignore_index: int) -> PyramidTargets:
    """The semantic and unity pyramids (section 3.1) of a label map (B, H, W), any H and W."""
    strides = check_strides(strides)
    padded = pad_labels(target, strides[0], ignore_index)
    semantic, unity = zip(*(cell_targets(padded, s, ignore_index) for s in strides))
    return PyramidTargets(list(semantic), list(unity))


def upsample_cells(x: torch.Tensor, factor: int) -> torch.Tensor:
    """Nearest upsampling of a cell map (..., h, w) by an integer factor: each cell covers factor^2 children,
    (..., h * factor, w * factor). A view, expand and reshape (traceable for any size, used by the export)."""
    if factor == 1:
        return x
    *lead, h, w = x.shape
    return x[..., :, None, :, None].expand(*lead, h, factor, w, factor).reshape(*lead, h * factor, w * factor)


@torch.no_grad()
def done_by_coarser(
    unity: list[torch.Tensor],
    strides,
    policy: str = "done_by_coarser",
    unity_probs: list[torch.Tensor] | None = None,
    tau: float = 0.9,
) -> list[torch.Tensor]:
    """Which cells of each level are ignored because a coarser level already decided them (section 3.2).

    unity: ground-truth unity targets of at least the L - 1 coarse levels (the finest one is not used).
    unity_probs: predicted unity probabilities of those levels (B, h_l, w_l); used by "done_by_coarser".
    policy:
      "done_by_coarser" (the paper's): a cell is done if an ancestor is a true positive, a ground-truth
          unity cell predicted unity (probability >= tau); false positives and negatives are not.
      "simple_fix": a cell is done if an ancestor is a ground-truth unity cell (Table 7).
      "naive": nothing is done; every level learns the full map (Table 7).
    Returns one bool mask per level, coarse to fine; level 0 is never done. No gradient flows through it.
    """
    strides = check_strides(strides)
    if policy not in RELABEL_POLICIES:
        raise ValueError(f"unknown relabel policy {policy!r}; choose one of {', '.join(RELABEL_POLICIES)}")
    done = [torch.zeros_like(unity[0], dtype=torch.bool)]
    for level in range(1, len(strides)):
        parent = level - 1
        decided = torch.zeros_like(done[parent])
        if policy != "naive":
            decided = unity[parent] == 1
            if policy == "done_by_coarser":
                if unity_probs is None:
                    raise ValueError('policy "done_by_coarser" needs the predicted unity probabilities')
                decided = decided & (unity_probs[parent].detach() >= tau)
        done.append(upsample_cells(done[parent] | decided, strides[parent] // strides[level]))
    return done


def relabel(target: torch.Tensor, done: torch.Tensor, ignore_value: int) -> torch.Tensor:
    """`target` with the done cells set to `ignore_value` (same shape as `done`)."""
    return torch.where(done, torch.full_like(target, ignore_value), target)


def unity_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy of one unity level: logits (B, h, w) against 0/1 targets, averaged over the
    cells that are not `UNITY_IGNORE`; 0 with zero gradient when there are none (S&F Eq. 1's BCE term)."""
    valid = target != UNITY_IGNORE
    if not bool(valid.any()):
        return logits.sum() * 0.0
    return F.binary_cross_entropy_with_logits(logits[valid].float(), target[valid].float())
