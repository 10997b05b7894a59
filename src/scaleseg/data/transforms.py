"""Image/label transforms. A sample is a dict: image uint8 (H, W, 3), label int (H, W), name str.

Training: random resize (ratio of the image size), random crop (retried until no class covers more
than `cat_max_ratio`), horizontal flip, pad (image 0, label ignore), ImageNet normalisation.
Evaluation: normalisation only, the image keeps its size.

Randomness comes from a `numpy.random.Generator` passed in per sample (seeded from the run seed and
the sample's position in the training stream), never from global state: the same position gives
the same augmentation in any worker process, which makes resumed runs exact.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

IMAGENET_MEAN = (123.675, 116.28, 103.53)  # RGB, 0..255 scale
IMAGENET_STD = (58.395, 57.12, 57.375)


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) -> float32 (3, H, W), ImageNet-normalised."""
    t = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float()
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (t - mean) / std


def resize(image: np.ndarray, label: np.ndarray | None, size: tuple[int, int]):
    """Bilinear for the image, nearest for the label (int32, so 16-bit and larger ids survive)."""
    h, w = size
    out_image = np.array(Image.fromarray(image).resize((w, h), Image.BILINEAR))  # a writable copy
    out_label = None
    if label is not None:
        out_label = np.array(Image.fromarray(label.astype(np.int32), mode="I").resize((w, h), Image.NEAREST))
    return out_image, out_label


class TrainTransform:
    """Random resize -> random crop (cat_max_ratio) -> flip -> pad -> normalise."""

    def __init__(
        self,
        crop_size: tuple[int, int],
        scale_range: tuple[float, float] = (0.5, 2.0),
        cat_max_ratio: float = 0.75,
        flip: bool = True,
        ignore_index: int = 255,
        crop_tries: int = 10,
    ) -> None:
        self.crop_size = tuple(crop_size)
        self.scale_range = scale_range
        self.cat_max_ratio = cat_max_ratio
        self.flip = flip
        self.ignore_index = ignore_index
        self.crop_tries = crop_tries

    def __call__(self, sample: dict, rng: np.random.Generator) -> dict:
        image, label = sample["image"], sample["label"]
        ratio = rng.uniform(*self.scale_range)
        h, w = label.shape
        image, label = resize(image, label, (max(1, round(h * ratio)), max(1, round(w * ratio))))
        image, label = self._random_crop(image, label, rng)
        if self.flip and rng.random() < 0.5:
            image, label = image[:, ::-1], label[:, ::-1]
        image, label = pad_to(image, label, self.crop_size, self.ignore_index)
        return {
            "image": to_tensor(image),  # (3, h, w)
            "label": torch.from_numpy(np.ascontiguousarray(label, dtype=np.int64)),  # (h, w)
            "name": sample["name"],
        }

    def _random_crop(self, image: np.ndarray, label: np.ndarray, rng: np.random.Generator):
        ch, cw = self.crop_size
        h, w = label.shape
        for attempt in range(self.crop_tries):
            y0 = int(rng.integers(0, max(h - ch, 0) + 1))
            x0 = int(rng.integers(0, max(w - cw, 0) + 1))
            crop_label = label[y0 : y0 + ch, x0 : x0 + cw]
            if self.cat_max_ratio >= 1.0 or attempt == self.crop_tries - 1:
                break
            _, counts = np.unique(crop_label[crop_label != self.ignore_index], return_counts=True)
            if len(counts) > 1 and counts.max() / counts.sum() < self.cat_max_ratio:
                break
        return image[y0 : y0 + ch, x0 : x0 + cw], crop_label


def pad_to(image: np.ndarray, label: np.ndarray, size: tuple[int, int], ignore_index: int):
    """Pad bottom/right to at least `size`: image with 0, label with the ignore index."""
    h, w = label.shape
    ph, pw = max(size[0] - h, 0), max(size[1] - w, 0)
    if ph == 0 and pw == 0:
        return image, label
    image = np.pad(image, ((0, ph), (0, pw), (0, 0)), constant_values=0)
    label = np.pad(label, ((0, ph), (0, pw)), constant_values=ignore_index)
    return image, label


class EvalTransform:
    """Normalise only; the label keeps the original resolution (metrics are at full size)."""

    def __call__(self, sample: dict, rng: np.random.Generator | None = None) -> dict:
        return {
            "image": to_tensor(sample["image"]),
            "label": torch.from_numpy(np.ascontiguousarray(sample["label"], dtype=np.int64)),
            "name": sample["name"],
        }
