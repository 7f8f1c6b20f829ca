import io
import struct
import zlib

import imagecodecs
import numpy as np
import pytest
from PIL import Image

from segmentation.images import ImageLimits, ImageRejected, decode_image


def _bytes(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


RGB = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)


def test_rgb_png_decodes_exactly():
    out = decode_image(_bytes(Image.fromarray(RGB), "PNG"))
    assert out.dtype == np.uint8 and np.array_equal(out, RGB)


@pytest.mark.parametrize(
    "mode",
    ["RGBA", "L", "LA", "P", "1", "CMYK", "I;16", "I"],
)
def test_every_common_mode_becomes_rgb_at_the_same_size(mode):
    if mode == "I;16":
        img = Image.fromarray(RGB[..., 0].astype(np.uint16) * 257)
    elif mode == "I":
        img = Image.fromarray(RGB[..., 0].astype(np.int32) * 257)
    else:
        img = Image.fromarray(RGB).convert(mode)
    assert img.mode == mode
    fmt = "JPEG" if mode == "CMYK" else "TIFF" if mode == "I" else "PNG"
    out = decode_image(_bytes(img, fmt))
    assert out.shape == (20, 30, 3) and out.dtype == np.uint8


def test_sixteen_bit_grey_is_scaled_not_clipped():
    grey = np.array([[0, 32896, 65535]], dtype=np.uint16).repeat(8, 0).repeat(4, 1)
    out = decode_image(_bytes(Image.fromarray(grey), "PNG"))
    assert out[0, 0].tolist() == [0, 0, 0] and out[0, 4, 0] == 128 and out[0, -1, 0] == 255


def test_rgba_drops_alpha_and_keeps_colours():
    rgba = np.dstack([RGB, np.full((20, 30), 7, np.uint8)])
    out = decode_image(_bytes(Image.fromarray(rgba), "PNG"))
    assert np.array_equal(out, RGB)


def test_animated_gif_gives_the_first_frame():
    frames = [Image.new("RGB", (16, 16), c) for c in [(255, 0, 0), (0, 0, 255)]]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    out = decode_image(buf.getvalue())
    assert out[0, 0, 0] > 200 and out[0, 0, 2] < 50


def test_exif_orientation_is_applied():
    img = Image.fromarray(RGB)  # 30 wide, 20 high
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    out = decode_image(_bytes(img, "JPEG", exif=exif))
    assert out.shape == (30, 20, 3)


@pytest.mark.parametrize("data", [b"", b"not an image at all", b"\x89PNG\r\n\x1a\n" + b"\x00" * 20])
def test_garbage_is_a_400_that_says_so(data):
    with pytest.raises(ImageRejected) as e:
        decode_image(data)
    assert e.value.status == 400
    assert "image" in str(e.value) or "empty" in str(e.value)


def test_truncated_png_is_refused_not_filled_with_black():
    data = _bytes(Image.fromarray(RGB), "PNG")
    with pytest.raises(ImageRejected, match="truncated or corrupt"):
        decode_image(data[: len(data) * 2 // 3])


PHOTO = np.random.default_rng(1).integers(0, 256, (1024, 1024, 3), dtype=np.uint8)


@pytest.mark.parametrize("pixels", [RGB, PHOTO], ids=["small", "photo-sized"])
@pytest.mark.parametrize("alpha", [False, True])
def test_png_decodes_exactly_at_every_size(pixels, alpha):
    img = Image.fromarray(np.dstack([pixels, np.full(pixels.shape[:2], 9, np.uint8)]) if alpha else pixels)
    out = decode_image(_bytes(img, "PNG"))
    assert out.dtype == np.uint8 and np.array_equal(out, pixels)


@pytest.mark.parametrize("pixels", [RGB, PHOTO], ids=["small", "photo-sized"])
@pytest.mark.parametrize("cut", ["half", "last 20 bytes", "zeroed body"])
def test_broken_png_is_refused_at_every_size(pixels, cut):
    data = _bytes(Image.fromarray(pixels), "PNG")
    broken = {
        "half": data[: len(data) // 2],
        "last 20 bytes": data[:-20],
        "zeroed body": data[:100] + b"\x00" * (len(data) - 100 - 12) + data[-12:],
    }[cut]
    with pytest.raises(ImageRejected, match="truncated or corrupt"):
        decode_image(broken)


@pytest.mark.parametrize("pixels", [RGB, PHOTO], ids=["small", "photo-sized"])
def test_a_flipped_byte_inside_the_image_data_is_refused_not_decoded_into_other_colours(pixels):
    data = bytearray(_bytes(Image.fromarray(pixels), "PNG"))
    start = data.index(b"IDAT") + 4
    data[start + (len(data) - 12 - start) // 2] ^= 0x01  # the middle of the image data, chunk layout intact
    with pytest.raises(ImageRejected, match="truncated or corrupt"):
        decode_image(bytes(data))


@pytest.mark.parametrize("shape", [(20, 30), (1024, 1024)], ids=["small", "photo-sized"])
def test_a_transparent_colour_keeps_its_stored_colour(shape):
    pixels = np.random.default_rng(2).integers(0, 4, (*shape, 3), dtype=np.uint8) * 60
    key = tuple(int(v) for v in pixels[0, 0])
    out = decode_image(_bytes(Image.fromarray(pixels), "PNG", transparency=key))
    assert np.array_equal(out, pixels)


def test_sixteen_bit_rgb_photo_sized_png_is_scaled():
    data = imagecodecs.png_encode(PHOTO.astype(np.uint16) * 257)
    assert np.array_equal(decode_image(data), PHOTO)


def test_truncated_jpeg_is_refused():
    data = _bytes(Image.fromarray(np.tile(RGB, (10, 10, 1))), "JPEG")
    with pytest.raises(ImageRejected, match="truncated or corrupt"):
        decode_image(data[: len(data) // 2])


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _png_bomb(width: int, height: int) -> bytes:
    """A few hundred bytes that claim width x height pixels: a small zlib stream of zeros, as bombs are made."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 100_000, 9)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def test_pixel_bomb_is_refused_from_the_header_alone():
    with pytest.raises(ImageRejected) as e:
        decode_image(_png_bomb(50_000, 50_000))  # beyond Pillow's own bomb limit
    assert e.value.status == 413 and "pixels" in str(e.value)
    with pytest.raises(ImageRejected) as e:
        decode_image(_png_bomb(8_000, 6_000))  # 48 MP: under Pillow's limit, over ours
    assert e.value.status == 413 and "48,000,000 pixels" in str(e.value)


def test_upload_size_limit_is_413():
    with pytest.raises(ImageRejected) as e:
        decode_image(b"x" * 101, ImageLimits(max_bytes=100))
    assert e.value.status == 413


def test_too_small_is_refused():
    with pytest.raises(ImageRejected, match="at least 8"):
        decode_image(_bytes(Image.new("RGB", (4, 40)), "PNG"))


def test_refused_uploads_leave_no_memory_behind():
    """A decoder that fails part-way must free what it allocated: the gateway decodes every upload."""
    import tracemalloc

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (256, 512, 3), dtype=np.uint8)).save(buf, format="PNG")
    good = buf.getvalue()
    flipped = bytearray(good)
    flipped[len(good) // 2] ^= 0x01  # whole, so the PNG decoder starts, and fails on its checksum
    broken = [good[: len(good) // 2], good[:-20], good[:100] + b"\x00" * (len(good) - 100), bytes(flipped)]
    for body in broken:  # warm caches first
        with pytest.raises(ImageRejected):
            decode_image(body)
    tracemalloc.start()
    try:
        for _ in range(20):
            for body in broken:
                with pytest.raises(ImageRejected):
                    decode_image(body)
        kept, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert kept < 1 << 20, f"{kept:,} bytes still allocated after 80 refused uploads of 384 KB images"


# --- ground-truth masks ----------------------------------------------------------------------------------------

def _encoded(array: np.ndarray, fmt: str = "PNG", mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array, mode).save(buf, fmt)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["PNG", "BMP", "TIFF"])
def test_a_class_id_mask_decodes_to_its_ids(fmt):
    from segmentation.images import decode_mask

    ids = np.random.default_rng(1).integers(0, 34, (20, 30), dtype=np.uint8)
    assert np.array_equal(decode_mask(_encoded(ids, fmt)), ids)
    palette = Image.fromarray(ids).convert("P")  # palette indices are the ids
    buf = io.BytesIO()
    palette.save(buf, "PNG")
    assert np.array_equal(decode_mask(buf.getvalue()), np.asarray(palette))
    assert np.array_equal(decode_mask(_encoded(ids.astype(np.uint16))), ids)  # 16-bit ids below 256


@pytest.mark.parametrize(
    "data, message",
    [
        (_encoded(np.zeros((20, 30, 3), np.uint8)), "mode RGB"),
        (_encoded(np.zeros((20, 30), np.uint8), "JPEG"), "lossy"),
        (_encoded(np.full((20, 30), 300, np.uint16)), "not class ids"),
        (b"", "mask is empty"),
        (b"not an image", "mask is not a decodable image"),
    ],
)
def test_a_mask_that_is_not_class_ids_is_refused(data, message):
    from segmentation.images import decode_mask

    with pytest.raises(ImageRejected, match=message):
        decode_mask(data)
