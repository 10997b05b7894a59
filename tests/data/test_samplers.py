"""Repeat-factor sampling (LVIS rule) with exact resume, and the per-image class sets it needs."""

from __future__ import annotations

import math
from itertools import islice

import numpy as np
import pytest
import torch
from PIL import Image

from scaleseg.config import load_config
from scaleseg.data import build_train_loader
from scaleseg.data.datasets import SyntheticSegmentation
from scaleseg.data.datasets.base import FileSegmentation, Sample
from scaleseg.data.samplers import (
    RepeatFactorSampler,
    ResumableSampler,
    class_sets_cache_path,
    image_class_sets,
    repeat_factors,
)
from scaleseg.errors import ConfigError, DataError


def brute_force_factors(class_sets, t):
    n = len(class_sets)
    classes = {c for s in class_sets for c in s}
    freq = {c: sum(c in set(s) for s in class_sets) / n for c in classes}
    return [max([1.0] + [max(1.0, math.sqrt(t / freq[c])) for c in set(s)]) for s in class_sets]


def test_repeat_factors_by_hand():
    # 10 images: class 0 in all, class 1 in one (f = 0.1), class 2 in four (f = 0.4); image 9 is all ignore
    sets = [[0, 1, 2], [0, 2], [0, 2, 2], [0, 2]] + [[0]] * 5 + [[]]
    # t = 0.4: r_0 = 1, r_1 = sqrt(0.4 / 0.1) = 2, r_2 = sqrt(0.4 / 0.4) = 1
    np.testing.assert_allclose(repeat_factors(sets, 0.4), [2, 1, 1, 1, 1, 1, 1, 1, 1, 1])
    # t = 0.9: r_1 = 3, r_2 = 1.5 (the duplicate 2 in image 2 counts once)
    np.testing.assert_allclose(repeat_factors(sets, 0.9), [3, 1.5, 1.5, 1.5, 1, 1, 1, 1, 1, 1])
    # t = 0.001 (LVIS): every class here is frequent, nothing repeats
    np.testing.assert_allclose(repeat_factors(sets, 0.001), np.ones(10))


def test_repeat_factors_match_brute_force():
    rng = np.random.default_rng(0)
    sets = [np.unique(rng.zipf(1.6, size=rng.integers(0, 6)) - 1) for _ in range(200)]
    sets = [s[s < 500] for s in sets]
    for t in (0.001, 0.01, 0.3, 1.0):
        np.testing.assert_allclose(repeat_factors(sets, t), brute_force_factors([s.tolist() for s in sets], t))
    with pytest.raises(ValueError):
        repeat_factors(sets, 0.0)


FACTORS = np.array([1.0, 1.0, 2.5, 1.2, 3.0, 1.75, 1.0])


def test_each_epoch_rounds_every_factor_down_or_up_and_the_mean_approaches_it():
    sampler = RepeatFactorSampler(FACTORS, seed=3)
    epochs = 3000
    counts = np.stack([sampler.epoch_counts(e) for e in range(epochs)])
    assert np.all((counts == np.floor(FACTORS)) | (counts == np.ceil(FACTORS)))
    frac = FACTORS - np.floor(FACTORS)
    tolerance = 4 * np.sqrt(frac * (1 - frac) / epochs) + 1e-12  # 4 standard errors of the Bernoulli mean
    assert np.all(np.abs(counts.mean(axis=0) - FACTORS) <= tolerance)
    # the stream itself: over whole epochs, image i appears sum of its counts times
    total = int(counts[:200].sum())
    stream = [i for i, _ in islice(iter(sampler), total)]
    np.testing.assert_array_equal(np.bincount(stream, minlength=len(FACTORS)), counts[:200].sum(axis=0))
    # every epoch is its own shuffle of exactly those copies
    start = 0
    for e in range(5):
        n = sampler.epoch_length(e)
        np.testing.assert_array_equal(np.bincount(stream[start : start + n], minlength=len(FACTORS)), counts[e])
        start += n
    assert sampler.expected_epoch_length == pytest.approx(FACTORS.sum())


def test_stream_from_any_position_is_the_tail_of_the_stream_from_zero():
    sampler = RepeatFactorSampler(FACTORS, seed=11)
    full = list(islice(iter(sampler), 400))
    assert [p for _, p in full] == list(range(400))
    boundary = sampler.epoch_length(0) + sampler.epoch_length(1)  # the first position of epoch 2
    for start in (1, 7, boundary - 1, boundary, boundary + 1, 123, 350):
        resumed = list(islice(iter(RepeatFactorSampler(FACTORS, seed=11, start=start)), 400 - start))
        assert resumed == full[start:], start
    assert sampler.locate(boundary) == (2, 0)
    other = list(islice(iter(RepeatFactorSampler(FACTORS, seed=12)), 400))
    assert [i for i, _ in other] != [i for i, _ in full]


def test_integer_factors_have_fixed_epochs():
    sampler = RepeatFactorSampler([1, 2, 1], seed=0)
    assert [sampler.epoch_length(e) for e in range(4)] == [4, 4, 4, 4]
    assert sampler.locate(9) == (2, 1)
    first = list(islice(iter(sampler), 12))
    assert list(islice(iter(RepeatFactorSampler([1, 2, 1], seed=0, start=9)), 3)) == first[9:]
    with pytest.raises(ValueError):
        RepeatFactorSampler([1.0, 0.5])


# ------------------------------------------------------------------------------------------------ class sets


def test_class_sets_of_synthetic_match_each_label_and_are_cached(tmp_path, monkeypatch):
    data = SyntheticSegmentation(num_classes=12, image_size=(24, 24), length=6)
    expected = []
    for i in range(len(data)):
        label = data[i]["label"]
        expected.append(np.array(sorted(set(label.ravel().tolist()) - {data.ignore_index})))
    cache = class_sets_cache_path(tmp_path, data)
    assert cache.parent == tmp_path / "cache" and "6" in cache.name
    sets = image_class_sets(data, progress=False, cache_path=cache)
    assert len(sets) == 6 and all(np.array_equal(a, b) for a, b in zip(sets, expected))
    assert cache.is_file() and not list(cache.parent.glob("*.tmp*"))

    def no_reading(self, index):
        raise AssertionError("the cache should have answered")

    monkeypatch.setattr(SyntheticSegmentation, "__getitem__", no_reading)
    again = image_class_sets(data, progress=False, cache_path=cache)
    assert all(np.array_equal(a, b) for a, b in zip(again, expected))
    monkeypatch.undo()
    # another dataset under the same file name (here: another seed) is rescanned, not served stale sets
    other = SyntheticSegmentation(num_classes=12, image_size=(24, 24), length=6, seed=5)
    fresh = image_class_sets(other, progress=False, cache_path=cache)
    assert not all(np.array_equal(a, b) for a, b in zip(fresh, expected))


def test_precomputed_class_sets_are_used():
    class WithSets(SyntheticSegmentation):
        def image_classes(self):
            return [[3, 1, 1], [], [2]]

        def __getitem__(self, index):
            raise AssertionError("labels should not be read")

    data = WithSets(num_classes=5, image_size=(8, 8), length=3)
    sets = image_class_sets(data, progress=False)
    assert [s.tolist() for s in sets] == [[1, 3], [], [2]]


class Toy(FileSegmentation):
    NAME = "toy"
    CLASS_NAMES = ("a", "b", "c", "d")
    LAYOUT = "images/*.png, labels/*.png"

    def list_samples(self):
        names = sorted(p.stem for p in (self.root / "labels").glob("*.png"))
        return [Sample(n, self.root / "images" / f"{n}.png", self.root / "labels" / f"{n}.png") for n in names]


def _toy(root, labels):
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for name, label in labels.items():
        Image.fromarray(np.zeros((*label.shape, 3), np.uint8)).save(root / "images" / f"{name}.png")
        im = Image.fromarray(label.astype(np.uint8), mode="P")
        im.putpalette([v % 256 for v in range(768)])
        im.save(root / "labels" / f"{name}.png")


def test_file_dataset_class_sets_read_labels_only_and_handle_bad_labels(tmp_path):
    _toy(tmp_path, {"x": np.array([[0, 3], [255, 3]]), "y": np.array([[1, 1], [1, 1]]), "z": np.array([[2, 0], [0, 0]])})
    (tmp_path / "images" / "x.png").write_bytes(b"not a png")  # the image is never decoded here
    data = Toy(tmp_path, "train")
    assert [s.tolist() for s in image_class_sets(data, progress=False)] == [[0, 3], [1], [0, 2]]

    (tmp_path / "labels" / "y.png").write_bytes(b"broken")
    with pytest.raises(DataError, match=r"y\.png"):
        image_class_sets(Toy(tmp_path, "train"), progress=False)
    with pytest.warns(UserWarning, match=r"1 labels could not be read.*y\.png"):
        sets = image_class_sets(Toy(tmp_path, "train", on_bad_sample="skip"), progress=False)
    assert [s.tolist() for s in sets] == [[0, 3], [], [0, 2]]


def test_scan_in_worker_processes_gives_the_same_sets():
    data = SyntheticSegmentation(num_classes=8, image_size=(16, 16), length=5)
    one = image_class_sets(data, progress=False)
    two = image_class_sets(data, progress=False, num_workers=2)
    assert all(np.array_equal(a, b) for a, b in zip(one, two))


# ------------------------------------------------------------------------------------------------ loader


TINY = ["data.num_classes=10", "data.synthetic.image_size=32", "data.train_pipeline.crop_size=32",
        "data.synthetic.train_length=12", "data.num_workers=0", "data.batch_size=2"]


def test_build_train_loader_uses_repeat_factors_when_configured(tmp_path):
    cfg = load_config(None, TINY)
    data = SyntheticSegmentation(num_classes=10, image_size=(32, 32), length=12)
    assert isinstance(build_train_loader(cfg.data, data, 255, seed=0).sampler, ResumableSampler)

    cfg = load_config(None, TINY + ["data.repeat_factor_threshold=0.5"])
    torch_state = torch.get_rng_state()
    loader = build_train_loader(cfg.data, data, 255, seed=0, start=5, work_dir=tmp_path, progress=False)
    # building it (the class-set scan included) must not draw from the global torch RNG: a resumed run
    # restores that RNG before building its loader, and would otherwise diverge from an uninterrupted run
    assert torch.equal(torch_state, torch.get_rng_state())
    sampler = loader.sampler
    assert isinstance(sampler, RepeatFactorSampler) and sampler.start == 5
    sets = [np.array(sorted(set(data[i]["label"].ravel().tolist()) - {255})) for i in range(12)]
    np.testing.assert_allclose(sampler.repeat_factors, brute_force_factors([s.tolist() for s in sets], 0.5))
    assert sampler.repeat_factors.max() > 1  # some image is repeated at t = 0.5
    assert class_sets_cache_path(tmp_path, data).is_file()
    batch = next(iter(loader))
    assert batch["image"].shape == (2, 3, 32, 32)
    # the batch is the stream's positions 5 and 6, augmented by their positions
    expected = [loader.dataset[item] for item in islice(iter(RepeatFactorSampler(sampler.repeat_factors, 0, 5)), 2)]
    for b, e in enumerate(expected):
        assert (batch["label"][b] == e["label"]).all()


@pytest.mark.parametrize("value", [0, -0.1, 1.5])
def test_threshold_is_validated(value):
    with pytest.raises(ConfigError, match="repeat_factor_threshold"):
        load_config(None, TINY + [f"data.repeat_factor_threshold={value}"])
