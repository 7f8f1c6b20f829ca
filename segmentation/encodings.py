"""Masks as data: COCO RLE, polygons, a class-id PNG, and Label Studio's brush RLE. Pure numpy/OpenCV.

Each encoder takes an (H, W) class-id mask and gives what the tools these masks feed read back:
``pycocotools.mask.decode``, a polygon rasteriser, any PNG reader, Label Studio's ``decode_rle``.
"""

from __future__ import annotations

import base64

import cv2
import numpy as np
from pycocotools import mask as coco_mask

from .render import encode

ENCODINGS = ("rle", "polygons", "png")


def class_regions(labels: np.ndarray, legend: list[dict]) -> list[dict]:
    """One entry per class present: id, name, colour, pixel count and bounding box ``[x, y, width, height]``."""
    counts = np.bincount(labels.reshape(-1), minlength=len(legend))
    regions = []
    for entry in legend:
        if not counts[entry["id"]]:
            continue
        rows = np.flatnonzero(np.any(labels == entry["id"], axis=1))
        cols = np.flatnonzero(np.any(labels == entry["id"], axis=0))
        bbox = [int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)]
        regions.append({**entry, "pixels": int(counts[entry["id"]]), "bbox": bbox})
    return regions


def coco_rle(binary: np.ndarray) -> dict:
    """An (H, W) bool mask as COCO's compressed RLE, ``{"size": [H, W], "counts": str}``, made by pycocotools."""
    rle = coco_mask.encode(np.asfortranarray(binary, dtype=np.uint8))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def polygons(binary: np.ndarray, tolerance: float = 0.0) -> list[dict]:
    """An (H, W) bool mask as polygons: ``[{"outer": [[x, y], ...], "holes": [[[x, y], ...], ...]}, ...]``.

    Vertices are the centres of the mask's border pixels (OpenCV's contours; holes traced on the pixels around
    them); ``tolerance`` > 0 simplifies each ring by Douglas-Peucker within that many pixels. ``rasterise``
    turns them back into a mask."""
    contours, hierarchy = cv2.findContours(binary.astype(np.uint8), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    if hierarchy is None:
        return []
    rings = [
        (cv2.approxPolyDP(c, tolerance, True) if tolerance > 0 else c).reshape(-1, 2).tolist() for c in contours
    ]
    shapes: dict[int, dict] = {}
    for i, (_next, _prev, _child, parent) in enumerate(hierarchy[0]):
        if parent < 0:
            shapes[i] = {"outer": rings[i], "holes": []}
    for i, (_next, _prev, _child, parent) in enumerate(hierarchy[0]):
        if parent >= 0:
            shapes[parent]["holes"].append(rings[i])
    return list(shapes.values())


def rasterise(shapes: list[dict], size: tuple[int, int]) -> np.ndarray:
    """``polygons``' output back to an (H, W) bool mask: each outer ring filled, its holes' insides cleared (a
    hole's ring is the mask's own border, so it stays), shape by shape, since islands may sit inside holes."""
    out = np.zeros(size, dtype=bool)
    for shape in shapes:
        outer = np.asarray(shape["outer"], dtype=np.int32)
        x0, y0 = outer.min(axis=0)
        x1, y1 = outer.max(axis=0)
        local = np.zeros((y1 - y0 + 1, x1 - x0 + 1), dtype=np.uint8)
        cv2.fillPoly(local, [outer], 1, offset=(-int(x0), -int(y0)))
        for hole in shape["holes"]:
            ring = np.asarray(hole, dtype=np.int32)
            inside = np.zeros_like(local)
            cv2.fillPoly(inside, [ring], 1, offset=(-int(x0), -int(y0)))
            cv2.polylines(inside, [ring - (x0, y0)], True, 0)
            local[inside > 0] = 0
        out[y0 : y1 + 1, x0 : x1 + 1] |= local > 0
    return out


def png_base64(labels: np.ndarray) -> str:
    """The whole class-id mask as a single-channel PNG, base64."""
    return base64.b64encode(encode(labels, "png")).decode("ascii")


def mask_json(labels: np.ndarray, legend: list[dict], encoding: str, tolerance: float = 0.0) -> dict:
    """The ``classes`` (each with its mask for ``rle`` and ``polygons``) and, for ``png``, the whole mask."""
    if encoding not in ENCODINGS:
        raise ValueError(f"unknown encoding {encoding!r}; use one of {', '.join(ENCODINGS)}")
    regions = class_regions(labels, legend)
    if encoding == "png":
        return {"classes": regions, "mask_png": png_base64(labels)}
    for region in regions:
        binary = labels == region["id"]
        region[encoding] = coco_rle(binary) if encoding == "rle" else polygons(binary, tolerance)
    return {"classes": regions}


# --- Label Studio's brush RLE -----------------------------------------------------------------------------
# Label Studio stores a brush mask as RGBA bytes run-length coded into a bit stream (thi-ng's rle-pack): a
# 32-bit value count, a 5-bit word size - 1, four 4-bit run-length widths - 1, then per run a flag bit, a 2-bit
# width index, the length - 1 and the 8-bit value. This writes the exact bytes label_studio_sdk's mask2rle
# writes, without its Python loop over runs (or its dependencies, which pin numpy and OpenCV below ours).

_LS_WIDTHS = (3, 4, 8, 16)
_LS_LONGEST = 2**16


def _bits(values: np.ndarray, widths: np.ndarray) -> np.ndarray:
    """Each value's lowest ``width`` bits, most significant first, concatenated: a uint8 array of 0/1."""
    top = int(widths.max(initial=1))
    shifts = np.arange(top - 1, -1, -1, dtype=np.uint64)
    grid = (values.astype(np.uint64)[:, None] >> shifts) & np.uint64(1)
    keep = np.arange(top)[None, :] >= (top - widths)[:, None]
    return grid[keep].astype(np.uint8)


def label_studio_rle(mask: np.ndarray) -> list[int]:
    """An (H, W) uint8 mask (0 or 255 for a brush) as Label Studio's ``rle`` list of byte values."""
    flat = np.repeat(np.ascontiguousarray(mask, dtype=np.uint8).reshape(-1), 4)  # R, G, B, A per pixel
    ends = np.append(np.flatnonzero(flat[1:] != flat[:-1]), flat.size - 1)
    lengths = np.diff(np.append(-1, ends))
    values = flat[ends].astype(np.int64)
    # runs longer than 2^16 are written as full 2^16 chunks first, then the rest
    chunks = np.where(lengths > _LS_LONGEST, -(-lengths // _LS_LONGEST), 1)
    run_of = np.repeat(np.arange(lengths.size), chunks)
    first = np.r_[0, np.cumsum(chunks)[:-1]]
    position = np.arange(run_of.size) - first[run_of]
    last = position == chunks[run_of] - 1
    token_len = np.where(last, lengths[run_of] - position * _LS_LONGEST, _LS_LONGEST)
    run_len = lengths[run_of]
    index = np.select([run_len > 256, run_len <= 8, run_len <= 16], [3, 0, 1], default=2)  # by the whole run
    width = np.asarray(_LS_WIDTHS)[index]
    flag = (run_len > 1).astype(np.int64)
    value = values[run_of]
    code = (((flag << 2 | index) << width | (token_len - 1)) << 8) | value
    header = _bits(np.array([flat.size, 7, *(w - 1 for w in _LS_WIDTHS)]), np.array([32, 5, 4, 4, 4, 4]))
    stream = np.concatenate([header, _bits(code, 1 + 2 + width + 8)])
    stream = np.concatenate([stream, np.zeros(8 - stream.size % 8, dtype=np.uint8)])  # as mask2rle pads
    return np.packbits(stream).tolist()
