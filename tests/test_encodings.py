"""Masks as data, without a model: what pycocotools, a polygon rasteriser and Label Studio's decoder read back."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image
from label_studio_sdk.converter import brush as label_studio_brush
from pycocotools import mask as coco_mask

from segmentation.classes import label_ids_to_superclasses, multiclass_table
from segmentation.encodings import class_regions, label_studio_rle, mask_json, polygons, rasterise

LEGEND = [c.as_dict() for c in multiclass_table()]


def truth_masks(cityscapes, count=3):
    """Real Cityscapes ground truth as superclasses: thin poles, holes, islands in holes, the image border."""
    paths = sorted(cityscapes.glob("masks/*.png"))[:count]
    return [label_ids_to_superclasses(np.asarray(Image.open(p))) for p in paths]


def random_blobs(seed: int, shape=(96, 128)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 8, (shape[0] // 8, shape[1] // 8), dtype=np.uint8)
    labels = np.kron(coarse, np.ones((8, 8), np.uint8))
    noise = rng.random(shape) < 0.05
    labels[noise] = rng.integers(0, 8, int(noise.sum()), dtype=np.uint8)
    return labels


def coco_decoded(rle: dict) -> np.ndarray:
    return coco_mask.decode({"size": rle["size"], "counts": rle["counts"].encode("ascii")}).astype(bool)


def test_coco_rle_decodes_to_the_mask_bit_for_bit(cityscapes):
    for labels in truth_masks(cityscapes) + [random_blobs(s) for s in range(3)]:
        answer = mask_json(labels, LEGEND, "rle")
        assert {c["id"] for c in answer["classes"]} == set(np.unique(labels).tolist())
        for c in answer["classes"]:
            binary = labels == c["id"]
            assert c["rle"]["size"] == list(labels.shape)
            assert np.array_equal(coco_decoded(c["rle"]), binary)
            assert c["pixels"] == binary.sum() == coco_mask.area({**c["rle"], "counts": c["rle"]["counts"].encode()})
            assert c["bbox"] == coco_mask.toBbox({**c["rle"], "counts": c["rle"]["counts"].encode()}).tolist()


def test_polygons_at_tolerance_zero_give_the_mask_back(cityscapes):
    for labels in truth_masks(cityscapes) + [random_blobs(s) for s in range(3)]:
        for c in mask_json(labels, LEGEND, "polygons")["classes"]:
            binary = labels == c["id"]
            back = rasterise(c["polygons"], labels.shape)
            # the issue asks for >= 99 % of the pixels; on these masks the rings give every pixel back
            assert np.array_equal(back, binary), (c["name"], int((back != binary).sum()))


def test_a_hole_with_an_island_comes_back():
    ring = np.zeros((40, 40), bool)
    ring[5:35, 5:35] = True
    ring[12:28, 12:28] = False  # a hole
    ring[17:23, 17:23] = True  # an island inside it
    shapes = polygons(ring)
    assert sorted(len(s["holes"]) for s in shapes) == [0, 1]
    assert np.array_equal(rasterise(shapes, ring.shape), ring)


def test_tolerance_simplifies_within_its_pixels(cityscapes):
    labels = truth_masks(cityscapes, 1)[0]
    binary = labels == 2  # construction: long ragged borders
    exact, rough = polygons(binary), polygons(binary, tolerance=2.0)
    vertices = lambda shapes: sum(len(s["outer"]) + sum(map(len, s["holes"])) for s in shapes)  # noqa: E731
    assert vertices(rough) < vertices(exact) / 2
    back = rasterise(rough, labels.shape)
    assert (back & binary).sum() / (back | binary).sum() > 0.97


def test_png_encoding_is_the_class_id_mask():
    labels = random_blobs(7)
    answer = mask_json(labels, LEGEND, "png")
    decoded = np.asarray(Image.open(io.BytesIO(base64.b64decode(answer["mask_png"]))))
    assert np.array_equal(decoded, labels)
    assert all("rle" not in c and "polygons" not in c for c in answer["classes"])


def test_class_regions_count_and_box_each_class():
    labels = np.zeros((10, 20), np.uint8)
    labels[2:5, 3:9] = 6
    regions = {r["name"]: r for r in class_regions(labels, LEGEND)}
    assert set(regions) == {"void", "human"}
    assert regions["human"]["pixels"] == 18 and regions["human"]["bbox"] == [3, 2, 6, 3]
    assert regions["void"]["bbox"] == [0, 0, 20, 10]


def test_an_unknown_encoding_is_refused():
    with pytest.raises(ValueError, match="rle, polygons, png"):
        mask_json(np.zeros((4, 4), np.uint8), LEGEND, "svg")


# --- Label Studio's brush RLE --------------------------------------------------------------------------------

def brush_decoded(rle: list[int], shape) -> np.ndarray:
    return label_studio_brush.decode_rle(rle).reshape(*shape, 4)[:, :, 3]


@pytest.mark.parametrize(
    "mask",
    [
        np.zeros((3, 5), np.uint8),
        np.full((3, 5), 255, np.uint8),
        (np.random.default_rng(0).random((37, 53)) < 0.5).astype(np.uint8) * 255,
        np.pad(np.full((300, 300), 255, np.uint8), 2),  # runs over 2^16 values, split in chunks
        np.full((128, 128), 255, np.uint8),  # exactly 2^16 values in one run
        np.pad(np.full((1, 16384), 255, np.uint8), ((0, 0), (0, 1))),  # 2^16 + 4: a remainder of one chunk
    ],
    ids=["empty", "full", "noise", "long-runs", "one-chunk", "chunk-remainder"],
)
def test_brush_rle_is_label_studios_own(mask):
    ours = label_studio_rle(mask)
    assert ours == label_studio_brush.mask2rle(mask)  # the same bytes Label Studio's encoder writes
    assert np.array_equal(brush_decoded(ours, mask.shape), mask)


def test_brush_rle_of_real_masks_decodes_exactly(cityscapes):
    labels = truth_masks(cityscapes, 1)[0]
    for class_id in np.unique(labels):
        brush = (labels == class_id).astype(np.uint8) * 255
        ours = label_studio_rle(brush)
        assert np.array_equal(brush_decoded(ours, labels.shape), brush)
        assert ours == label_studio_brush.mask2rle(brush)
