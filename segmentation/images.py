"""Decode untrusted image bytes into (H, W, 3) uint8 RGB, or refuse them with a message a caller can act on.

Limits are checked from the header before any pixel is decoded, so a decompression bomb costs nothing.
Mode handling (documented in the README):
- RGBA / LA / PA: the alpha channel is dropped (colours kept as stored), not composited;
- P (palette), L, 1-bit, CMYK: converted to RGB;
- I;16 / I (16/32-bit greyscale): scaled to 8 bits by the type's full range;
- animated GIF / APNG: the first frame;
- JPEG EXIF orientation: applied, so the mask lines up with the picture as the user sees it.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from pywuffs import ImageDecoderQuirks, ImageDecoderType, PixelFormat
from pywuffs.aux import ImageDecoder, ImageDecoderConfig

from .settings import settings


@dataclass(frozen=True)
class ImageLimits:
    """What one upload may be; the defaults are the settings' (``SEG_MAX_UPLOAD_BYTES``, ``SEG_MAX_PIXELS``,
    ``SEG_MIN_SIDE``)."""

    max_bytes: int | None = None
    max_pixels: int | None = None
    min_side: int | None = None

    def __post_init__(self) -> None:
        s = settings()
        for name, default in (
            ("max_bytes", s.max_upload_bytes),
            ("max_pixels", s.max_pixels),
            ("min_side", s.min_side),
        ):
            if getattr(self, name) is None:
                object.__setattr__(self, name, default)


ACCEPTED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")


class ImageRejected(ValueError):
    """The upload is not an image this service can segment. ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def _to_rgb(img: Image.Image) -> np.ndarray:
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        arr = np.asarray(img, dtype=np.uint16) >> 8
        return np.repeat(arr.astype(np.uint8)[..., None], 3, axis=2)
    if mode == "I":
        arr = np.asarray(img, dtype=np.int64)
        arr = np.clip(arr, 0, None)
        top = 65535 if arr.max() <= 65535 else 2**31 - 1
        return np.repeat((arr * 255 // top).astype(np.uint8)[..., None], 3, axis=2)
    if mode == "F":
        raise ImageRejected("floating-point images (mode F) are not supported; send 8- or 16-bit RGB or greyscale")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        img = img.convert("RGBA").convert("RGB") if mode != "RGBA" else img.convert("RGB")
    elif mode != "RGB":
        img = img.convert("RGB")
    return np.asarray(img, dtype=np.uint8)


def _open(data: bytes, limits: ImageLimits | None, what: str = "upload") -> Image.Image:
    """The image's header, opened lazily, after the size, format and pixel checks."""
    limits = limits or ImageLimits()
    if not data:
        raise ImageRejected(f"the {what} is empty: send the bytes of a PNG, JPEG, WebP, GIF, BMP or TIFF image")
    if len(data) > limits.max_bytes:
        raise ImageRejected(f"the {what} is {len(data):,} bytes; the limit is {limits.max_bytes:,}", status=413)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own pixel limit is checked below
            img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise ImageRejected(
            f"the image has too many pixels ({e}); the limit is {limits.max_pixels:,}", status=413
        ) from None
    except (UnidentifiedImageError, OSError, ValueError):
        raise ImageRejected(
            f"the {what} is not a decodable image; accepted formats: " + ", ".join(ACCEPTED_FORMATS)
        ) from None
    if img.format not in ACCEPTED_FORMATS:
        raise ImageRejected(f"image format {img.format} is not accepted; send one of {', '.join(ACCEPTED_FORMATS)}")
    width, height = img.size
    if width * height > limits.max_pixels:
        raise ImageRejected(
            f"the image is {width}x{height} = {width * height:,} pixels; the limit is {limits.max_pixels:,}", status=413
        )
    if min(width, height) < limits.min_side:
        raise ImageRejected(f"the image is {width}x{height}; each side must be at least {limits.min_side} pixels")
    return img


def _load_verified(data: bytes, img: Image.Image) -> Image.Image:
    try:
        if img.format == "PNG":
            # Pillow fills rows missing from a cut-short PNG with black; verify() walks every chunk and its CRC.
            Image.open(io.BytesIO(data)).verify()
        img.seek(0)  # first frame of an animation
        img.load()
        return img
    except Exception:  # noqa: BLE001 - any decoder failure is the upload's fault, not the server's
        raise _corrupt(img) from None


LOSSLESS_FORMATS = ("PNG", "BMP", "TIFF")


def decode_mask(data: bytes, limits: ImageLimits | None = None) -> np.ndarray:
    """Bytes of a class-id mask (a single-channel PNG, BMP or TIFF: greyscale, palette indices, or 16-bit ids
    below 256) -> (H, W) uint8. Raises :class:`ImageRejected` with the reason."""
    img = _open(data, limits, "mask")
    if img.format not in LOSSLESS_FORMATS:
        raise ImageRejected(f"a {img.format} mask is lossy: class ids need one of {', '.join(LOSSLESS_FORMATS)}")
    if img.mode not in ("L", "P", "I;16", "I;16B", "I;16L", "I", "1"):
        raise ImageRejected(f"a mask has one channel of class ids; this {img.format} has mode {img.mode}")
    ids = np.asarray(_load_verified(data, img))
    if ids.dtype != np.uint8:
        if ids.size and (ids.min() < 0 or ids.max() > 255):
            raise ImageRejected(f"mask values {ids.min()}..{ids.max()} are not class ids (0..255)")
        ids = ids.astype(np.uint8)
    return ids


def decode_image(data: bytes, limits: ImageLimits | None = None) -> np.ndarray:
    """Bytes of an uploaded image -> (H, W, 3) uint8 RGB. Raises :class:`ImageRejected` with the reason."""
    img = _open(data, limits)
    if (
        img.format == "PNG"
        and img.mode in ("RGB", "RGBA")
        and not getattr(img, "is_animated", False)
        and "exif" not in img.info
    ):  # an EXIF orientation takes Pillow's path, which applies it
        pixels = _decode_png_rgb(data, img)
        if pixels is not None:
            return pixels
    img = _load_verified(data, img)
    try:
        return _to_rgb(ImageOps.exif_transpose(img))
    except ImageRejected:
        raise
    except Exception:  # noqa: BLE001 - any decoder failure is the upload's fault, not the server's
        raise _corrupt(img) from None


def _corrupt(header: Image.Image) -> ImageRejected:
    return ImageRejected(
        f"the {header.format} image is truncated or corrupt ({header.size[0]}x{header.size[1]}, mode {header.mode}): "
        "it could not be decoded completely"
    )


def _decode_png_rgb(data: bytes, header: Image.Image) -> np.ndarray | None:
    """The common upload, an 8-bit RGB(A) PNG, through Wuffs (pywuffs) with its checksums checked: it inflates and
    undoes the row filters faster than libvips or libspng at every size. None where it declines (a 16-bit PNG, a
    stream cut short, corrupt, or with bytes after its IEND chunk) or is not used (a transparent colour, tRNS, which
    Wuffs zeroes): Pillow's path then scales, keeps or refuses it.

    A stream that does not end with its IEND chunk never reaches Wuffs, which takes one whose last checksums are cut
    off once its rows are in."""
    width, height = header.size
    if not data.endswith(PNG_END) or data[IHDR_BIT_DEPTH] != 8 or "transparency" in header.info:
        return None
    result = _wuffs_png(header.mode == "RGBA").decode(data)
    if result.error_message:
        return None
    pixels = result.pixbuf
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[:2] != (height, width):
        raise ImageRejected(
            f"the PNG image decodes to {pixels.shape} {pixels.dtype}, "
            f"not the {width}x{height} RGB its header declares"
        )
    return np.ascontiguousarray(pixels[..., :3])  # alpha dropped, colours kept as stored


PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # the IEND chunk: empty, with its CRC
IHDR_BIT_DEPTH = 24  # after the signature (8), the IHDR chunk's length and type (8), width and height (8)


def _wuffs_png(alpha: bool):
    """A Wuffs PNG decoder (cheap to make, so one per upload: nothing is shared between threads) giving RGB, or
    RGBA without premultiplying for a source with alpha: asked for RGB, Wuffs would blend its colours."""
    config = ImageDecoderConfig()
    config.enabled_decoders = [ImageDecoderType.PNG]
    config.pixel_format = PixelFormat.RGBA_NONPREMUL if alpha else PixelFormat.RGB
    config.quirks = {ImageDecoderQuirks.IGNORE_CHECKSUM: 0}  # pywuffs' default skips them: a flipped bit went unseen
    return ImageDecoder(config)
