"""Turn label maps into pictures: colour maps, blended overlays, binary overlays, and encoded bytes.

All functions take and return numpy arrays at the caller's size. Colouring and blending run in OpenCV (a colour
map and ``addWeighted``: SIMD, never a Python loop over pixels or classes), several times faster than a numpy table
lookup and float blend (figures in benchmarks/results.md).
"""

from __future__ import annotations

import io
from functools import lru_cache
from typing import Literal

import cv2
import imagecodecs
import numpy as np
from PIL import Image

from .classes import BINARY_ALPHA, BINARY_COLOR, PALETTE

ImageFormat = Literal["png", "jpeg", "webp"]
MEDIA_TYPES: dict[str, str] = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
LOSSY_QUALITY = 90  # JPEG and WebP


def _check_pair(image: np.ndarray, labels: np.ndarray) -> None:
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be (H, W, 3) uint8, got {image.shape} {image.dtype}")
    if labels.shape != image.shape[:2]:
        raise ValueError(f"label map {labels.shape} does not match the image's (H, W) {image.shape[:2]}")


def colorize(labels: np.ndarray, palette: np.ndarray = PALETTE) -> np.ndarray:
    """(H, W) integer class ids -> (H, W, 3) uint8 colours. Ids outside the palette are an error."""
    if labels.ndim != 2:
        raise ValueError(f"labels must be (H, W), got {labels.shape}")
    if labels.size and int(labels.max()) >= len(palette):
        raise ValueError(f"label {int(labels.max())} has no colour: the palette has {len(palette)} entries")
    if len(palette) > 256 or labels.dtype.itemsize > 1:
        return np.asarray(palette, dtype=np.uint8)[labels]
    # applyColorMap with a user table maps one channel of ids to three channels of colours in one pass, where a
    # three-channel LUT first needs the ids copied into three channels.
    table = np.zeros((256, 1, 3), np.uint8)  # cv2.applyColorMap takes exactly 256 entries
    table[: len(palette), 0] = palette
    return cv2.applyColorMap(np.ascontiguousarray(labels, dtype=np.uint8), table)


def blend(image: np.ndarray, color: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """``(1 - alpha) * image + alpha * color``, both (H, W, 3) uint8, rounded to the nearest uint8."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be within [0, 1], got {alpha}")
    if image.shape != color.shape:
        raise ValueError(f"image {image.shape} and colour map {color.shape} differ in shape")
    return cv2.addWeighted(np.ascontiguousarray(image), 1.0 - alpha, np.ascontiguousarray(color), alpha, 0.0)


def render_overlay(
    image: np.ndarray, labels: np.ndarray, alpha: float = 0.5, palette: np.ndarray = PALETTE
) -> np.ndarray:
    """Label colours blended over the whole photo, as the reference dashboards draw it (50/50 by default)."""
    _check_pair(image, labels)
    return blend(image, colorize(labels, palette), alpha)


def render_binary_overlay(
    image: np.ndarray, mask: np.ndarray, alpha: float = BINARY_ALPHA, color: tuple[int, int, int] = BINARY_COLOR
) -> np.ndarray:
    """Foreground pixels (mask != 0) tinted ``color`` at ``alpha``; background pixels left exactly as they were.

    A tinted value depends only on the value and its channel, so the tint is a 256-entry table per channel, made
    by :func:`blend` itself (the same rounding) and applied with ``cv2.LUT``, which is cheaper than blending the
    whole photo with a solid colour."""
    _check_pair(image, mask)
    tinted = cv2.LUT(image, _tint_table(float(alpha), tuple(int(c) for c in color)))
    out = image.copy()
    where = mask if mask.dtype == np.uint8 else (mask != 0).view(np.uint8)  # copyTo takes any non-zero byte as set
    cv2.copyTo(tinted, np.ascontiguousarray(where), out)
    return out


@lru_cache(maxsize=32)
def _tint_table(alpha: float, color: tuple[int, int, int]) -> np.ndarray:
    levels = np.repeat(np.arange(256, dtype=np.uint8)[:, None, None], 3, axis=2)  # (256, 1, 3): every value per channel
    table = blend(levels, np.broadcast_to(np.array(color, np.uint8), levels.shape).copy(), alpha)
    table.flags.writeable = False
    return table


def render_binary_color(mask: np.ndarray, color: tuple[int, int, int] = BINARY_COLOR) -> np.ndarray:
    """(H, W) 0/1 mask -> (H, W, 3) uint8: black background, ``color`` foreground."""
    palette = np.array([(0, 0, 0), color], dtype=np.uint8)
    return colorize(mask.astype(np.uint8), palette)


def encode(pixels: np.ndarray, fmt: ImageFormat = "png") -> bytes:
    """Encode (H, W) or (H, W, 3) uint8 pixels.

    PNG (lossless) through libpng with zlib level 1, run-length strategy and the Sub filter, as OpenCV's fast PNG
    setting: faster and smaller than Pillow at level 1, far faster than Pillow's default level 6 (figures in the
    README, Codecs). JPEG through libjpeg-turbo."""
    if fmt not in MEDIA_TYPES:
        raise ValueError(f"unknown image format {fmt!r}; expected one of {sorted(MEDIA_TYPES)}")
    if fmt == "png":
        return imagecodecs.png_encode(np.ascontiguousarray(pixels), level=1, strategy=3, filter=16)
    if fmt == "jpeg":
        return imagecodecs.jpeg8_encode(np.ascontiguousarray(pixels), level=LOSSY_QUALITY)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="WEBP", quality=LOSSY_QUALITY, method=0)
    return buf.getvalue()
