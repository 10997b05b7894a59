"""Tests for the built-in procedurally generated dataset ``synthetic``."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from numpy.lib.stride_tricks import sliding_window_view

from scaleseg.data.datasets import synthetic
from scaleseg.data.datasets.synthetic import SyntheticSegmentation, default_ignore_index


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra = np.argsort(np.argsort(a)).astype(np.float64)
    rb = np.argsort(np.argsort(b)).astype(np.float64)
    return float(np.corrcoef(ra, rb)[0, 1])


# ------------------------------------------------------------------------------ determinism

def test_same_arguments_give_identical_samples():
    a = SyntheticSegmentation(num_classes=50, image_size=(64, 80), seed=3, length=20)
    b = SyntheticSegmentation(num_classes=50, image_size=(64, 80), seed=3, length=20)
    for i in (0, 7, 19):
        first, again, other = a[i], a[i], b[i]
        for key in ("image", "label"):
            assert np.array_equal(first[key], again[key])
            assert np.array_equal(first[key], other[key])
        assert first["name"] == other["name"] == f"train_{i:06d}"


def test_samples_do_not_depend_on_global_random_state():
    ds = SyntheticSegmentation(num_classes=50, image_size=(48, 48), length=4)
    np.random.seed(1)
    torch.manual_seed(1)
    first = ds[2]
    np.random.seed(12345)
    torch.manual_seed(999)
    np.random.random(100)
    second = ds[2]
    assert np.array_equal(first["image"], second["image"])
    assert np.array_equal(first["label"], second["label"])


def test_samples_are_the_same_in_dataloader_worker_processes():
    ds = SyntheticSegmentation(num_classes=50, image_size=(40, 56), length=6)
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2)
    for i, sample in enumerate(loader):
        direct = ds[i]
        assert np.array_equal(sample["image"].numpy(), direct["image"])
        assert np.array_equal(sample["label"].numpy(), direct["label"])
        assert sample["name"] == direct["name"]


def test_index_split_and_seed_change_the_sample():
    kw = dict(num_classes=50, image_size=(64, 64), length=10)
    ref = SyntheticSegmentation(**kw)[5]
    others = {
        "index": SyntheticSegmentation(**kw)[6],
        "split": SyntheticSegmentation(split="val", **kw)[5],
        "seed": SyntheticSegmentation(seed=1, **kw)[5],
    }
    for what, other in others.items():
        assert not np.array_equal(ref["image"], other["image"]), what
        assert not np.array_equal(ref["label"], other["label"]), what
    assert others["split"]["name"] == "val_000005"


# ------------------------------------------------------------------------------ shapes, dtypes, ignore index

def test_shapes_dtypes_and_label_values_for_a_non_square_size():
    ds = SyntheticSegmentation(num_classes=300, image_size=(97, 131), length=12)
    assert len(ds) == 12
    seen = set()
    for i in range(len(ds)):
        s = ds[i]
        img, lab = s["image"], s["label"]
        assert img.shape == (97, 131, 3) and img.dtype == np.uint8
        assert lab.shape == (97, 131) and lab.dtype == np.int32
        valid = lab != ds.ignore_index
        assert ((lab[valid] >= 0) & (lab[valid] < 300)).all()
        assert img.std() > 5  # textured, not blank
        seen.update(np.unique(lab[valid]).tolist())
    seen_arr = np.array(sorted(seen))
    assert ds.is_stuff[seen_arr].any() and (~ds.is_stuff[seen_arr]).any()


@pytest.mark.parametrize("size", [(1, 1), (2, 3), (5, 200), (200, 7)])
def test_tiny_and_thin_images_work(size):
    s = SyntheticSegmentation(num_classes=20, image_size=size, length=3)[2]
    assert s["image"].shape == (*size, 3) and s["label"].shape == size


@pytest.mark.parametrize("num_classes, expected", [
    (2, 255), (255, 255), (256, 65535), (1000, 65535), (65535, 65535), (65536, -1), (100_000, -1),
])
def test_ignore_index_follows_the_16_bit_convention(num_classes, expected):
    assert default_ignore_index(num_classes) == expected


def test_one_hundred_thousand_classes_use_ids_above_16_bits():
    ds = SyntheticSegmentation(num_classes=100_000, image_size=(48, 48), length=80)
    assert ds.ignore_index == -1
    assert len(ds.class_names) == len(set(ds.class_names)) == 100_000
    assert ds.family_of.shape == ds.is_stuff.shape == ds.class_prior.shape == (100_000,)
    assert ds.palette.shape == (100_000, 3) and ds.palette.dtype == np.uint8
    high = 0
    for i in range(len(ds)):
        lab = ds[i]["label"]
        valid = lab != -1
        assert ((lab[valid] >= 0) & (lab[valid] < 100_000)).all()
        high = max(high, int(lab.max()))
    assert high > 65535


# ------------------------------------------------------------------------------ class table

def test_class_table():
    ds = SyntheticSegmentation(num_classes=1000)
    assert ds.num_classes == 1000 and ds.ignore_index == 65535
    assert len(ds.family_names) == len(set(ds.family_names)) == round(math.sqrt(1000))
    assert ds.family_of.min() == 0 and ds.family_of.max() == len(ds.family_names) - 1
    assert len(ds.class_names) == len(set(ds.class_names)) == 1000
    for c in (0, 123, 999):  # "<family name>/c<id>"
        assert ds.class_names[c] == f"{ds.family_names[ds.family_of[c]]}/c{c:04d}"
    # Stuff classes come first; the prior is a Zipf law within stuff and within things.
    assert ds.is_stuff.sum() == 200 and ds.is_stuff[:200].all()
    stuff, things = ds.class_prior[ds.is_stuff], ds.class_prior[~ds.is_stuff]
    assert stuff.sum() == pytest.approx(1.0) and things.sum() == pytest.approx(1.0)
    assert np.all(np.diff(stuff) < 0) and np.all(np.diff(things) < 0)
    assert stuff[0] / stuff[9] == pytest.approx(10.0)  # 1 / (rank + 1) ** 1
    flat = SyntheticSegmentation(num_classes=1000, zipf_exponent=0.0)
    assert np.allclose(flat.class_prior[:200], 1 / 200) and np.allclose(flat.class_prior[200:], 1 / 800)
    assert len(np.unique(ds.palette, axis=0)) > 900  # display colours are distinct-ish
    assert SyntheticSegmentation(num_classes=1000, num_families=7).family_of.max() == 6


@pytest.mark.parametrize("num_classes", [1000, 100_000])
def test_every_class_has_its_own_appearance(num_classes):
    """No two classes share the parameters that determine their look (pattern, colours, period, angle)."""
    ds = SyntheticSegmentation(num_classes=num_classes)
    uses = np.array([synthetic._USES.get(name, (True, True, True)) for name in synthetic.PATTERNS])
    u = uses[ds.pattern_of]
    key = np.concatenate([
        ds.pattern_of[:, None],
        ds._colour1,
        np.where(u[:, :1], ds._colour2, 0),
        np.where(u[:, 1], ds._period, 0)[:, None],
        np.where(u[:, 2:], np.stack([ds._cos, ds._sin], 1), 0),
    ], 1)
    assert len(np.unique(np.round(key, 5), axis=0)) == num_classes


@pytest.mark.parametrize("stuff_fraction, stuff", [(0.0, 1), (1.0, 9), (0.5, 5)])
def test_there_is_always_a_stuff_and_a_thing_class(stuff_fraction, stuff):
    ds = SyntheticSegmentation(num_classes=10, stuff_fraction=stuff_fraction, image_size=(32, 32), length=5)
    assert ds.is_stuff.sum() == stuff
    assert SyntheticSegmentation(num_classes=2, stuff_fraction=stuff_fraction).is_stuff.tolist() == [True, False]
    assert ds[4]["label"].shape == (32, 32)


# ------------------------------------------------------------------------------ long tail and layout

def test_pixel_frequencies_follow_the_long_tailed_prior():
    ds = SyntheticSegmentation(num_classes=200, image_size=(64, 64), length=300)
    counts = np.zeros(200)
    for i in range(len(ds)):
        lab = ds[i]["label"]
        counts += np.bincount(lab[lab != ds.ignore_index], minlength=200)
    ranked = np.sort(counts)[::-1]
    assert ranked[:20].sum() > 0.5 * ranked.sum()  # the top 10% of classes cover most pixels
    st = ds.is_stuff
    assert _spearman(counts[st], ds.class_prior[st]) > 0.6  # ~0.87 here
    assert _spearman(counts[~st], ds.class_prior[~st]) > 0.4  # ~0.66 here (things are few pixels)
    assert counts[0] == counts[st].max()  # the rank-0 stuff class is the most frequent one


def test_stuff_regions_are_large_and_things_are_small():
    ds = SyntheticSegmentation(num_classes=200, image_size=(96, 96), length=80)
    stuff_cover, thing_cover = [], []
    for i in range(len(ds)):
        lab = ds[i]["label"]
        counts = np.bincount(lab[lab != ds.ignore_index], minlength=200)
        present = np.flatnonzero(counts)
        stuff_present = present[ds.is_stuff[present]]
        assert 1 <= len(stuff_present) <= synthetic.MAX_STUFF_REGIONS
        assert len(present) - len(stuff_present) <= ds.max_things
        stuff_cover += (counts[stuff_present] / lab.size).tolist()
        thing_cover += (counts[present[~ds.is_stuff[present]]] / lab.size).tolist()
    assert len(thing_cover) > 100
    assert np.median(stuff_cover) > 0.12  # ~0.24 here
    assert np.median(thing_cover) < 0.02  # ~0.005 here
    assert np.percentile(thing_cover, 95) < 0.07  # a thing is at most 25% of the side
    no_things = SyntheticSegmentation(num_classes=200, image_size=(96, 96), max_things=0)[3]["label"]
    assert ds.is_stuff[no_things].all()


# ------------------------------------------------------------------------------ ignore pixels

def test_boundary_ignore_band_along_things_only():
    kw = dict(num_classes=100, image_size=(80, 80), length=30)
    plain, thin, wide = (SyntheticSegmentation(boundary_ignore=b, **kw) for b in (0, 1, 3))
    n_thin = n_wide = 0
    for i in range(len(plain)):
        p, t, w = plain[i], thin[i], wide[i]
        assert np.array_equal(p["image"], t["image"]) and np.array_equal(p["image"], w["image"])
        assert (p["label"] != plain.ignore_index).all()  # no band when boundary_ignore=0
        band = t["label"] == thin.ignore_index
        assert np.array_equal(t["label"][~band], p["label"][~band])
        # width 1: the outermost pixel ring of things, i.e. thing pixels next to another label
        assert (~plain.is_stuff[p["label"][band]]).all()
        padded = np.pad(p["label"], 1, mode="edge")
        windows = sliding_window_view(padded, (3, 3))
        touches_other = (windows != p["label"][..., None, None]).any((-1, -2))
        assert touches_other[band].all()
        n_thin += band.sum()
        n_wide += (w["label"] == wide.ignore_index).sum()
    assert n_thin > 0
    assert n_wide > 2 * n_thin


def test_unlabelled_stuff_regions():
    kw = dict(num_classes=100, image_size=(64, 64), length=10, boundary_ignore=0)
    labelled = SyntheticSegmentation(**kw)
    unlabelled = SyntheticSegmentation(unlabelled_fraction=1.0, **kw)
    some = SyntheticSegmentation(unlabelled_fraction=0.5, **kw)
    n_some = 0
    for i in range(len(labelled)):
        ref, un = labelled[i], unlabelled[i]
        assert np.array_equal(ref["image"], un["image"])
        stuff_px = labelled.is_stuff[ref["label"]]
        assert (un["label"][stuff_px] == unlabelled.ignore_index).all()
        assert np.array_equal(un["label"][~stuff_px], ref["label"][~stuff_px])
        n_some += (some[i]["label"] == some.ignore_index).sum()
    assert 0 < n_some < 64 * 64 * len(labelled)


# ------------------------------------------------------------------------------ learnability

PATCH = 12


def _patch_features(image: np.ndarray, label: np.ndarray, ignore: int) -> tuple[np.ndarray, np.ndarray]:
    """Simple local features of the 12x12 patches (stride 6) that lie entirely inside one class."""
    lab = sliding_window_view(label, (PATCH, PATCH))[::6, ::6]
    whole = (lab.min((-1, -2)) == lab.max((-1, -2))) & (lab[..., 0, 0] != ignore)
    cls = lab[..., 0, 0][whole]
    rgb = sliding_window_view(image.astype(np.float32) / 255, (PATCH, PATCH), axis=(0, 1))[::6, ::6][whole]
    grey = rgb.mean(1)
    grad_x = np.abs(np.diff(grey, axis=-1)).mean((-1, -2))
    grad_y = np.abs(np.diff(grey, axis=-2)).mean((-1, -2))
    spectrum = np.abs(np.fft.rfft2(grey - grey.mean((-1, -2), keepdims=True)))
    radius = np.hypot(np.fft.fftfreq(PATCH)[:, None], np.fft.rfftfreq(PATCH)[None, :])
    total = spectrum.sum((-1, -2)) + 1e-6
    bands = [(spectrum * ((radius >= lo) & (radius < hi))).sum((-1, -2)) / total
             for lo, hi in ((0.01, 0.12), (0.12, 0.2), (0.2, 0.8))]
    feats = np.concatenate([rgb.mean((-1, -2)), rgb.std((-1, -2)), grad_x[:, None], grad_y[:, None],
                            np.stack(bands, 1)], 1)
    return feats, cls


def _collect(ds: SyntheticSegmentation) -> tuple[np.ndarray, np.ndarray]:
    parts = [_patch_features(s["image"], s["label"], ds.ignore_index) for s in (ds[i] for i in range(len(ds)))]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


@pytest.fixture(scope="module")
def nearest_class_mean():
    """Fit class means of patch features on train images, classify patches of val images."""
    train = SyntheticSegmentation(num_classes=200, split="train", length=150)
    val = SyntheticSegmentation(num_classes=200, split="val", length=60)
    x_train, y_train = _collect(train)
    x_val, y_val = _collect(val)
    top = np.argsort(-np.bincount(y_train, minlength=200))[:50]  # the 50 most frequent classes
    mu, sd = x_train.mean(0), x_train.std(0) + 1e-6
    z_train, z_val = (x_train - mu) / sd, (x_val - mu) / sd
    means = np.stack([z_train[y_train == c].mean(0) for c in top])
    keep = np.isin(y_val, top)
    z_val, y_val = z_val[keep], y_val[keep]
    pred = top[((z_val[:, None, :] - means[None]) ** 2).sum(-1).argmin(1)]
    return dict(ds=train, top=top, means=means, z_train=z_train, y_train=y_train, z_val=z_val,
                y_val=y_val, pred=pred)


def test_classes_are_recognisable_from_local_patches(nearest_class_mean):
    r = nearest_class_mean
    assert len(r["y_val"]) > 2000
    assert len(np.unique(r["y_val"])) >= 40
    accuracy = (r["pred"] == r["y_val"]).mean()
    assert accuracy > 0.6  # chance is 0.02; ~0.98 here


def test_classes_of_a_family_look_alike(nearest_class_mean):
    r = nearest_class_mean
    family = r["ds"].family_of
    y, pred, top = r["y_val"], r["pred"], r["top"]
    class_acc = (pred == y).mean()
    family_acc = (family[pred] == family[y]).mean()
    assert family_acc > class_acc
    # Mistakes stay inside the family far more often than a uniform confusion would.
    wrong = pred != y
    assert wrong.sum() >= 20
    within = (family[pred[wrong]] == family[y[wrong]]).mean()
    fam_top = family[top]
    uniform = np.mean([((fam_top == family[c]).sum() - 1) / (len(top) - 1) for c in y[wrong]])
    assert within > 4 * uniform  # ~0.8 vs ~0.06 here (0.5-0.8 with other seeds)
    # Class means of the same family are closer than those of different families.
    dist = np.sqrt(((r["means"][:, None] - r["means"][None]) ** 2).sum(-1))
    same = fam_top[:, None] == fam_top[None]
    off_diagonal = ~np.eye(len(top), dtype=bool)
    assert dist[same & off_diagonal].mean() < 0.75 * dist[~same].mean()  # ratio ~0.52 here
    # A nearest-family-mean classifier works well above chance.
    fams = np.unique(fam_top)
    in_top = np.isin(r["y_train"], top)
    fmeans = np.stack([r["z_train"][in_top & (family[r["y_train"]] == f)].mean(0) for f in fams])
    fpred = fams[((r["z_val"][:, None, :] - fmeans[None]) ** 2).sum(-1).argmin(1)]
    assert (fpred == family[y]).mean() > 0.6  # chance ~0.07; ~0.95 here


# ------------------------------------------------------------------------------ validation

@pytest.mark.parametrize("kwargs, name", [
    (dict(num_classes=1), "num_classes"),
    (dict(num_classes=2.5), "num_classes"),
    (dict(num_classes="10"), "num_classes"),
    (dict(split="test"), "split"),
    (dict(split=None), "split"),
    (dict(length=0), "length"),
    (dict(image_size=(0, 10)), "image_size"),
    (dict(image_size=(10, -1)), "image_size"),
    (dict(image_size=(10,)), "image_size"),
    (dict(image_size="big"), "image_size"),
    (dict(seed=-1), "seed"),
    (dict(num_families=0), "num_families"),
    (dict(num_classes=10, num_families=11), "num_families"),
    (dict(stuff_fraction=-0.1), "stuff_fraction"),
    (dict(stuff_fraction=1.5), "stuff_fraction"),
    (dict(stuff_fraction=float("nan")), "stuff_fraction"),
    (dict(unlabelled_fraction=2.0), "unlabelled_fraction"),
    (dict(zipf_exponent=-1.0), "zipf_exponent"),
    (dict(zipf_exponent=float("inf")), "zipf_exponent"),
    (dict(max_things=-1), "max_things"),
    (dict(boundary_ignore=-1), "boundary_ignore"),
])
def test_bad_arguments_raise_value_error_naming_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name) as info:
        SyntheticSegmentation(**kwargs)
    value = next(iter(kwargs.values())) if name not in kwargs else kwargs[name]
    assert repr(value) in str(info.value)


def test_index_out_of_range_raises_index_error():
    ds = SyntheticSegmentation(num_classes=10, length=3, image_size=(16, 16))
    ds[2]
    for bad in (3, -1, 100):
        with pytest.raises(IndexError):
            ds[bad]
    with pytest.raises(IndexError):
        ds["0"]
