"""Framework-free pre- and post-processing shared by the predictors.

Preprocessing is data (:class:`Normalization`), so it travels in each stored model's metadata and a loaded
model is fed exactly as it was trained.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from fractions import Fraction
from functools import cache, lru_cache

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


BAND_MIN_PIXELS = 1_000_000  # below this, handing rows to another thread costs more than it saves


def resize_rgb(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(H, W, 3) uint8 -> (h, w, 3) uint8, Pillow's bilinear (antialiased when shrinking); ``size`` is (h, w).

    A large image is resized in horizontal bands of output rows, one per CPU, at the same time (Pillow releases
    the GIL): 2048x1024 -> 256x256 in ~4 ms here instead of ~6.5 ms. Only for geometries where the bands give the
    pixels of one call (:func:`bands_for`); otherwise, one call."""
    h, w = size
    if image.shape[:2] == (h, w):
        return image
    big = image.shape[0] * image.shape[1] >= BAND_MIN_PIXELS
    splits = bands_for(image.shape[:2], (h, w), _band_count()) if big else None
    return _resize_in_bands(image, (h, w), splits) if splits else _resize_whole(image, (h, w))


def _resize_whole(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    return np.asarray(Image.fromarray(image).resize(size[::-1], Image.BILINEAR))


def _resize_in_bands(image: np.ndarray, size: tuple[int, int], splits: tuple[tuple[int, float], ...]) -> np.ndarray:
    picture, (h, w), (H, W) = Image.fromarray(image), size, image.shape[:2]
    bounds = list(zip([(0, 0.0), *splits], [*splits, (h, float(H))]))
    bands = _band_pool().map(
        lambda b: np.asarray(picture.resize((w, b[1][0] - b[0][0]), Image.BILINEAR, box=(0.0, b[0][1], W, b[1][1]))),
        bounds)
    return np.concatenate(list(bands))


@lru_cache(maxsize=256)
def bands_for(in_hw: tuple[int, int], out_hw: tuple[int, int], bands: int) -> tuple[tuple[int, float], ...] | None:
    """The cuts for resizing ``in_hw`` to ``out_hw`` in ``bands`` bands, or None where bands could change a pixel.

    Two conditions, the first by arithmetic, the second by trying it. (1) :func:`band_splits`: every band gets
    the filter weights of the whole resize, bit for bit. (2) Pillow runs the two passes in an order it picks from
    the geometry of each call (seen here: 900x1200 -> 512x512 goes horizontal first, its bands vertical first),
    so once per geometry a random probe image is resized both ways and the bands are used only if every pixel
    agrees (~20 ms, then cached)."""
    splits = band_splits(in_hw[0], out_hw[0], bands)
    if not splits:
        return None
    probe = np.random.default_rng(0).integers(0, 256, (*in_hw, 3), dtype=np.uint8)
    return splits if np.array_equal(_resize_in_bands(probe, out_hw, splits), _resize_whole(probe, out_hw)) else None


def band_splits(in_rows: int, out_rows: int, bands: int) -> tuple[tuple[int, float], ...] | None:
    """Where to cut a resize of ``in_rows`` to ``out_rows`` rows into ``bands``: (output row, input row) pairs.

    None unless each band's filter weights equal the whole resize's, bit for bit. Pillow places output row ``y``
    at input ``box_top + (y + 0.5) * scale`` (with ``scale = box_height / out_rows``, box edges as float32) and
    derives the weights from that centre. The two agree exactly when ``scale`` is an exact binary fraction
    (``out_rows`` a power of two times a divisor of ``in_rows``, as for 256 rows) and every cut and centre is
    representable: then no step of either computation rounds."""
    if bands < 2 or out_rows < 2 * bands:
        return None
    scale = Fraction(in_rows, out_rows)
    if Fraction(in_rows / out_rows) != scale or scale.denominator * 2 * (in_rows + 1) >= 2**52:
        return None  # an inexact scale: the band's recomputed scale and centres may round differently
    cuts = []
    for i in range(1, bands):
        out_row = round(i * out_rows / bands)
        edge = out_row * scale
        if Fraction(float(np.float32(edge))) != edge:
            return None  # Pillow takes the box as float32
        cuts.append((out_row, float(edge)))
    return tuple(cuts)


def _band_count() -> int:
    return min(len(os.sched_getaffinity(0)), 4)


@cache
def _band_pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(_band_count(), thread_name_prefix="resize-band")


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
