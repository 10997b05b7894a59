"""The built-in dataset ``synthetic``: procedurally generated segmentation for any class count.

No real dataset can be downloaded where scaleseg is developed and tested, so the default training
job runs on this generator. It is a real learning problem with the shape of the hard case: many
classes (default 1000, anything from 2 to 100,000 works), a long-tailed class frequency, large
"stuff" regions, small "things", thin ignore bands, and classes that can only be told apart by
their local appearance. Every sample is generated on the fly from ``(seed, split, index)``.

Generative model
----------------
**Classes and families.** The ``C`` classes are split into ``num_stuff = round(stuff_fraction * C)``
stuff classes (ids ``0 .. num_stuff-1``) and the thing classes (ids ``num_stuff .. C-1``); there is
always at least one of each. Classes are grouped into ``F`` families (default ``round(sqrt(C))``):
class ``c`` belongs to family ``c % F`` and is member ``k = c // F`` of it, so the most frequent
classes are spread over many families and a family mixes stuff and thing classes.

**Appearance.** A pixel of class ``c`` has colour ``colour1 + t * (colour2 - colour1)`` where
``t`` in [0, 1] is the family's *pattern* evaluated at the pixel (then brightness jitter and noise):

* the family fixes the pattern type (``f % 10`` indexes ``PATTERNS``: solid, stripes, checker, dots,
  rings, waves, noise, grid, zigzag, plaid), a base colour (each family owns one cell of a grid
  over the RGB cube, so two families never share a colour), a "contrast" colour towards the cube
  corner farthest from the base colour, and a base orientation;
* the member index ``k`` picks the rest, each attribute from a spaced set: the first colour from a
  small 3-D lattice around the base colour inside the family's cell (``k mod n_colour``), the
  second colour from 4 points around the contrast colour (``k mod 4``), the period from
  6, 8, 10, 13, 16 px (``k mod 5``) and the orientation from 3 angles 60 degrees apart
  (``k mod 3``). ``n_colour`` is coprime to 60, so by the Chinese remainder theorem every member
  of a family gets a different combination; patterns that ignore an attribute (``solid`` has no
  second colour, period or orientation; ``rings`` no orientation) get a larger colour lattice.

So classes of one family share the pattern type and look alike (nearby first colours, nearby
second colours), while every class differs from every other in at least one spaced parameter.
Pattern periods are in pixels and do not depend on the image size (stripes are >= 3 px wide, so
they survive a stride-4 network). With very many classes (e.g. 100,000: 316 families of ~316
members) the colour lattice of the ``solid`` families gets fine (steps of ~3 grey levels): that is
the intended hard case, not a bug.

Per instance (each stuff region and each thing) the pattern gets a random phase (and a random
centre for rings, a random lattice for noise) and the colours a brightness factor in
[0.97, 1.03]; finally uniform pixel noise with standard deviation 0.03 (about 8 grey levels) is
added independently to each channel.

**Layout.** An image is a stuff layer with things painted on top:

* stuff: 2-6 regions, a Voronoi partition of the image whose coordinates are warped by a smooth
  two-octave cubic B-spline noise field, so boundaries are irregular; each region draws a stuff
  class from the stuff prior (two regions may draw the same class);
* things: 0-``max_things`` objects (uniform), each a disc, ellipse, rectangle or triangle of size
  5-25% of ``min(H, W)``, randomly placed and rotated, drawing a thing class from the thing prior;
  later things occlude earlier ones.

**Long tail.** Within the stuff classes, and separately within the thing classes, the class of
frequency rank ``r`` (rank = position within its group, i.e. ``c`` for stuff and ``c - num_stuff``
for things, so ids are sorted by frequency inside each group) is drawn with probability
proportional to ``1 / (r + 1) ** zipf_exponent``. ``class_prior`` holds these probabilities: it
sums to 1 over the stuff classes and to 1 over the thing classes (2 in total). Pixel frequencies
follow the same order (stuff regions are larger than things).

**Ignore.** As in Pascal VOC, a band of ``boundary_ignore`` px along every thing boundary (against
stuff or another thing) is labelled ``ignore_index``; an odd width puts the extra pixel on the
thing's side, so the default width 1 is the thing's outermost pixel ring. Boundaries between two
stuff regions are not ignored. Optionally each stuff region is, with probability
``unlabelled_fraction`` (default 0), left unlabelled (all ``ignore_index``) while still drawn.
``ignore_index`` is ``default_ignore_index(C)``: 255, 65535, or -1 above 65535 classes.

**Determinism.** Each sample uses its own ``numpy.random.default_rng((seed, split_id, index))``
(never global state), so a sample is the same in every process and DataLoader worker and on every
run, and train and val are different streams. Everything is derived from that stream with plain
float arithmetic (thing masks use no trigonometry at all); across machines whose BLAS or SIMD math
kernels round differently, at most a rare pixel on a stuff boundary, or one grey level of the
image, could differ. The random draws do not depend on ``boundary_ignore`` or
``unlabelled_fraction``: changing those changes the labels only, never the image.

Cost: vectorised numpy, about 2.3 ms for a 128x128 sample and ~30 ms for 512x512 on one core.
"""

from __future__ import annotations

import math
import operator
from functools import lru_cache
from typing import Callable

import numpy as np
import torch.utils.data

from scaleseg.errors import ConfigError

__all__ = ["PATTERNS", "SyntheticSegmentation", "default_ignore_index"]

PATTERNS: tuple[str, ...] = (
    "solid", "stripes", "checker", "dots", "rings", "waves", "noise", "grid", "zigzag", "plaid",
)
PERIODS: tuple[float, ...] = (6.0, 8.0, 10.0, 13.0, 16.0)  # pattern periods in pixels
NUM_SECOND_COLOURS = 4
NUM_ORIENTATIONS = 3  # 60 degrees apart; distinct modulo 90 degrees as well
SPLITS: dict[str, int] = {"train": 0, "val": 1}
SHAPES: tuple[str, ...] = ("disc", "ellipse", "rectangle", "triangle")

PIXEL_NOISE = 0.03
BRIGHTNESS_JITTER = 0.03
MIN_STUFF_REGIONS, MAX_STUFF_REGIONS = 2, 6
COLOUR_CELL_FILL = 0.4  # a family's colour lattice spans this fraction of its cell on each side
SECOND_COLOUR_SPREAD = 0.05  # distance of the 4 second colours from the family's contrast colour
THING_SIZE = (0.05, 0.25)  # fraction of min(H, W)
WARP_OCTAVES = ((2, 0.3), (7, 0.08))  # (B-spline cells per image side, amplitude / sqrt(H W))

_GOLDEN = 0.6180339887498949
_R3 = (0.8191725133961645, 0.6710436067037893, 0.5497004779019703)  # R3 low-discrepancy steps
_TETRA = np.array([[1, 1, 1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1]], dtype=np.float64)
# Equilateral triangle vertex directions (cos, sin of 90, 210, 330 degrees), exact literals.
_TRI_DIRS = ((0.0, 1.0), (-0.8660254037844386, -0.5), (0.8660254037844386, -0.5))


def default_ignore_index(num_classes: int) -> int:
    """255 if C <= 255, 65535 if C <= 65535, else -1 (16-bit label convention; -1 when even 16 bits are too few)."""
    if num_classes <= 255:
        return 255
    if num_classes <= 65535:
        return 65535
    return -1


# --------------------------------------------------------------------------------------------
# Patterns: each maps pixel coordinates (float32 arrays y, x) to a mix weight t in [0, 1].
# --------------------------------------------------------------------------------------------

PatternFn = Callable[..., np.ndarray]


def _frac(a: np.ndarray) -> np.ndarray:
    return a - np.floor(a)


def _rotate(y: np.ndarray, x: np.ndarray, cos_t: float, sin_t: float) -> tuple[np.ndarray, np.ndarray]:
    u = x * np.float32(cos_t) + y * np.float32(sin_t)
    v = y * np.float32(cos_t) - x * np.float32(sin_t)
    return u, v


def _solid(y, x, period, cos_t, sin_t, centre, rng) -> np.ndarray:
    return np.zeros_like(y)


def _stripes(y, x, period, cos_t, sin_t, centre, rng) -> np.ndarray:
    u, _ = _rotate(y, x, cos_t, sin_t)
    return (_frac(u * np.float32(1.0 / period) + np.float32(rng.random())) < 0.5).astype(np.float32)


def _checker(y, x, period, cos_t, sin_t, centre, rng) -> np.ndarray:
    u, v = _rotate(y, x, cos_t, sin_t)
    ph = rng.random(2).astype(np.float32)
    s = np.float32(1.0 / period)  # two squares per period along each axis
    return ((_frac(u * s + ph[0]) < 0.5) ^ (_frac(v * s + ph[1]) < 0.5)).astype(np.float32)


def _dots(y, x, period, cos_t, sin_t, centre, rng) -> np.ndarray:
    u, v = _rotate(y, x, cos_t, sin_t)
    ph = rng.random(2).astype(np.float32)
    s = np.float32(1.0 / period)
    du = _frac(u * s + ph[0]) - np.float32(0.5)
    dv = _frac(v * s + ph[1]) - np.float32(0.5)
    return (du * du + dv * dv < np.float32(0.09)).astype(np.float32)  # dot radius 0.3 period


def _rings(y, x, period, cos_t, sin_t, centre, rng) -> np.ndarray:
    jitter = (rng.random(3).astype(np.float32) - 0.5) * np.float32(2 * period)
    dy = y - np.float32(centre[0]) - jitter[0]
    dx = x - np.float32(centre[1]) - jitter[1]
    rho = np.sqrt(dy * dy + dx * dx)
    return np.abs(np.float32(2.0) * _frac(rho * np.float32(1.0 / period) + jitter[2]) - np.float32(1.0))


def _waves(y, x, period, cos_t, sin_t, centre, rng) -> np.ndarray:
    u, v = _rotate(y, x, cos_t, sin_t)
    ph = rng.random(2).astype(np.float32) * np.float32(2 * np.pi)
    w = np.float32(2 * np.pi / period)
    bend = np.float32(0.35 * period) * np.sin(v * (w / np.float32(2.5)) + ph[1])
    return np.float32(0.5) + np.float32(0.5) * np.sin((u + bend) * w + ph[0])


def _noise(y, x, period, cos_t, sin_t, centre, rng) -> np.ndarray:
    """Anisotropic value noise (blobs elongated 2:1 along the orientation), contrast-stretched."""
    u, v = _rotate(y, x, cos_t, sin_t)
    if u.size == 0:
        return u
    gu = u - u.min()
    gu *= np.float32(1.0 / (0.8 * period))
    gv = v - v.min()
    gv *= np.float32(1.0 / (0.4 * period))
    fu, fv = np.floor(gu), np.floor(gv)
    iu, iv = fu.astype(np.int32), fv.astype(np.int32)
    fu = gu - fu
    fv = gv - fv
    fu = fu * fu * (np.float32(3) - np.float32(2) * fu)  # smoothstep
    fv = fv * fv * (np.float32(3) - np.float32(2) * fv)
    cols = int(iv.max()) + 2
    grid = rng.random((int(iu.max()) + 2) * cols + 1, dtype=np.float32)  # random lattice values
    flat = iu * np.int32(cols)
    flat += iv
    g00, g01 = grid.take(flat), grid[1:].take(flat)
    g10, g11 = grid[cols:].take(flat), grid[cols + 1:].take(flat)
    a = g00 + (g10 - g00) * fu
    b = g01 + (g11 - g01) * fu
    val = a + (b - a) * fv
    val -= np.float32(0.25)
    val *= np.float32(2.0)  # stretch [0.25, 0.75] to [0, 1]
    return np.clip(val, 0.0, 1.0, out=val)


def _grid(y, x, period, cos_t, sin_t, centre, rng) -> np.ndarray:
    u, v = _rotate(y, x, cos_t, sin_t)
    ph = rng.random(2).astype(np.float32)
    s = np.float32(1.0 / period)
    width = np.float32(max(2.0 / period, 0.2))
    return ((_frac(u * s + ph[0]) < width) | (_frac(v * s + ph[1]) < width)).astype(np.float32)


def _zigzag(y, x, period, cos_t, sin_t, centre, rng) -> np.ndarray:
    u, v = _rotate(y, x, cos_t, sin_t)
    ph = rng.random(2).astype(np.float32)
    tri = np.abs(np.float32(2.0) * _frac(v * np.float32(1.0 / (1.2 * period)) + ph[1]) - np.float32(1.0))
    shifted = u + np.float32(0.6 * period) * tri
    return (_frac(shifted * np.float32(1.0 / period) + ph[0]) < 0.5).astype(np.float32)


def _plaid(y, x, period, cos_t, sin_t, centre, rng) -> np.ndarray:
    u, v = _rotate(y, x, cos_t, sin_t)
    ph = rng.random(2).astype(np.float32) * np.float32(2 * np.pi)
    w = np.float32(2 * np.pi / period)
    return np.float32(0.5) + np.float32(0.25) * (np.sin(u * w + ph[0]) + np.sin(v * (w / np.float32(1.5)) + ph[1]))


_PATTERN_FNS: tuple[PatternFn, ...] = (
    _solid, _stripes, _checker, _dots, _rings, _waves, _noise, _grid, _zigzag, _plaid,
)
# Which per-class attributes each pattern uses: (second colour, period, orientation).
_USES = {
    "solid": (False, False, False),
    "rings": (True, True, False),
}


# --------------------------------------------------------------------------------------------
# Class table (built once per dataset, O(C) vectorised numpy)
# --------------------------------------------------------------------------------------------

def _hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    i = np.floor(h * 6).astype(np.int64) % 6
    f = h * 6 - np.floor(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    table = np.stack([
        np.stack([v, t, p], -1), np.stack([q, v, p], -1), np.stack([p, v, t], -1),
        np.stack([p, q, v], -1), np.stack([t, p, v], -1), np.stack([v, p, q], -1),
    ])
    return table[i, np.arange(h.size)]


def _next_coprime_60(n: np.ndarray) -> np.ndarray:
    """Smallest integer >= n (elementwise) that is coprime to 60 (gaps between such numbers <= 6)."""
    out = np.zeros_like(n)
    found = np.zeros(n.shape, dtype=bool)
    for d in range(7):
        cand = n + d
        ok = (np.gcd(cand, 60) == 1) & ~found
        out[ok] = cand[ok]
        found |= ok
    return out


@lru_cache(maxsize=64)
def _bspline_matrix(n: int, cells: int) -> np.ndarray:
    """(n, cells + 3) cubic B-spline basis: row i evaluates the spline at pixel i of n."""
    t = (np.arange(n) + 0.5) / n * cells
    i0 = np.minimum(np.floor(t).astype(np.int64), cells - 1)
    f = t - i0
    w = np.stack([(1 - f) ** 3, 3 * f**3 - 6 * f**2 + 4, -3 * f**3 + 3 * f**2 + 3 * f + 1, f**3], 1) / 6
    m = np.zeros((n, cells + 3))
    rows = np.arange(n)
    for j in range(4):
        m[rows, i0 + j] = w[:, j]
    m.flags.writeable = False
    return m


@lru_cache(maxsize=8)
def _pixel_coords(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    ys, xs = np.meshgrid(np.arange(h, dtype=np.float32), np.arange(w, dtype=np.float32), indexing="ij")
    ys.flags.writeable = False
    xs.flags.writeable = False
    return ys, xs


def _err(name: str, value: object, allowed: str) -> ConfigError:
    return ConfigError(f"SyntheticSegmentation: {name} must be {allowed}, got {value!r}")


def _as_int(name: str, value: object, minimum: int, allowed: str) -> int:
    if isinstance(value, bool):
        raise _err(name, value, allowed)
    try:
        out = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise _err(name, value, allowed) from None
    if out < minimum:
        raise _err(name, value, allowed)
    return out


def _as_fraction(name: str, value: object) -> float:
    allowed = "a number in [0, 1]"
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise _err(name, value, allowed)
    out = float(value)
    if not 0.0 <= out <= 1.0:  # also rejects NaN
        raise _err(name, value, allowed)
    return out


class SyntheticSegmentation(torch.utils.data.Dataset):
    """Procedurally generated segmentation dataset (see the module docstring for the model).

    Items are dicts ``{"image": uint8 (H, W, 3), "label": int32 (H, W), "name": "train_000042"}``
    with label values in ``[0, num_classes)`` or ``ignore_index``.

    Attributes:
        num_classes, ignore_index, num_stuff (stuff classes are ids ``0 .. num_stuff-1``);
        class_names: unique readable names, ``"<pattern>-<nn>/c<id>"`` (family name / class id);
        family_of: (C,) int family of each class; family_names: (F,) names;
        is_stuff: (C,) bool;
        class_prior: (C,) float, probability that a stuff region (for stuff classes) or a thing
            (for thing classes) gets class c; sums to 1 over stuff and to 1 over things;
        palette: (C, 3) uint8 display colours for colourising label maps (not texture colours).
    """

    def __init__(self, num_classes: int = 1000, split: str = "train", length: int = 2000,
                 image_size: tuple[int, int] = (128, 128), seed: int = 0, num_families: int | None = None,
                 stuff_fraction: float = 0.2, zipf_exponent: float = 1.0, max_things: int = 8,
                 boundary_ignore: int = 1, unlabelled_fraction: float = 0.0) -> None:
        super().__init__()
        c = _as_int("num_classes", num_classes, 2, "an integer >= 2")
        if not isinstance(split, str) or split not in SPLITS:
            raise _err("split", split, "one of 'train', 'val'")
        size_allowed = "a pair (height, width) of positive integers (or one positive integer)"
        size = (image_size, image_size) if isinstance(image_size, (int, np.integer)) else image_size
        try:
            height, width = (_as_int("image_size", v, 1, size_allowed) for v in size)  # type: ignore[union-attr]
        except (TypeError, ValueError):
            raise _err("image_size", image_size, size_allowed) from None
        self.length = _as_int("length", length, 1, "a positive integer")
        self.seed = _as_int("seed", seed, 0, "a non-negative integer")
        if num_families is None:
            families = max(1, min(c, round(math.sqrt(c))))
        else:
            families = _as_int("num_families", num_families, 1, f"None or an integer in [1, num_classes={c}]")
            if families > c:
                raise _err("num_families", num_families, f"None or an integer in [1, num_classes={c}]")
        self.stuff_fraction = _as_fraction("stuff_fraction", stuff_fraction)
        self.unlabelled_fraction = _as_fraction("unlabelled_fraction", unlabelled_fraction)
        if isinstance(zipf_exponent, bool) or not isinstance(zipf_exponent, (int, float, np.integer, np.floating)) \
                or not math.isfinite(float(zipf_exponent)) or float(zipf_exponent) < 0:
            raise _err("zipf_exponent", zipf_exponent, "a finite number >= 0 (0 = uniform classes)")
        self.zipf_exponent = float(zipf_exponent)
        self.max_things = _as_int("max_things", max_things, 0, "an integer >= 0")
        self.boundary_ignore = _as_int("boundary_ignore", boundary_ignore, 0, "an integer >= 0 (pixels)")

        self.num_classes = c
        self.split = split
        self.image_size = (height, width)
        self.num_families = families
        self.ignore_index = default_ignore_index(c)
        self.num_stuff = int(min(c - 1, max(1, round(self.stuff_fraction * c))))
        self._build_classes()

    # ---------------------------------------------------------------- class table
    def _build_classes(self) -> None:
        c, f_count, p_count = self.num_classes, self.num_families, len(PATTERNS)
        ids = np.arange(c, dtype=np.int64)
        self.is_stuff = ids < self.num_stuff
        rank = np.where(self.is_stuff, ids, ids - self.num_stuff)
        weight = np.exp(-self.zipf_exponent * np.log1p(rank))  # 1 / (rank + 1) ** s, no overflow
        stuff_w, thing_w = weight[: self.num_stuff], weight[self.num_stuff:]
        self.class_prior = np.concatenate([stuff_w / stuff_w.sum(), thing_w / thing_w.sum()])
        self._stuff_cdf = np.cumsum(self.class_prior[: self.num_stuff])
        self._thing_cdf = np.cumsum(self.class_prior[self.num_stuff:])
        self._stuff_cdf[-1] = self._thing_cdf[-1] = 1.0

        # Families: pattern, base colour, contrast colour, base orientation.
        fam = np.arange(f_count, dtype=np.int64)
        fam_pattern = fam % p_count
        fam_group = fam // p_count  # index among the families sharing a pattern
        # Every family gets its base colour in its own cell of a g x g x g grid over the colour cube
        # (cells visited with a stride coprime to g^3, so consecutive families are far apart), and
        # its colour lattice stays inside that cell: the colours of two families never overlap.
        g = max(1, int(math.ceil(f_count ** (1 / 3) - 1e-9)))
        while g**3 < f_count:
            g += 1
        stride = max(1, round(_GOLDEN * g**3))
        while math.gcd(stride, g**3) != 1:
            stride += 1
        cell = (fam * stride) % g**3
        unit = (np.stack([cell % g, (cell // g) % g, cell // (g * g)], 1) + 0.5) / g
        base = 0.15 + 0.7 * unit
        corner = (base < 0.5).astype(np.float64)  # farthest corner of the colour cube
        contrast = 0.4 * base + 0.6 * corner
        base_angle = ((fam * _GOLDEN) % 1.0) * (np.pi / 3)
        half_width = min(0.1, COLOUR_CELL_FILL * 0.7 / g)  # half size of a family's colour lattice

        members = np.bincount(ids % f_count, minlength=f_count)
        uses = np.array([_USES.get(name, (True, True, True)) for name in PATTERNS])  # (P, 3)
        radix = np.where(uses, [NUM_SECOND_COLOURS, len(PERIODS), NUM_ORIENTATIONS], 1).prod(1)
        n_colour = _next_coprime_60(np.maximum(7, -(-members // radix[fam_pattern])))
        side = np.ceil(np.cbrt(n_colour) - 1e-9).astype(np.int64)
        side += side**3 < n_colour

        fo = ids % f_count
        k = ids // f_count
        pat = fam_pattern[fo]
        j = k % n_colour[fo]
        s = side[fo]
        lattice = np.stack([j % s, (j // s) % s, j // (s * s)], 1) / (s - 1)[:, None]
        colour1 = base[fo] + half_width * (2 * lattice - 1)
        second = np.where(uses[pat, 0], k % NUM_SECOND_COLOURS, 0)
        colour2 = np.clip(contrast[fo] + SECOND_COLOUR_SPREAD * _TETRA[second], 0.0, 1.0)
        period_idx = np.where(uses[pat, 1], k % len(PERIODS), 0)
        orient_idx = np.where(uses[pat, 2], k % NUM_ORIENTATIONS, 0)
        angle = base_angle[fo] + orient_idx * (np.pi / 3)

        self.family_of = fo
        self.pattern_of = pat
        self.family_names = [f"{PATTERNS[p]}-{i:02d}" for p, i in zip(fam_pattern.tolist(), fam_group.tolist())]
        digits = max(4, len(str(c - 1)))
        fam_names = self.family_names
        self.class_names = [f"{fam_names[f]}/c{i:0{digits}d}" for i, f in enumerate(fo.tolist())]
        self._colour1 = colour1.astype(np.float32)
        self._colour2 = colour2.astype(np.float32)
        self._period = np.asarray(PERIODS)[period_idx]
        self._cos = np.cos(angle)
        self._sin = np.sin(angle)

        hue = (ids * _GOLDEN) % 1.0
        sat = 0.55 + 0.45 * ((ids * _R3[0]) % 1.0)
        val = 0.6 + 0.4 * ((ids * _R3[1]) % 1.0)
        self.palette = np.round(_hsv_to_rgb(hue, sat, val) * 255).astype(np.uint8)

    # ---------------------------------------------------------------- dataset protocol
    def __len__(self) -> int:
        return self.length

    def __repr__(self) -> str:
        h, w = self.image_size
        return (f"SyntheticSegmentation(num_classes={self.num_classes}, split={self.split!r}, "
                f"length={self.length}, image_size=({h}, {w}), seed={self.seed}, "
                f"num_families={self.num_families}, num_stuff={self.num_stuff})")

    def __getitem__(self, index: int) -> dict:
        try:
            i = operator.index(index)
        except TypeError:
            raise IndexError(f"SyntheticSegmentation index must be an integer, got {index!r}") from None
        if not 0 <= i < self.length:
            raise IndexError(f"SyntheticSegmentation index {i} out of range [0, {self.length})")
        image, label = self.generate(i)
        return {"image": image, "label": label, "name": f"{self.split}_{i:06d}"}

    # ---------------------------------------------------------------- generation
    def generate(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Return ``(image uint8 (H, W, 3), label int32 (H, W))`` for ``index`` (no range check)."""
        rng = np.random.default_rng([self.seed, SPLITS[self.split], index])
        h, w = self.image_size
        ys, xs = _pixel_coords(h, w)
        ys_flat, xs_flat = ys.reshape(-1), xs.reshape(-1)

        # Stuff layer: warped Voronoi regions, one stuff class each.
        regions, seeds = self._stuff_partition(rng)
        n_regions = len(seeds)
        stuff_cls = np.searchsorted(self._stuff_cdf, rng.random(n_regions), side="right")
        unlabelled = rng.random(n_regions) < self.unlabelled_fraction
        n_things = int(rng.integers(0, self.max_things + 1))
        thing_params = rng.random((n_things, 9))
        thing_cls = self.num_stuff + np.searchsorted(self._thing_cdf, thing_params[:, 0], side="right")

        # owner: which instance painted each pixel (regions 0..n_regions-1, then things).
        owner_dtype = np.uint8 if n_regions + n_things <= 255 else np.int32
        owner = regions.reshape(-1).astype(owner_dtype)
        label = np.where(unlabelled, self.ignore_index, stuff_cls).astype(np.int32)[owner]
        classes = np.concatenate([stuff_cls, thing_cls]).astype(np.int64)
        mix = np.empty(h * w, dtype=np.float32)  # pattern value t of each pixel
        for r in range(n_regions):
            idx = np.flatnonzero(owner == r)
            if idx.size:
                mix[idx] = self._pattern(int(classes[r]), ys_flat[idx], xs_flat[idx], seeds[r], rng)

        # Things on top, in order (later ones occlude earlier ones).
        owner_2d, label_2d, mix_2d = owner.reshape(h, w), label.reshape(h, w), mix.reshape(h, w)
        for t in range(n_things):
            cls = int(thing_cls[t])
            found = self._thing_mask(thing_params[t])
            if found is None:
                continue
            box, mask, centre = found
            owner_2d[box][mask] = n_regions + t
            label_2d[box][mask] = cls
            mix_2d[box][mask] = self._pattern(cls, ys[box][mask], xs[box][mask], centre, rng)

        if self.boundary_ignore > 0 and n_things:
            thing_id = owner_2d.astype(np.int16 if owner_dtype == np.uint8 else np.int32)
            thing_id -= n_regions - 1
            np.maximum(thing_id, 0, out=thing_id)  # 0 = stuff, i + 1 = i-th thing
            label_2d[_boundary_band(thing_id, self.boundary_ignore)] = self.ignore_index

        # Colours: per-instance brightness jitter, mix of the class's two colours, pixel noise.
        gain = 1.0 + BRIGHTNESS_JITTER * (2 * rng.random(len(classes)) - 1)
        c1 = (self._colour1[classes] * gain[:, None]).astype(np.float32) * np.float32(255)
        diff = (self._colour2[classes] * gain[:, None]).astype(np.float32) * np.float32(255) - c1
        c1 += np.float32(0.5)  # so that truncating to uint8 rounds
        noise = rng.integers(0, 256, size=(3, h * w), dtype=np.uint8)
        noise_scale = np.float32(PIXEL_NOISE * 255 * math.sqrt(12) / 256)  # uniform, std PIXEL_NOISE
        image = np.empty((h * w, 3), dtype=np.uint8)
        for ch in range(3):  # planar is faster than gathering (H W, 3) rows
            plane = c1[:, ch].take(owner)
            plane += mix * diff[:, ch].take(owner)
            plane += (noise[ch].astype(np.float32) - np.float32(127.5)) * noise_scale
            image[:, ch] = np.clip(plane, 0.0, 255.0, out=plane)
        return image.reshape(h, w, 3), label_2d

    def _stuff_partition(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Region index map (H, W) of a Voronoi partition warped by smooth noise, and its seeds."""
        h, w = self.image_size
        n = int(rng.integers(MIN_STUFF_REGIONS, MAX_STUFF_REGIONS + 1))
        seeds = rng.random((n, 2)) * (h, w)
        scale = math.sqrt(h * w)
        # Warp field (dy, dx): two octaves of cubic B-spline noise, as one matrix product per axis.
        left, right = [], []
        for cells, amplitude in WARP_OCTAVES:
            cy = max(1, round(cells * h / scale))
            cx = max(1, round(cells * w / scale))
            grids = (rng.random((2, cy + 3, cx + 3)) * 2 - 1) * (amplitude * scale)
            left.append(_bspline_matrix(h, cy) @ grids)  # (2, h, cx + 3)
            right.append(_bspline_matrix(w, cx))
        bx = np.concatenate(right, 1).T.astype(np.float32)  # (sum cx + 3, w)
        warp = np.concatenate(left, 2).astype(np.float32) @ bx  # (2, h, w)
        ys, xs = _pixel_coords(h, w)
        yw, xw = warp[0], warp[1]
        yw += ys
        xw += xs
        best = np.full((h, w), np.inf, dtype=np.float32)
        region = np.zeros((h, w), dtype=np.uint8)
        dist = np.empty((h, w), dtype=np.float32)
        tmp = np.empty((h, w), dtype=np.float32)
        closer = np.empty((h, w), dtype=bool)
        for r, (sy, sx) in enumerate(seeds.astype(np.float32)):
            np.subtract(yw, sy, out=tmp)
            np.multiply(tmp, tmp, out=dist)
            np.subtract(xw, sx, out=tmp)
            tmp *= tmp
            dist += tmp
            np.less(dist, best, out=closer)
            np.copyto(region, np.uint8(r), where=closer)
            np.minimum(best, dist, out=best)
        return region, seeds

    def _pattern(self, cls: int, y: np.ndarray, x: np.ndarray, centre: tuple[float, float] | np.ndarray,
                 rng: np.random.Generator) -> np.ndarray:
        """Class ``cls``'s pattern value t in [0, 1] at pixel coordinates ``y``, ``x`` (float32)."""
        fn = _PATTERN_FNS[self.pattern_of[cls]]
        return fn(y, x, float(self._period[cls]), float(self._cos[cls]), float(self._sin[cls]), centre, rng)

    def _thing_mask(self, p: np.ndarray) -> tuple[tuple[slice, slice], np.ndarray, tuple[float, float]] | None:
        """Bounding box, mask in the box and centre of a thing with random parameters ``p`` (9 in [0, 1))."""
        h, w = self.image_size
        shape = SHAPES[min(int(p[1] * len(SHAPES)), len(SHAPES) - 1)]
        radius = 0.5 * (THING_SIZE[0] + (THING_SIZE[1] - THING_SIZE[0]) * p[2]) * min(h, w)
        cy, cx = p[3] * h, p[4] * w
        aspect = 0.4 + 0.5 * p[5]
        # Rotation as a unit vector (no trig, so masks are bit-identical across machines).
        ry, rx = 2 * p[6] - 1, 2 * p[7] - 1
        norm = math.sqrt(ry * ry + rx * rx)
        cos_r, sin_r = (rx / norm, ry / norm) if norm > 1e-6 else (1.0, 0.0)

        reach = radius * 1.4143 + 1
        y0, y1 = max(0, int(math.floor(cy - reach))), min(h, int(math.ceil(cy + reach)) + 1)
        x0, x1 = max(0, int(math.floor(cx - reach))), min(w, int(math.ceil(cx + reach)) + 1)
        if y0 >= y1 or x0 >= x1:
            return None
        yy = np.arange(y0, y1, dtype=np.float64)[:, None] - cy
        xx = np.arange(x0, x1, dtype=np.float64)[None, :] - cx
        if shape == "disc":
            mask = yy * yy + xx * xx <= radius * radius
        else:
            u = xx * cos_r + yy * sin_r
            v = yy * cos_r - xx * sin_r
            if shape == "ellipse":
                mask = (u / radius) ** 2 + (v / (aspect * radius)) ** 2 <= 1.0
            elif shape == "rectangle":
                mask = (np.abs(u) <= radius) & (np.abs(v) <= aspect * radius)
            else:  # triangle: jittered-size equilateral, vertices in the rotated frame
                scale = radius * (0.8 + 0.2 * p[8])
                verts = [(scale * a, scale * b) for a, b in _TRI_DIRS]
                mask = np.ones(u.shape, dtype=bool)
                for (ax, ay), (bx, by) in zip(verts, verts[1:] + verts[:1]):
                    mask &= (bx - ax) * (v - ay) - (by - ay) * (u - ax) >= 0
        if not mask.any():
            return None
        return (slice(y0, y1), slice(x0, x1)), mask, (cy, cx)


def _boundary_band(inst: np.ndarray, width: int) -> np.ndarray:
    """Pixels within the ignore band of thing boundaries.

    A pixel is in the band if a pixel of a *lower* instance id (what it occludes) lies within
    Chebyshev distance ``ceil(width / 2)``, or one of a *higher* id (what occludes it) within
    ``floor(width / 2)``. Stuff is instance 0, so stuff/stuff boundaries are never in the band.
    """
    band = np.zeros(inst.shape, dtype=bool)
    outer, inner = (width + 1) // 2, width // 2
    if outer:
        band |= _filter(inst, outer, np.minimum) < inst
    if inner:
        band |= _filter(inst, inner, np.maximum) > inst
    return band


def _filter(a: np.ndarray, radius: int, op: Callable) -> np.ndarray:
    """Separable min/max filter over a (2 radius + 1)^2 square window (window clipped at edges)."""
    out = a.copy()
    for axis in (0, 1):
        src = out.copy()
        n = a.shape[axis]
        for s in range(1, min(radius, n - 1) + 1):
            lo = [slice(None)] * 2
            hi = [slice(None)] * 2
            lo[axis], hi[axis] = slice(0, n - s), slice(s, n)
            op(out[tuple(lo)], src[tuple(hi)], out=out[tuple(lo)])
            op(out[tuple(hi)], src[tuple(lo)], out=out[tuple(hi)])
    return out
