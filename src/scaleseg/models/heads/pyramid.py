"""The Specialize-and-Fuse pyramidal output structure (seed 004): unity head, semantic head with the
coarse-to-fine contextual module, S&F Eq. 1 training with "done by coarser" relabelling, S&F Eq. 2 fusion.

Levels are ordered coarse to fine (the paper's l = 1..L), e.g. strides (32, 16, 8, 4); the finest
stride is the stride of the features the head receives. Each semantic level ends in its own class
scorer (DESIGN.md): linear (the paper) or the ESS embedding scorer, whose class-embedding table is one
parameter shared by all levels, so the pyramid scales to many classes.

Choices where the paper is silent (documented in docs/pyramid.md):
* Inputs are padded at the bottom/right to a multiple of the coarsest stride (images with zeros, i.e.
  the mean colour after normalisation; labels with ignore) and outputs are cropped back.
* The finest semantic level is trained like the single-level head: its scores are bilinearly
  upsampled to the label size (`loss_resolution: full`) or the labels downsampled to its grid by each
  cell's majority (`decoder`), with done-by-coarser pixels ignored; the finest level has no unity prediction (section
  3.1: every finest cell is taken as unity).
* The unity head's last shared "Conv1x1" on the difference map is Conv1x1-BN-ReLU-Conv1x1: a single
  linear map of the difference cannot measure its size in every direction.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from scaleseg.losses.pyramid import (
    UNITY_IGNORE,
    check_strides,
    done_by_coarser,
    pad_labels,
    pyramid_targets,
    relabel,
    unity_loss,
    upsample_cells,
)
from scaleseg.models.decoders.deeplabv3plus import conv_norm_relu
from scaleseg.models.heads.base import ClassScorer, SegmentationHead
from scaleseg.models.heads.single import majority_downsample, resize_scores
from scaleseg.models.norm import NormLayer, norm_1d


# The Table 9 tallies (L x L x 3 x C int64) are kept only up to this size (about 175,000 classes at four levels).
TABLE9_MAX_BYTES = 64 << 20


def _pool_matrix(size, bins: int, like: torch.Tensor) -> torch.Tensor:
    """(bins, size) averaging weights of adaptive average pooling: bin i covers [floor(i * size / bins),
    ceil((i + 1) * size / bins)), as `F.adaptive_avg_pool2d`. `size` may be symbolic (torch.export)."""
    i = torch.arange(bins, device=like.device)
    start = (i * size) // bins
    end = ((i + 1) * size + bins - 1) // bins
    j = torch.arange(size, device=like.device)
    inside = (j[None] >= start[:, None]) & (j[None] < end[:, None])
    return inside.to(like.dtype) / (end - start).to(like.dtype)[:, None]


def pyramid_pool(x: torch.Tensor, bins: tuple[int, ...]) -> torch.Tensor:
    """Spatial pyramid pooling, flattened (S&F Eq. 6, 10): (B, D, h, w) -> (B, D, sum(b * b)).

    Adaptive average pooling written as two matrix products whose weights follow the input's size, so
    the ONNX export traces this very function for any image size (`F.adaptive_avg_pool2d` would freeze
    its bins at the traced size); equal to `adaptive_avg_pool2d` up to float rounding."""
    h, w = x.shape[-2:]
    return torch.cat([(_pool_matrix(h, b, x) @ x @ _pool_matrix(w, b, x).T).flatten(2) for b in bins], dim=2)


def conv1d_norm_relu(cin: int, cout: int, norm_layer: NormLayer | None = None) -> nn.Sequential:
    """Conv1x1 (1-d) + norm + ReLU on (B, cin, T) tokens; norm_layer None: nn.BatchNorm1d (see norm_1d)."""
    norm = norm_1d(norm_layer)
    return nn.Sequential(nn.Conv1d(cin, cout, 1, bias=False), norm(cout), nn.ReLU(inplace=True))


def fuse(
    coarse_dense: list[torch.Tensor],
    coarse_unity: list[torch.Tensor],
    strides,
    finest_dense: torch.Tensor,
    tau: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """S&F Eq. 2: every pixel takes the prediction of the coarsest level whose cell is unity (>= tau), the
    finest level's otherwise.

    coarse_dense: per coarse level (coarse to fine), (B, K, h_l, w_l) dense maps (probabilities or unit
        embeddings) at cell resolution; coarse_unity: their unity probabilities (B, h_l, w_l);
    strides: the strides of all levels, coarse to fine (the last is the finest level's);
    finest_dense: (B, K, H, W) at pixel resolution. tau >= 1 trusts no unity cell (finest level only).
    Returns the fused (B, K, H, W) map and the level each pixel came from (B, H, W), 0 = coarsest.
    """
    strides = check_strides(strides)
    B, _, H, W = finest_dense.shape
    fused = finest_dense
    level = torch.full((B, H, W), len(strides) - 1, dtype=torch.long, device=finest_dense.device)
    if tau >= 1:
        return fused, level
    for index in reversed(range(len(coarse_dense))):  # fine to coarse: the coarsest unity cell wins
        unity = upsample_cells(coarse_unity[index] >= tau, strides[index])[:, :H, :W]  # (B, H, W)
        cells = upsample_cells(coarse_dense[index], strides[index])[..., :H, :W]  # (B, K, H, W)
        fused = torch.where(unity[:, None], cells.to(fused.dtype), fused)
        level = level.masked_fill(unity, index)
    return fused, level


class UnityHead(nn.Module):
    """Section 4.1: X -> X_u (D_u channels); per coarse level a cell centroid (average pooling + a
    shared Conv1x1), its nearest-upsampled difference to Conv1x1(X_u), a shared classifier to one
    logit per pixel, min pooling per cell. Output: unity logits (B, h_l, w_l) per coarse level."""

    def __init__(
        self, in_channels: int, channels: int, factors: tuple[int, ...], norm_layer: NormLayer | None = None
    ) -> None:
        super().__init__()
        norm_layer = norm_layer or nn.BatchNorm2d
        self.factors = factors  # cell size of each coarse level in finest-level pixels, coarse to fine
        self.project = conv_norm_relu(in_channels, channels, 1, norm_layer)  # X -> X_u
        self.pixel = nn.Conv2d(channels, channels, 1)
        self.centroid = nn.Conv2d(channels, channels, 1)
        self.classifier = nn.Sequential(
            nn.Conv2d(channels, channels, 1, bias=False), norm_layer(channels), nn.ReLU(inplace=True),
            nn.Conv2d(channels, 1, 1),
        )

    def forward(self, features: torch.Tensor) -> list[torch.Tensor]:
        xu = self.project(features)  # (B, D_u, h, w)
        pixels = self.pixel(xu)
        diffs = [pixels - upsample_cells(self.centroid(F.avg_pool2d(xu, f)), f) for f in self.factors]
        B = features.shape[0]
        # (n_levels * B, 1, h, w): one BatchNorm over all levels (GroupNorm: per map)
        logits = self.classifier(torch.cat(diffs, dim=0))
        out = []
        for i, f in enumerate(self.factors):
            pixel_logits = logits[i * B : (i + 1) * B]
            out.append(-F.max_pool2d(-pixel_logits, f)[:, 0])  # min pooling = the most deviating pixel
        return out


CONTEXT_MODES = ("ours", "none", "anl", "anl_multi")


def context_mode(context) -> str:
    """`pyramid.context` as a mode: true -> "ours" (the coarse-to-fine module), false -> "none" (Table 6's
    "-"), or "anl" / "anl_multi" (Table 6's other columns)."""
    mode = {True: "ours", False: "none"}.get(context, context) if isinstance(context, bool) else context
    if mode not in CONTEXT_MODES:
        raise ValueError(f"unknown context {context!r}; use true, false, 'anl' or 'anl_multi'")
    return mode


class AsymmetricNonLocal(nn.Module):
    """ANL's asymmetric pyramid non-local block (APNB; Zhu et al., ICCV 2019), the comparison module of
    S&F Table 6: every pixel attends to the `bins` pyramid-pooled positions (1 + 9 + 36 + 64 = 110 for
    (1, 3, 6, 8)) instead of every pixel. Query and key share one Conv1x1-BN-ReLU to C/2 channels, the
    value is a Conv1x1 to C/2; attention softmax(q^T k / sqrt(C/2)) over the pooled positions; the
    attended values go through a Conv1x1 back to C and are fused with the input by Conv1x1-BN-ReLU of
    their concatenation (ANL's APNB output). (B, C, h, w) -> (B, C, h, w)."""

    def __init__(self, channels: int, bins, norm_layer: NormLayer | None = None) -> None:
        super().__init__()
        norm2d = norm_layer or nn.BatchNorm2d
        inner = max(1, channels // 2)
        self.bins = tuple(bins)
        self.key = conv_norm_relu(channels, inner, 1, norm2d)  # query and key alike
        self.value = nn.Conv2d(channels, inner, 1)
        self.out = nn.Conv2d(inner, channels, 1)
        self.fuse = conv_norm_relu(2 * channels, channels, 1, norm2d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, _, h, w = x.shape
        k = self.key(x)  # (B, C', h, w)
        keys = pyramid_pool(k, self.bins)  # (B, C', S)
        values = pyramid_pool(self.value(x), self.bins)  # (B, C', S)
        attention = torch.softmax(k.flatten(2).transpose(1, 2) @ keys / math.sqrt(k.shape[1]), dim=-1)  # (B, hw, S)
        attended = (values @ attention.transpose(1, 2)).view(B, -1, h, w)  # (B, C', h, w)
        return self.fuse(torch.cat([self.out(attended), x], dim=1))


class ContextAggregation(nn.Module):
    """CA (S&F Eq. 8-9): attention from the level's cells to the context tokens, concat, Conv1x1-BN-ReLU."""

    def __init__(self, channels: int, key_channels: int, norm_layer: NormLayer | None = None) -> None:
        super().__init__()
        self.query = nn.Conv2d(channels, key_channels, 1)
        self.key = nn.Conv1d(channels, key_channels, 1)
        self.value = nn.Conv1d(channels, channels, 1)
        self.aggregate = conv_norm_relu(2 * channels, channels, 1, norm_layer or nn.BatchNorm2d)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        B, D, h, w = x.shape
        q = self.query(x).flatten(2).transpose(1, 2)  # (B, n, Dk)
        k = self.key(context).transpose(1, 2)  # (B, T, Dk)
        v = self.value(context).transpose(1, 2)  # (B, T, D)
        att = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]  # (B, n, D)
        att = att.transpose(1, 2).reshape(B, D, h, w)
        return self.aggregate(torch.cat([att, x], dim=1))  # X'^(l), S&F Eq. 9


class ContextUpdate(nn.Module):
    """CU (S&F Eq. 10-11): pyramid-pool the refined level, concat with the context, Conv1x1-BN-ReLU."""

    def __init__(self, channels: int, bins: tuple[int, ...], norm_layer: NormLayer | None = None) -> None:
        super().__init__()
        self.bins = bins
        self.update = conv1d_norm_relu(2 * channels, channels, norm_layer)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self.update(torch.cat([pyramid_pool(x, self.bins), context], dim=1))  # (B, D, T)


class SemanticHead(nn.Module):
    """Section 4.2: Conv1x1 to D_s, average pooling to every level (S&F Eq. 3), the coarse-to-fine
    contextual module (S&F Eq. 4-11; `context=False` is the "simplest" variant of Table 6), and per level
    the ConvBlock's Conv1x1-BN-ReLU (its final Conv1x1 to classes is the level's scorer, S&F Eq. 7).
    Table 6's other columns: `context="anl"`, one ANL block (`AsymmetricNonLocal`) on the head's input
    features; `"anl_multi"`, one ANL block on each level (after the pooling, instead of the module)."""

    def __init__(
        self,
        in_channels: int,
        channels: int,
        factors: tuple[int, ...],
        context,
        bins,
        norm_layer: NormLayer | None = None,
    ) -> None:
        super().__init__()
        norm2d = norm_layer or nn.BatchNorm2d
        self.factors = factors  # every level, coarse to fine; the last is 1
        self.bins = tuple(bins)
        mode = context_mode(context)
        if mode == "anl":
            self.anl = AsymmetricNonLocal(in_channels, self.bins, norm_layer)
        self.project = conv_norm_relu(in_channels, channels, 1, norm2d)  # X -> X^(L)
        self.context = mode == "ours"
        if mode == "anl_multi":
            self.anl_levels = nn.ModuleList(AsymmetricNonLocal(channels, self.bins, norm_layer) for _ in factors)
        if self.context:
            self.aggregate = nn.ModuleList(ContextAggregation(channels, channels // 2, norm_layer) for _ in factors)
            # theta^(L) would feed no level: the finest level has no update module
            self.update = nn.ModuleList(ContextUpdate(channels, self.bins, norm_layer) for _ in factors[:-1])
        self.blocks = nn.ModuleList(conv_norm_relu(channels, channels, 1, norm2d) for _ in factors)

    def forward(self, features: torch.Tensor) -> list[torch.Tensor]:
        if hasattr(self, "anl"):
            features = self.anl(features)
        x = self.project(features)  # (B, D_s, h, w)
        levels = [F.avg_pool2d(x, f) if f > 1 else x for f in self.factors]  # S&F Eq. 3
        if hasattr(self, "anl_levels"):
            levels = [anl(x_level) for anl, x_level in zip(self.anl_levels, levels)]
        if self.context:
            theta = pyramid_pool(x, self.bins)  # theta^(0), S&F Eq. 6: (B, D_s, T)
            refined = []
            for index, x_level in enumerate(levels):
                x_level = self.aggregate[index](x_level, theta)  # S&F Eq. 4
                if index < len(self.update):
                    theta = self.update[index](x_level, theta)  # S&F Eq. 5
                refined.append(x_level)
            levels = refined
        return [block(x_level) for block, x_level in zip(self.blocks, levels)]


class PyramidHead(SegmentationHead):
    """features (B, D, H/s_L, W/s_L) -> {"semantic": [scores per level], "unity": [logits per coarse level]}.

    Scores of level l are (B, K, H/s_l, W/s_l) (K = C for a linear scorer, d for an embedding scorer);
    unity logits (B, H/s_l, W/s_l) for the L - 1 coarse levels. `norm_layer` builds every norm layer from a
    channel count (default nn.BatchNorm2d, with nn.BatchNorm1d after the context update's Conv1d); any other
    factory must accept (N, C, *) inputs, as nn.GroupNorm does (scaleseg.models.norm.make_norm).
    """

    def __init__(
        self,
        scorers: list[ClassScorer],
        in_channels: int,
        strides=(32, 16, 8, 4),
        unity_channels: int = 64,
        semantic_channels: int = 512,
        context: bool = True,
        context_bins=(1, 3, 6, 8),
        tau: float = 0.9,
        relabel: str = "done_by_coarser",
        relabel_tau: float | None = None,
        loss_resolution: str = "full",
        ignore_index: int = 255,
        norm_layer: NormLayer | None = None,
    ) -> None:
        super().__init__()
        self.strides = check_strides(strides)
        if len(scorers) != len(self.strides):
            raise ValueError(f"{len(self.strides)} pyramid levels need as many scorers, got {len(scorers)}")
        if len(self.strides) < 2:
            raise ValueError("a pyramid needs at least two levels (strides), e.g. [4, 32]")
        finest = self.strides[-1]
        factors = tuple(s // finest for s in self.strides)
        self.size_divisor = self.strides[0]  # the Segmentor pads inputs to a multiple of this
        self.tau = tau
        self.relabel_policy = relabel
        self.relabel_tau = tau if relabel_tau is None else relabel_tau
        self.loss_resolution = loss_resolution
        self.ignore_index = ignore_index
        mode = context_mode(context)
        if mode == "anl":  # "appending a single ANL to the backbone" (Table 6): both heads see its output
            self.anl = AsymmetricNonLocal(in_channels, context_bins, norm_layer)
        self.unity_head = UnityHead(in_channels, unity_channels, factors[:-1], norm_layer)
        self.semantic_head = SemanticHead(in_channels, semantic_channels, factors, "none" if mode == "anl" else mode,
                                          context_bins, norm_layer)
        self.scorers = nn.ModuleList(scorers)

    def forward(self, features: torch.Tensor) -> dict[str, list[torch.Tensor]]:
        if hasattr(self, "anl"):
            features = self.anl(features)
        semantic = [scorer(x) for scorer, x in zip(self.scorers, self.semantic_head(features))]
        return {"semantic": semantic, "unity": self.unity_head(features)}

    def _padded_size(self, outputs) -> tuple[int, int]:
        h, w = outputs["semantic"][-1].shape[-2:]
        return h * self.strides[-1], w * self.strides[-1]

    def loss(self, outputs, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """S&F Eq. 1: the mean over levels of each scorer's loss + the mean unity BCE over the coarse levels,
        on targets relabelled by the configured policy (computed without gradient)."""
        semantic, unity = outputs["semantic"], outputs["unity"]
        padded = pad_labels(target, self.size_divisor, self.ignore_index)
        if tuple(padded.shape[-2:]) != self._padded_size(outputs):
            raise ValueError(
                f"labels of size {tuple(target.shape[-2:])} (padded {tuple(padded.shape[-2:])}) do not match the "
                f"finest pyramid level {tuple(semantic[-1].shape[-2:])} at stride {self.strides[-1]}: the features "
                "must come at the finest pyramid stride"
            )
        gt = pyramid_targets(padded, self.strides, self.ignore_index)
        probs = [torch.sigmoid(u.detach().float()) for u in unity]
        done = done_by_coarser(gt.unity, self.strides, self.relabel_policy, probs, self.relabel_tau)
        L = len(self.strides)
        terms: dict[str, torch.Tensor] = {}
        for index, (scorer, scores) in enumerate(zip(self.scorers, semantic)):
            if index < L - 1:
                level_target = relabel(gt.semantic[index], done[index], self.ignore_index)
            elif self.loss_resolution == "full":
                scores = resize_scores(scores, padded.shape[-2:])
                level_target = relabel(padded, upsample_cells(done[index], self.strides[index]), self.ignore_index)
            else:
                level_target = relabel(majority_downsample(padded, scores.shape[-2:]), done[index], self.ignore_index)
            for name, value in scorer.loss(scores, level_target, regularize=index == 0).items():
                share = value if name != "ce" else value / L
                terms[name] = terms[name] + share if name in terms else share
        terms["unity"] = sum(
            unity_loss(u, relabel(gt.unity[i], done[i], UNITY_IGNORE)) for i, u in enumerate(unity)
        ) / (L - 1)
        return terms

    def fuse_outputs(self, outputs, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(fused dense map (B, K, H, W), level of each pixel (B, H, W)) for an image of `size`."""
        H, W = size
        semantic = outputs["semantic"]
        finest = self.scorers[-1].dense(resize_scores(semantic[-1], self._padded_size(outputs)))[..., :H, :W]
        coarse = [scorer.dense(scores) for scorer, scores in zip(self.scorers[:-1], semantic[:-1])]
        probs = [torch.sigmoid(u.float()) for u in outputs["unity"]]
        return fuse(coarse, probs, self.strides, finest, self.tau)

    def dense(self, outputs, size: tuple[int, int]) -> torch.Tensor:
        return self.fuse_outputs(outputs, size)[0]

    def dense_with_counts(
        self, outputs, size: tuple[int, int], target: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The fused map and {"level_pixels": (L,) pixels taken from each level, coarse to fine}; with the
        view's labels `target` (B, H, W) also the tallies of S&F Table 9 and of the unity head
        (`diagnostic_counts`)."""
        fused, level = self.fuse_outputs(outputs, size)
        counts = {"level_pixels": torch.bincount(level.flatten(), minlength=len(self.strides))}
        if target is not None:
            counts.update(self.diagnostic_counts(outputs, size, level, target))
        return fused, counts

    def _table9_classes(self) -> int:
        """Classes the Table 9 tallies cover: all of them, or 0 (no tallies) where L x L x 3 x C int64
        counts would pass TABLE9_MAX_BYTES (about 175,000 classes at four levels)."""
        C = self.scorers[-1].num_classes
        L = len(self.strides)
        return C if L * L * 3 * C * 8 <= TABLE9_MAX_BYTES else 0

    @torch.no_grad()
    def diagnostic_counts(self, outputs, size: tuple[int, int], level: torch.Tensor,
                          target: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-view tallies for S&F Table 9 and the unity head's precision and recall.

        "table9" (L, L, 3, C) int64: for the pixels the predicted unity pyramid assigns to level l (`level`,
        the fuse's choice; first index) and the semantic prediction of level l' alone (second index: the
        coarse levels' cell decisions repeated over their cells, the finest level's bilinear map decided per
        pixel), the intersection, prediction and label areas per class over the labelled pixels.
        "unity_tp" / "unity_pred" / "unity_true" (L - 1,): per coarse level, cells predicted unity (p >= tau)
        that are unity in the ground truth, cells predicted unity, cells unity in the ground truth, over the
        cells holding a labelled pixel (every such cell, whether or not a coarser level decided it)."""
        H, W = size
        L = len(self.strides)
        target = target.to(level.device).long()
        semantic = outputs["semantic"]
        counts: dict[str, torch.Tensor] = {}
        C = self._table9_classes()
        if C:
            preds = [upsample_cells(scorer.decide(scorer.dense(scores)), stride)[..., :H, :W]
                     for scorer, scores, stride in zip(self.scorers[:-1], semantic[:-1], self.strides[:-1])]
            preds.append(self.scorers[-1].decide(
                self.scorers[-1].dense(resize_scores(semantic[-1], self._padded_size(outputs)))[..., :H, :W]))
            valid = (target != self.ignore_index) & (target >= 0) & (target < C)
            group, label = level[valid], target[valid]
            table = torch.zeros((L, L, 3, C), dtype=torch.int64, device=level.device)
            for index, pred in enumerate(preds):
                pred = pred[valid].long()
                cell = table[:, index]  # (L, 3, C): this semantic level, every unity group
                hit = pred == label
                cell[:, 0] += torch.bincount(group[hit] * C + label[hit], minlength=L * C).view(L, C)
                cell[:, 1] += torch.bincount(group * C + pred, minlength=L * C).view(L, C)
                cell[:, 2] += torch.bincount(group * C + label, minlength=L * C).view(L, C)
            counts["table9"] = table.cpu()
        padded = pad_labels(target, self.size_divisor, self.ignore_index)
        gt = pyramid_targets(padded, self.strides, self.ignore_index)
        tp, pred_pos, true_pos = (torch.zeros(L - 1, dtype=torch.int64) for _ in range(3))
        for index, logits in enumerate(outputs["unity"]):
            truth = gt.unity[index]
            known = truth != UNITY_IGNORE
            predicted = (torch.sigmoid(logits.float()) >= self.tau) & known
            actual = (truth == 1) & known
            tp[index] = int((predicted & actual).sum())
            pred_pos[index] = int(predicted.sum())
            true_pos[index] = int(actual.sum())
        counts.update(unity_tp=tp, unity_pred=pred_pos, unity_true=true_pos)
        return counts

    def empty_counts(self) -> dict[str, torch.Tensor]:
        L = len(self.strides)
        counts = {"level_pixels": torch.zeros(L, dtype=torch.int64)}
        if self._table9_classes():
            counts["table9"] = torch.zeros((L, L, 3, self._table9_classes()), dtype=torch.int64)
        counts.update({name: torch.zeros(L - 1, dtype=torch.int64) for name in ("unity_tp", "unity_pred", "unity_true")})
        return counts

    def summarize_counts(self, counts: dict[str, torch.Tensor]) -> dict[str, float]:
        """In percent: the share of pixels each level decided ({"level_stride_32": 41.2, ...}; S&F Table 9's
        split); where the labels were tallied, S&F Table 9 itself, "table9_pixels<s>_level<s'>": the mIoU of
        level s' alone over the pixels assigned to level s, and per coarse level "unity_precision_stride_<s>"
        and "unity_recall_stride_<s>". {} if nothing was fused; a value with nothing to count is left out."""
        pixels = counts.get("level_pixels")
        if pixels is None or int(pixels.sum()) == 0:
            return {}
        total = float(pixels.sum())
        out = {f"level_stride_{s}": round(100 * float(n) / total, 2) for s, n in zip(self.strides, pixels.tolist())}
        table = counts.get("table9")
        if table is not None and int(table[..., 2, :].sum()):
            from scaleseg.metrics import miou_from_areas

            for g, s in enumerate(self.strides):
                for j, s2 in enumerate(self.strides):
                    inter, pred, label = (table[g, j, i].double().numpy() for i in range(3))
                    value = miou_from_areas(inter, pred, label)
                    if value == value:  # not NaN: the group has labelled pixels
                        out[f"table9_pixels{s}_level{s2}"] = round(100 * value, 2)
        if "unity_tp" in counts and int(counts["unity_true"].sum() + counts["unity_pred"].sum()):
            for i, s in enumerate(self.strides[:-1]):
                tp, pred, true = (int(counts[name][i]) for name in ("unity_tp", "unity_pred", "unity_true"))
                if pred:
                    out[f"unity_precision_stride_{s}"] = round(100 * tp / pred, 2)
                if true:
                    out[f"unity_recall_stride_{s}"] = round(100 * tp / true, 2)
        return out

    def describe_counts(self, summary: dict[str, float]) -> list[str]:
        shares = [f"stride {s}: {summary[f'level_stride_{s}']:.2f}%" for s in self.strides if f"level_stride_{s}" in summary]
        lines = [f"pixels decided per pyramid level: {', '.join(shares)}"] if shares else []
        if any(key.startswith("table9_") for key in summary):
            lines.append("S&F Table 9, mIoU (%) of each level's semantic prediction alone (rows) over the pixels the "
                         "predicted unity pyramid assigns to each level (columns):")
            width = 11
            lines.append(f"{'level':<{width}}" + "".join(f"{f'pixels s{s}':>{width}}" for s in self.strides))
            for s2 in self.strides:
                cells = [summary.get(f"table9_pixels{s}_level{s2}") for s in self.strides]
                lines.append(f"{f'stride {s2}':<{width}}" + "".join(
                    f"{'-' if v is None else f'{v:.2f}':>{width}}" for v in cells))
        unity = [(s, summary.get(f"unity_precision_stride_{s}"), summary.get(f"unity_recall_stride_{s}"))
                 for s in self.strides[:-1]]
        if any(p is not None or r is not None for _, p, r in unity):
            text = ", ".join(f"stride {s}: {'-' if p is None else f'{p:.2f}'} / {'-' if r is None else f'{r:.2f}'}"
                             for s, p, r in unity)
            lines.append(f"unity head precision / recall (%) against the ground-truth unity cells: {text}")
        return lines
