import io

import numpy as np
import pytest
from PIL import Image

from segmentation.classes import PALETTE
from segmentation.render import blend, colorize, encode, render_binary_overlay, render_overlay


@pytest.fixture
def photo():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)


def test_colorize_looks_up_each_pixel():
    labels = np.array([[0, 1], [7, 5]], np.uint8)
    out = colorize(labels)
    assert out.shape == (2, 2, 3)
    assert out[1, 0].tolist() == [0, 0, 142] and out[0, 1].tolist() == [128, 64, 128]


def test_colorize_refuses_ids_without_a_colour():
    with pytest.raises(ValueError, match="no colour"):
        colorize(np.array([[8]], np.uint8))


def test_overlay_is_the_rounded_alpha_blend_at_the_input_size(photo):
    labels = np.arange(35).reshape(5, 7).astype(np.uint8) % 8
    out = render_overlay(photo, labels, alpha=0.5)
    expected = np.rint(0.5 * photo.astype(float) + 0.5 * PALETTE[labels].astype(float)).astype(np.uint8)
    assert out.shape == photo.shape
    assert np.abs(out.astype(int) - expected).max() <= 1
    assert np.array_equal(render_overlay(photo, labels, alpha=0.0), photo)
    assert np.array_equal(render_overlay(photo, labels, alpha=1.0), PALETTE[labels])


def test_overlay_refuses_mismatched_shapes_and_bad_alpha(photo):
    with pytest.raises(ValueError, match="does not match"):
        render_overlay(photo, np.zeros((4, 7), np.uint8))
    with pytest.raises(ValueError, match="alpha"):
        blend(photo, photo, 1.5)


def test_binary_overlay_tints_only_the_foreground_red(photo):
    mask = np.zeros((5, 7), np.uint8)
    mask[2:4, 3:6] = 1
    out = render_binary_overlay(photo, mask)
    assert np.array_equal(out[mask == 0], photo[mask == 0])
    a = 100 / 255
    expected = np.rint((1 - a) * photo[mask == 1].astype(float) + a * np.array([255, 0, 0]))
    assert np.abs(out[mask == 1].astype(int) - expected).max() <= 1


@pytest.mark.parametrize("fmt,pil_format", [("png", "PNG"), ("jpeg", "JPEG"), ("webp", "WEBP")])
def test_encode_round_trips(photo, fmt, pil_format):
    img = Image.open(io.BytesIO(encode(photo, fmt)))
    assert img.format == pil_format and img.size == (7, 5)
    if fmt == "png":
        assert np.array_equal(np.asarray(img), photo)


def test_mask_png_is_single_channel_and_lossless():
    labels = np.array([[0, 7], [3, 1]], np.uint8)
    img = Image.open(io.BytesIO(encode(labels, "png")))
    assert img.mode == "L" and np.array_equal(np.asarray(img), labels)


def test_overlays_are_the_exact_blend_rounded_to_the_nearest_level_for_any_alpha():
    rng = np.random.default_rng(1)
    photo = rng.integers(0, 256, (33, 17, 3), dtype=np.uint8)
    labels = rng.integers(0, 8, (33, 17), dtype=np.uint8)
    for alpha in (0.0, 0.3, 0.5, 0.77, 1.0):
        exact = (1 - alpha) * photo.astype(float) + alpha * PALETTE[labels].astype(float)
        assert np.abs(render_overlay(photo, labels, alpha).astype(float) - exact).max() <= 0.5 + 1e-3
    mask = (labels > 5).astype(np.uint8)
    tinted = blend(photo, np.broadcast_to(np.array([255, 0, 0], np.uint8), photo.shape), 100 / 255)
    assert np.array_equal(render_binary_overlay(photo, mask), np.where(mask[..., None] == 1, tinted, photo))


@pytest.mark.parametrize("alpha", [0.0, 100 / 255, 0.5, 0.77, 1.0])
@pytest.mark.parametrize("color", [(255, 0, 0), (0, 128, 255), (13, 200, 77)])
def test_binary_overlay_is_the_blend_for_every_value_of_every_channel(alpha, color):
    # every channel takes all 256 values (exhaustive), over a photo large enough for OpenCV's vector paths
    levels = np.arange(256, dtype=np.uint8).reshape(16, 16)
    photo = np.tile(np.stack([levels, levels.T, levels[::-1]], axis=-1), (40, 40, 1))
    solid = np.broadcast_to(np.array(color, np.uint8), photo.shape).copy()
    mask = np.ones(photo.shape[:2], np.uint8)
    assert np.array_equal(render_binary_overlay(photo, mask, alpha, color), blend(photo, solid, alpha))


def test_colorize_handles_any_integer_label_type():
    labels = np.array([[0, 7], [3, 1]], np.int64)
    assert np.array_equal(colorize(labels), PALETTE[labels])
    assert np.array_equal(colorize(labels.astype(np.uint8)), PALETTE[labels])


@pytest.mark.parametrize("classes", [2, 8, 19, 34, 256])
def test_colorize_gives_each_pixel_its_palette_colour(classes):
    rng = np.random.default_rng(classes)
    palette = rng.integers(0, 256, (classes, 3), dtype=np.uint8)
    labels = rng.integers(0, classes, (37, 53), dtype=np.uint8)
    assert np.array_equal(colorize(labels, palette), palette[labels])
