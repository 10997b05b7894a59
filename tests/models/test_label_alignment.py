"""With `loss_resolution: decoder` the labels a head trains on and the bilinear upsampling of its scores must
agree on where a stride-4 cell is: a head that learned its training labels perfectly predicts the label map
in place, not shifted (the top-left pixel of each cell shifted masks by about 1.5 px right and down).

The "model" here is the head alone on free score maps, trained by the head's own loss until it reproduces
its training targets: exactly what a network of unlimited capacity would learn."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from scaleseg.config import HeadConfig, PyramidConfig
from scaleseg.models.heads import build_head

C, H, W = 4, 64, 64


def shapes(seed: int, images: int = 12) -> torch.Tensor:
    """(images, H, W) label maps of axis-aligned rectangles and discs at arbitrary (odd, even) offsets."""
    rng = np.random.default_rng(seed)
    maps = np.zeros((images, H, W), np.int64)
    yy, xx = np.mgrid[:H, :W]
    for b in range(images):
        for _ in range(6):
            c = rng.integers(1, C)
            if rng.random() < 0.5:
                y0, x0 = rng.integers(0, H - 12, 2)
                h, w = rng.integers(7, 20, 2)
                maps[b, y0:y0 + h, x0:x0 + w] = c
            else:
                cy, cx, r = rng.integers(8, H - 8), rng.integers(8, W - 8), rng.integers(4, 10)
                maps[b][(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = c
    return torch.from_numpy(maps)


def fit_free_scores(head, target: torch.Tensor, steps: int = 150) -> dict:
    """Free score maps for every output of `head`, trained with head.loss on `target`."""
    torch.manual_seed(0)
    outputs = {k: [t.detach().clone().requires_grad_(True) for t in v] if isinstance(v, list)
               else v.detach().clone().requires_grad_(True)
               for k, v in head(torch.zeros(target.shape[0], 8, H // 4, W // 4)).items()}
    params = [t for v in outputs.values() for t in (v if isinstance(v, list) else [v])]
    opt = torch.optim.Adam(params, lr=0.5)
    for _ in range(steps):
        loss = sum(head.loss(outputs, target).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {k: [t.detach() for t in v] if isinstance(v, list) else v.detach() for k, v in outputs.items()}


def agreement_by_shift(pred: torch.Tensor, target: torch.Tensor, reach: int = 3) -> dict[tuple[int, int], float]:
    """Pixel accuracy of `pred` moved by (dy, dx) against `target`, on the pixels both cover."""
    out = {}
    for dy in range(-reach, reach + 1):
        for dx in range(-reach, reach + 1):
            p = pred[:, max(0, -dy): H - max(0, dy), max(0, -dx): W - max(0, dx)]
            t = target[:, max(0, dy): H - max(0, -dy), max(0, dx): W - max(0, -dx)]
            out[(dy, dx)] = (p == t).float().mean().item()
    return out


@pytest.mark.parametrize("structure", ["single", "pyramid"])
def test_a_head_that_learned_its_decoder_grid_labels_predicts_them_unshifted(structure):
    cfg = HeadConfig(structure=structure, loss_resolution="decoder",
                     pyramid=PyramidConfig(semantic_channels=8, unity_channels=8, tau=2.0, context=False))
    head = build_head(cfg, in_channels=8, num_classes=C, ignore_index=255)
    target = shapes(0)
    outputs = fit_free_scores(head, target)
    pred = head.decide(head.dense(outputs, (H, W)))
    scores = agreement_by_shift(pred, target)
    best = max(scores, key=scores.get)
    assert best == (0, 0), {k: round(v, 4) for k, v in sorted(scores.items(), key=lambda kv: -kv[1])[:4]}
    assert scores[(0, 0)] > 0.94 and scores[(0, 0)] - max(v for k, v in scores.items() if k != (0, 0)) > 0.003, scores


def brute_force_majority(target: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    B, H_, W_ = target.shape
    h, w = size
    sh, sw = -(-H_ // h), -(-W_ // w)
    out = torch.empty(B, h, w, dtype=target.dtype)
    for b in range(B):
        for i in range(h):
            for j in range(w):
                cell = [int(target[b, min(y, H_ - 1), min(x, W_ - 1)])
                        for y in range(i * sh, i * sh + sh) for x in range(j * sw, j * sw + sw)]
                counts = Counter(cell)
                most = max(counts.values())
                out[b, i, j] = min(v for v, n in counts.items() if n == most)
    return out


@pytest.mark.parametrize("shape,size", [((2, 16, 16), (4, 4)), ((1, 50, 38), (13, 10)), ((2, 12, 8), (3, 2))])
def test_majority_downsample_is_each_cells_most_frequent_label(shape, size):
    from scaleseg.models.heads.single import majority_downsample

    torch.manual_seed(1)
    target = torch.randint(0, 3, shape)
    target[0, :3, :3] = 255  # ignore is a value like any other: a cell mostly ignored stays ignored
    target[..., -1] = 2**40  # ids beyond float precision survive
    assert torch.equal(majority_downsample(target, size), brute_force_majority(target, size))
