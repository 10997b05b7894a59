"""Photometric distortion (mmsegmentation's PhotoMetricDistortion) and its place in TrainTransform."""

from __future__ import annotations

import colorsys

import numpy as np
import pytest
import torch

from scaleseg.config import load_config
from scaleseg.data import build_train_loader
from scaleseg.data.datasets import SyntheticSegmentation
from scaleseg.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    PhotometricDistortion,
    PhotometricParams,
    TrainTransform,
    apply_photometric,
    hsv_to_rgb,
    rgb_to_hsv,
)


def reference(image: np.ndarray, p: PhotometricParams) -> np.ndarray:
    """Pixel by pixel with the standard library's colorsys, in float64 (independent of the code under test)."""
    out = np.zeros_like(image)
    for y in range(image.shape[0]):
        for x in range(image.shape[1]):
            c = [float(v) for v in image[y, x]]
            if p.brightness is not None:
                c = [min(255.0, max(0.0, v + p.brightness)) for v in c]
            if p.contrast is not None and p.contrast_first:
                c = [min(255.0, max(0.0, v * p.contrast)) for v in c]
            if p.saturation is not None or p.hue is not None:
                h, s, v = colorsys.rgb_to_hsv(*(v / 255.0 for v in c))
                if p.saturation is not None:
                    s = min(1.0, s * p.saturation)
                if p.hue is not None:
                    h = (h + p.hue / 360.0) % 1.0
                c = [v * 255.0 for v in colorsys.hsv_to_rgb(h, s, v)]
            if p.contrast is not None and not p.contrast_first:
                c = [min(255.0, max(0.0, v * p.contrast)) for v in c]
            out[y, x] = [int(np.floor(v + 0.5)) for v in c]
    return out


def params(brightness=None, contrast=None, contrast_first=False, saturation=None, hue=None) -> PhotometricParams:
    return PhotometricParams(brightness, contrast, contrast_first, saturation, hue)


def test_hsv_round_trip_matches_colorsys():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, size=(50, 3)).astype(np.float32)
    rgb[:3] = [[0, 0, 0], [255, 255, 255], [90, 90, 90]]  # greys: hue 0, saturation 0
    h, s, v = rgb_to_hsv(rgb)
    for i, (r, g, b) in enumerate(rgb.tolist()):
        eh, es, ev = colorsys.rgb_to_hsv(r / 255, g / 255, b / 255)
        assert h[i] / 6 == pytest.approx(eh, abs=1e-5)
        assert s[i] == pytest.approx(es, abs=1e-6)
        assert v[i] / 255 == pytest.approx(ev, abs=1e-6)
    np.testing.assert_allclose(hsv_to_rgb(h, s, v), rgb, atol=1e-3)


def test_hand_cases():
    red = np.array([[[255, 0, 0]]], np.uint8)
    np.testing.assert_array_equal(apply_photometric(red, params(hue=120.0)), [[[0, 255, 0]]])
    np.testing.assert_array_equal(apply_photometric(red, params(hue=-120.0)), [[[0, 0, 255]]])
    orange = np.array([[[200, 100, 50]]], np.uint8)
    # saturation x0.5: s = 150/200 -> 0.375, so min = 200 (1 - 0.375) = 125, and the hue (20 deg) is kept:
    # g = 125 + (200 - 125) * 20/60 = 150
    np.testing.assert_array_equal(apply_photometric(orange, params(saturation=0.5)), [[[200, 150, 125]]])
    # brightness clips at both ends before contrast; contrast multiplies (no mean), then clips
    px = np.array([[[250, 10, 100]]], np.uint8)
    np.testing.assert_array_equal(apply_photometric(px, params(brightness=20.0)), [[[255, 30, 120]]])
    np.testing.assert_array_equal(apply_photometric(px, params(brightness=-20.0)), [[[230, 0, 80]]])
    np.testing.assert_array_equal(apply_photometric(px, params(contrast=1.5)), [[[255, 15, 150]]])
    # the order of contrast and the HSV part matters when a clip happens in between
    first = apply_photometric(px, params(contrast=1.5, contrast_first=True, saturation=1.5))
    last = apply_photometric(px, params(contrast=1.5, contrast_first=False, saturation=1.5))
    # first: (255, 15, 150), s = 240/255 x 1.5 clips to 1, hue sector 5 + 0.4375: B = 255 (1 - 0.4375) = 143.4
    np.testing.assert_array_equal(first, [[[255, 0, 143]]])
    # last: s = 240/250 x 1.5 clips to 1, hue 5 + 0.375: (250, 0, 250 x 0.375 = 93.75), then x1.5 = (375 -> 255, 0, 140.6)
    np.testing.assert_array_equal(last, [[[255, 0, 141]]])


@pytest.mark.parametrize("seed", range(12))
def test_random_params_match_the_colorsys_reference(seed):
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, size=(6, 7, 3), dtype=np.uint8)
    image[0, 0] = [255, 255, 255]
    image[0, 1] = [0, 0, 0]
    image[0, 2] = [128, 128, 128]
    p = params(
        brightness=float(rng.uniform(-32, 32)), contrast=float(rng.uniform(0.5, 1.5)),
        contrast_first=bool(seed % 2), saturation=float(rng.uniform(0.5, 1.5)), hue=float(rng.uniform(-36, 36)),
    )
    got = apply_photometric(image, p)
    assert got.dtype == np.uint8 and got.shape == image.shape
    # float32 here, float64 in the reference: at most one grey level apart where rounding sits on .5
    assert np.abs(got.astype(int) - reference(image, p).astype(int)).max() <= 1


def test_sampling_follows_the_published_ranges_and_probabilities():
    t = PhotometricDistortion()
    draws = [t.sample_params(np.random.default_rng([7, i])) for i in range(4000)]
    for name, low, high in (("brightness", -32, 32), ("contrast", 0.5, 1.5), ("saturation", 0.5, 1.5), ("hue", -36, 36)):
        values = np.array([getattr(d, name) for d in draws if getattr(d, name) is not None])
        assert 0.46 < len(values) / len(draws) < 0.54, name  # each step with probability 1/2
        assert low <= values.min() and values.max() <= high, name
        assert values.min() < low + 0.05 * (high - low) and values.max() > high - 0.05 * (high - low), name
    assert 0.46 < np.mean([d.contrast_first for d in draws]) < 0.54
    # the draw is a function of the RNG alone
    assert t.sample_params(np.random.default_rng(3)) == t.sample_params(np.random.default_rng(3))


def test_call_uses_only_the_rng_passed_in():
    t = PhotometricDistortion()
    image = np.random.default_rng(0).integers(0, 256, size=(16, 16, 3), dtype=np.uint8)
    before = image.copy()
    for seed in range(20):
        np.random.seed(seed)  # global state must not matter
        out = t(image, np.random.default_rng(seed))
        expected = apply_photometric(image, t.sample_params(np.random.default_rng(seed)))
        np.testing.assert_array_equal(out, expected)
        assert out.dtype == np.uint8
    np.testing.assert_array_equal(image, before)  # input untouched


def _denormalise(t: torch.Tensor) -> np.ndarray:
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (t * std + mean).permute(1, 2, 0).numpy()


def test_train_transform_distorts_the_image_only():
    data = SyntheticSegmentation(num_classes=10, image_size=(40, 40), length=8)
    plain = TrainTransform((48, 48), scale_range=(0.8, 1.1), ignore_index=data.ignore_index)
    photo = TrainTransform((48, 48), scale_range=(0.8, 1.1), ignore_index=data.ignore_index, photometric=True)
    changed = 0
    for i in range(8):
        sample = data[i]
        a = plain(sample, np.random.default_rng([0, i]))
        b = photo(sample, np.random.default_rng([0, i]))
        torch.testing.assert_close(a["label"], b["label"], rtol=0, atol=0)  # same geometry, labels untouched
        image = _denormalise(b["image"])
        assert image.min() > -0.01 and image.max() < 255.01
        padded = (b["label"] == data.ignore_index).numpy() & (_denormalise(a["image"]).max(axis=2) < 0.01)
        assert np.abs(image[padded]).max(initial=0) < 0.01  # padding stays 0: distortion runs before the pad
        changed += not torch.equal(a["image"], b["image"])
    assert changed >= 4  # 15/16 of the draws change something


def test_config_switch_reaches_the_loader():
    cfg = load_config(None, ["data.num_classes=10", "data.synthetic.image_size=32", "data.train_pipeline.crop_size=32"])
    assert cfg.data.train_pipeline.photometric is False
    data = SyntheticSegmentation(num_classes=10, image_size=(32, 32), length=4)
    assert build_train_loader(cfg.data, data, 255, seed=0).dataset.transform.photometric is None
    cfg = load_config(None, ["data.num_classes=10", "data.synthetic.image_size=32", "data.train_pipeline.crop_size=32",
                             "data.train_pipeline.photometric=true"])
    assert isinstance(build_train_loader(cfg.data, data, 255, seed=0).dataset.transform.photometric, PhotometricDistortion)
