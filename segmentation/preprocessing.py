"""Framework-free pre- and post-processing shared by the predictors.

Preprocessing is data (:class:`Normalization`), so it travels in each stored model's metadata and a loaded
model is fed exactly as it was trained.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Normalization:
    """``(pixel / 255 - mean) / std`` per RGB channel. The default is plain [0, 1] scaling."""

    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)

    def as_dict(self) -> dict:
        return {k: list(v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict | None) -> "Normalization":
        return cls(**{k: tuple(v) for k, v in (d or {}).items()})


def resize_rgb(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(H, W, 3) uint8 -> (h, w, 3) uint8, bilinear (``size`` is (h, w))."""
    h, w = size
    if image.shape[:2] == (h, w):
        return image
    return np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR))


def to_batch(images: list[np.ndarray], size: tuple[int, int], norm: Normalization = Normalization()) -> np.ndarray:
    """A list of (H_i, W_i, 3) uint8 -> (N, h, w, 3) float32, resized and normalised, channels last."""
    if not images:
        raise ValueError("a batch needs at least one image")
    for i, img in enumerate(images):
        if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
            raise ValueError(f"image {i} must be (H, W, 3) uint8, got {img.shape} {img.dtype}")
    batch = np.stack([resize_rgb(img, size) for img in images]).astype(np.float32)  # (N, h, w, 3)
    batch *= 1.0 / 255.0
    batch -= np.asarray(norm.mean, dtype=np.float32)
    batch /= np.asarray(norm.std, dtype=np.float32)
    return batch


def resize_labels(labels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(h, w) uint8 class ids -> (H, W) uint8 at ``size`` = (H, W), nearest neighbour (ids are never blended)."""
    H, W = size
    if labels.shape == (H, W):
        return labels
    return np.asarray(Image.fromarray(labels.astype(np.uint8)).resize((W, H), Image.NEAREST))
