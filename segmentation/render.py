"""Turn label maps into pictures: colour maps, blended overlays, binary overlays, and encoded bytes.

All functions take and return numpy arrays at the caller's size; colouring is one palette lookup, and an overlay
one lookup in a (class, channel, pixel value) -> blended value table, never a loop over pixels or classes. The
lookup is split over two threads by rows (numpy lets go of the GIL): a 2048x1024 overlay in ~11 ms here, against
~29 ms for the float blend.
"""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import imagecodecs
import numpy as np
from PIL import Image

from .classes import BINARY_ALPHA, BINARY_COLOR, PALETTE

ImageFormat = Literal["png", "jpeg", "webp"]
MEDIA_TYPES: dict[str, str] = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}


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
    return palette[labels]


def blend(image: np.ndarray, color: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """``(1 - alpha) * image + alpha * color``, both (H, W, 3) uint8, rounded to uint8."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be within [0, 1], got {alpha}")
    if image.shape != color.shape:
        raise ValueError(f"image {image.shape} and colour map {color.shape} differ in shape")
    out = image.astype(np.float32)
    out += alpha * (color.astype(np.float32) - out)
    return np.rint(out, out=out).astype(np.uint8)


_ROWS = ThreadPoolExecutor(max_workers=2, thread_name_prefix="render")
_VALUES = np.arange(256, dtype=np.float32)


def blend_table(colors: np.ndarray, alpha: float) -> np.ndarray:
    """[K, 3] colours -> [K, 3, 256] uint8: ``blend`` of every pixel value with each class's colour channel."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be within [0, 1], got {alpha}")
    colors = np.asarray(colors, dtype=np.float32)[:, :, None]  # [K, 3, 1]
    table = _VALUES + alpha * (colors - _VALUES)  # same float32 arithmetic as blend()
    return np.rint(table, out=table).astype(np.uint8)


def apply_table(image: np.ndarray, labels: np.ndarray, table: np.ndarray) -> np.ndarray:
    """out[y, x, c] = table[labels[y, x], c, image[y, x, c]], in two row bands on two threads."""
    if labels.size and int(labels.max()) >= len(table):
        raise ValueError(f"label {int(labels.max())} has no colour: the palette has {len(table)} entries")
    flat = table.reshape(-1)
    channel = np.arange(3, dtype=np.int32) * 256
    out = np.empty_like(image)

    def band(rows: slice) -> None:
        index = labels[rows].astype(np.int32)[..., None] * (3 * 256) + channel + image[rows]  # [h, W, 3]
        np.take(flat, index, out=out[rows])

    h = image.shape[0]
    list(_ROWS.map(band, (slice(0, h // 2), slice(h // 2, h))))
    return out


def render_overlay(image: np.ndarray, labels: np.ndarray, alpha: float = 0.5, palette: np.ndarray = PALETTE) -> np.ndarray:
    """Label colours blended over the whole photo, as the reference dashboards draw it (50/50 by default); equal
    to ``blend(image, colorize(labels, palette), alpha)``."""
    _check_pair(image, labels)
    return apply_table(image, labels, blend_table(palette, alpha))


def render_binary_overlay(
    image: np.ndarray, mask: np.ndarray, alpha: float = BINARY_ALPHA, color: tuple[int, int, int] = BINARY_COLOR
) -> np.ndarray:
    """Foreground pixels (mask != 0) tinted ``color`` at ``alpha``; background pixels left exactly as they were."""
    _check_pair(image, mask)
    identity = np.broadcast_to(np.arange(256, dtype=np.uint8), (1, 3, 256))
    table = np.concatenate([identity, blend_table(np.asarray([color]), alpha)])  # [2, 3, 256]
    return apply_table(image, (mask != 0).astype(np.uint8), table)


def render_binary_color(mask: np.ndarray, color: tuple[int, int, int] = BINARY_COLOR) -> np.ndarray:
    """(H, W) 0/1 mask -> (H, W, 3) uint8: black background, ``color`` foreground."""
    palette = np.array([(0, 0, 0), color], dtype=np.uint8)
    return colorize(mask.astype(np.uint8), palette)


def encode(pixels: np.ndarray, fmt: ImageFormat = "png") -> bytes:
    """Encode (H, W) or (H, W, 3) uint8 pixels.

    PNG (lossless) through libpng with zlib level 1, run-length strategy and the Sub filter, as OpenCV's fast PNG
    setting: a 2048x1024 photo overlay in ~53 ms and 1.74 MB here, against ~118 ms and 1.97 MB for Pillow at
    level 1 (and ~600 ms at Pillow's default level 6); a class-id mask in ~6 ms."""
    if fmt not in MEDIA_TYPES:
        raise ValueError(f"unknown image format {fmt!r}; expected one of {sorted(MEDIA_TYPES)}")
    if fmt == "png":
        return imagecodecs.png_encode(np.ascontiguousarray(pixels), level=1, strategy=3, filter=16)
    buf = io.BytesIO()
    img = Image.fromarray(pixels)
    if fmt == "jpeg":
        img.save(buf, format="JPEG", quality=90)
    else:
        img.save(buf, format="WEBP", quality=90, method=0)
    return buf.getvalue()
