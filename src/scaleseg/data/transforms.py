"""Image/label transforms. A sample is a dict: image uint8 (H, W, 3), label int (H, W), name str.

Training: random resize (ratio of the image size), random crop (retried until no class covers more
than `cat_max_ratio`), horizontal flip, optional photometric distortion (brightness, contrast,
saturation, hue), pad (image 0, label ignore), ImageNet normalisation.
Evaluation: normalisation only, the image keeps its size.

Randomness comes from a `numpy.random.Generator` passed in per sample (seeded from the run seed and
the sample's position in the training stream), never from global state: the same position gives
the same augmentation in any worker process, which makes resumed runs exact.
"""

from __future__ import annotations

from dataclasses import dataclass

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
    """Random resize -> random crop (cat_max_ratio) -> flip -> [photometric] -> pad -> normalise.

    `photometric`: True for `PhotometricDistortion()` with its defaults, or an instance. It runs on
    the crop, before padding, so padded pixels stay 0; it draws from the sample's RNG after the
    resize, crop and flip draws, so turning it on does not change the geometry of any sample.
    """

    def __init__(
        self,
        crop_size: tuple[int, int],
        scale_range: tuple[float, float] = (0.5, 2.0),
        cat_max_ratio: float = 0.75,
        flip: bool = True,
        ignore_index: int = 255,
        crop_tries: int = 10,
        photometric: "bool | PhotometricDistortion" = False,
    ) -> None:
        self.crop_size = tuple(crop_size)
        self.scale_range = scale_range
        self.cat_max_ratio = cat_max_ratio
        self.flip = flip
        self.ignore_index = ignore_index
        self.crop_tries = crop_tries
        if photometric is True:
            photometric = PhotometricDistortion()
        self.photometric = photometric or None

    def __call__(self, sample: dict, rng: np.random.Generator) -> dict:
        image, label = sample["image"], sample["label"]
        ratio = rng.uniform(*self.scale_range)
        h, w = label.shape
        image, label = resize(image, label, (max(1, round(h * ratio)), max(1, round(w * ratio))))
        image, label = self._random_crop(image, label, rng)
        if self.flip and rng.random() < 0.5:
            image, label = image[:, ::-1], label[:, ::-1]
        if self.photometric is not None:
            image = self.photometric(image, rng)
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


@dataclass(frozen=True)
class PhotometricParams:
    """One draw of `PhotometricDistortion`: each field is None when that step is skipped."""

    brightness: float | None  # added to every channel, 0..255 scale
    contrast: float | None  # every channel multiplied by this
    contrast_first: bool  # contrast before (True) or after (False) the saturation/hue steps
    saturation: float | None  # HSV saturation multiplied by this (then clipped to 1)
    hue: float | None  # added to the HSV hue, in degrees (modulo 360)


class PhotometricDistortion:
    """mmsegmentation's PhotoMetricDistortion, vectorised in float32 on a uint8 RGB image.

    In order: brightness (add a delta in [-32, 32]); then either contrast first or last (each with
    probability 1/2) around the HSV part; saturation (scale S by [0.5, 1.5]); hue (shift H).
    Each of the four steps happens with probability 1/2, independently. As in mmsegmentation,
    "contrast" multiplies the pixel values (it does not blend with the mean grey), and every step
    clips to 0..255. Differences from mmsegmentation, all deliberate: values stay float between
    steps and are rounded once at the end (mmsegmentation truncates to uint8 after each step and
    quantises hue to OpenCV's 180 levels), and the hue and the factors are continuous draws.

    `hue_delta` is in degrees. The default 36 is mmsegmentation's `hue_delta=18`, which counts
    OpenCV's 8-bit hue units (0..179, 2 degrees each).
    """

    def __init__(
        self,
        brightness_delta: float = 32.0,
        contrast_range: tuple[float, float] = (0.5, 1.5),
        saturation_range: tuple[float, float] = (0.5, 1.5),
        hue_delta: float = 36.0,
        prob: float = 0.5,
    ) -> None:
        self.brightness_delta = float(brightness_delta)
        self.contrast_range = (float(contrast_range[0]), float(contrast_range[1]))
        self.saturation_range = (float(saturation_range[0]), float(saturation_range[1]))
        self.hue_delta = float(hue_delta)
        self.prob = float(prob)

    def sample_params(self, rng: np.random.Generator) -> PhotometricParams:
        """Draw one distortion. Always consumes the same 9 numbers from `rng`, whatever is skipped."""
        apply = rng.random(4) < self.prob  # brightness, contrast, saturation, hue
        contrast_first = bool(rng.random() < 0.5)
        u = rng.random(4)
        brightness = self.brightness_delta * (2 * u[0] - 1)
        contrast = self.contrast_range[0] + (self.contrast_range[1] - self.contrast_range[0]) * u[1]
        saturation = self.saturation_range[0] + (self.saturation_range[1] - self.saturation_range[0]) * u[2]
        hue = self.hue_delta * (2 * u[3] - 1)
        return PhotometricParams(
            brightness=float(brightness) if apply[0] else None,
            contrast=float(contrast) if apply[1] else None,
            contrast_first=contrast_first,
            saturation=float(saturation) if apply[2] else None,
            hue=float(hue) if apply[3] else None,
        )

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return apply_photometric(image, self.sample_params(rng))


def apply_photometric(image: np.ndarray, params: PhotometricParams) -> np.ndarray:
    """uint8 RGB (H, W, 3) -> the distorted uint8 image (a new array; the input is not modified)."""
    x = image.astype(np.float32)  # (H, W, 3), 0..255
    if params.brightness is not None:
        x = np.clip(x + np.float32(params.brightness), 0, 255)
    if params.contrast is not None and params.contrast_first:
        x = np.clip(x * np.float32(params.contrast), 0, 255)
    if params.saturation is not None or params.hue is not None:
        h, s, v = rgb_to_hsv(x)
        if params.saturation is not None:
            s = np.clip(s * np.float32(params.saturation), 0, 1)
        if params.hue is not None:
            h = np.mod(h + np.float32(params.hue / 60.0), 6)
        x = hsv_to_rgb(h, s, v)
    if params.contrast is not None and not params.contrast_first:
        x = np.clip(x * np.float32(params.contrast), 0, 255)
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def rgb_to_hsv(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """float (..., 3) RGB in 0..255 -> hue in [0, 6) (60-degree sectors), saturation in [0, 1],
    value in 0..255. Grey pixels get hue 0."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    v = rgb.max(axis=-1)
    chroma = v - rgb.min(axis=-1)
    safe = np.where(chroma > 0, chroma, 1)
    h = np.where(
        v == r, np.mod((g - b) / safe, 6), np.where(v == g, (b - r) / safe + 2, (r - g) / safe + 4)
    )
    h = np.where(chroma > 0, h, 0).astype(rgb.dtype)
    s = np.where(v > 0, chroma / np.where(v > 0, v, 1), 0).astype(rgb.dtype)
    return h, s, v


def hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inverse of `rgb_to_hsv`: (..., 3) float RGB. Channel n (R 5, G 3, B 1) is
    v - v s clip(min(k, 4 - k), 0, 1) with k = (n + h) mod 6."""
    out = []
    for n in (5, 3, 1):
        k = np.mod(n + h, 6)
        out.append(v - v * s * np.clip(np.minimum(k, 4 - k), 0, 1))
    return np.stack(out, axis=-1)


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
