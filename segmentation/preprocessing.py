"""Framework-free pre- and post-processing shared by the predictors.

Pre- and post-processing are data (:class:`Normalization`, :class:`Pipeline`), so they travel in each stored
model's metadata and a loaded model is fed, and its answer brought back to the photo's size, exactly as in the
pipeline it was trained and used with.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from fractions import Fraction
from functools import cache, lru_cache

import numpy as np
from PIL import Image

from . import kernels

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


# Pillow's filters by name. Pillow's `resize` without a filter uses BICUBIC for RGB images.
RESIZE_FILTERS = {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "box": Image.BOX,
                  "lanczos": Image.LANCZOS}
UPSAMPLING = ("scores-bilinear", "labels-nearest")


@dataclass(frozen=True)
class Pipeline:
    """How an image reaches the model's fixed input size and how its answer comes back to the photo's size.

    - ``resize``: the Pillow filter that shrinks (or enlarges) the RGB photo to the input size (antialiased, as
      Pillow's ``Image.resize`` does it);
    - ``upsample``: ``scores-bilinear`` resizes the class scores bilinearly to the photo's size, then takes the
      arg-max (``tf.image.resize(..., "bilinear")`` / ``F.interpolate(..., align_corners=False)``: half-pixel
      centres); ``labels-nearest`` takes the arg-max (or threshold) at the input size and resizes the labels with
      nearest neighbour.
    """

    resize: str = "bilinear"
    upsample: str = "labels-nearest"

    def __post_init__(self) -> None:
        if self.resize not in RESIZE_FILTERS:
            raise ValueError(f"resize filter {self.resize!r} is not one of {', '.join(RESIZE_FILTERS)}")
        if self.upsample not in UPSAMPLING:
            raise ValueError(f"upsampling {self.upsample!r} is not one of {', '.join(UPSAMPLING)}")

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict | None, default: "Pipeline | None" = None) -> "Pipeline":
        return cls(**{**(default or cls()).as_dict(), **(d or {})})


BAND_MIN_PIXELS = 1_000_000  # below this, handing rows to another thread costs more than it saves


def resize_rgb(image: np.ndarray, size: tuple[int, int], resample: str = "bilinear") -> np.ndarray:
    """(H, W, 3) uint8 -> (h, w, 3) uint8 with Pillow's ``resample`` filter (antialiased when shrinking); ``size``
    is (h, w).

    A large image is resized in horizontal bands of output rows, one per CPU, at the same time (Pillow releases
    the GIL). Only for geometries where the bands give the pixels of one call (:func:`bands_for`); otherwise,
    one call."""
    h, w = size
    if image.shape[:2] == (h, w):
        return image
    big = image.shape[0] * image.shape[1] >= BAND_MIN_PIXELS
    splits = bands_for(image.shape[:2], (h, w), _band_count(), resample) if big else None
    return _resize_in_bands(image, (h, w), splits, resample) if splits else _resize_whole(image, (h, w), resample)


def _resize_whole(image: np.ndarray, size: tuple[int, int], resample: str) -> np.ndarray:
    return np.asarray(Image.fromarray(image).resize(size[::-1], RESIZE_FILTERS[resample]))


def _resize_in_bands(image: np.ndarray, size: tuple[int, int], splits: tuple[tuple[int, float], ...],
                     resample: str) -> np.ndarray:
    picture, (h, w), (H, W), f = Image.fromarray(image), size, image.shape[:2], RESIZE_FILTERS[resample]
    bounds = list(zip([(0, 0.0), *splits], [*splits, (h, float(H))]))
    bands = _band_pool().map(
        lambda b: np.asarray(picture.resize((w, b[1][0] - b[0][0]), f, box=(0.0, b[0][1], W, b[1][1]))), bounds)
    return np.concatenate(list(bands))


@lru_cache(maxsize=256)
def bands_for(in_hw: tuple[int, int], out_hw: tuple[int, int], bands: int,
              resample: str = "bilinear") -> tuple[tuple[int, float], ...] | None:
    """The cuts for resizing ``in_hw`` to ``out_hw`` in ``bands`` bands, or None where bands could change a pixel.

    Two conditions, the first by arithmetic, the second by trying it. (1) :func:`band_splits`: every band gets
    the filter weights of the whole resize, bit for bit. (2) Pillow runs the two passes in an order it picks from
    the geometry of each call (seen here: 900x1200 -> 512x512 goes horizontal first, its bands vertical first),
    so once per geometry a random probe image is resized both ways and the bands are used only if every pixel
    agrees (once, then cached)."""
    splits = band_splits(in_hw[0], out_hw[0], bands)
    if not splits:
        return None
    probe = np.random.default_rng(0).integers(0, 256, (*in_hw, 3), dtype=np.uint8)
    banded, whole = _resize_in_bands(probe, out_hw, splits, resample), _resize_whole(probe, out_hw, resample)
    return splits if np.array_equal(banded, whole) else None


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


def to_batch(images: list[np.ndarray], size: tuple[int, int], norm: Normalization = Normalization(),
             resample: str = "bilinear") -> np.ndarray:
    """A list of (H_i, W_i, 3) uint8 -> (N, h, w, 3) float32, resized with ``resample`` and normalised, channels
    last."""
    if not images:
        raise ValueError("a batch needs at least one image")
    for i, img in enumerate(images):
        if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
            raise ValueError(f"image {i} must be (H, W, 3) uint8, got {img.shape} {img.dtype}")
    batch = np.stack([resize_rgb(img, size, resample) for img in images]).astype(np.float32)  # (N, h, w, 3)
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


def labels_at(output: np.ndarray | dict, size: tuple[int, int]) -> np.ndarray:
    """A model's answer for one image at its input size -> (H, W) uint8 class ids at ``size`` = (H, W).

    ``output`` is either class ids, (h, w) uint8, resized with nearest neighbour (``labels-nearest``), or class
    scores resized bilinearly and arg-maxed (``scores-bilinear``): (C, h, w) float32, or their summary
    (:func:`compact_scores`). Scores go through :func:`upsampled_argmax` where it can, else the whole score stack
    through OpenCV's bilinear resize (half-pixel centres, as TensorFlow's and PyTorch's)."""
    if isinstance(output, dict):
        return labels_from_summary(output, size)
    if output.ndim == 2:
        return resize_labels(output, size)
    if output.ndim != 3:
        raise ValueError(f"a model output must be (h, w) labels or (C, h, w) scores, got shape {output.shape}")
    if output.shape[1:] == tuple(size):
        return output.argmax(axis=0).astype(np.uint8)
    labels = upsampled_argmax(output, size)
    return _resized_argmax(output, size) if labels is None else labels


def _resized_argmax(scores: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(C, h, w) scores resized with OpenCV's bilinear filter one class plane at a time, then arg-maxed by
    :func:`running_argmax` (numpy's arg-max across a short last axis is slow). Scores that are not all finite take
    ``argmax`` of the whole resized stack instead, for its rule on NaN."""
    import cv2

    if not np.isfinite(scores).all():
        whole = cv2.resize(np.ascontiguousarray(scores.transpose(1, 2, 0)), size[::-1], interpolation=cv2.INTER_LINEAR)
        return whole.reshape(*size, -1).argmax(axis=-1).astype(np.uint8)  # (H, W[, C]): one class leaves no axis
    plane = np.empty(size, np.float32)

    def planes():
        for scores_of_class in scores:  # OpenCV writes into dst only where its type matches: float32 in
            source = np.ascontiguousarray(scores_of_class, dtype=np.float32)
            yield cv2.resize(source, size[::-1], dst=plane, interpolation=cv2.INTER_LINEAR)

    return running_argmax(planes())


def running_argmax(planes: Iterable[np.ndarray]) -> np.ndarray:
    """Class planes, (H, W) float32 and finite, given one at a time (a plane's buffer may be reused for the next)
    -> (H, W) uint8 ids of the highest, the lower id winning equal scores, as ``argmax`` does. Only the running
    maximum is kept beside the plane at hand."""
    import cv2

    best = labels = None
    for c, plane in enumerate(planes):
        if best is None:
            best, labels = plane.copy(), np.zeros(plane.shape, np.uint8)
            continue
        higher = cv2.compare(plane, best, cv2.CMP_GT)
        cv2.max(best, plane, dst=best)
        np.copyto(labels, np.uint8(c), where=higher.view(bool))
    if labels is None:
        raise ValueError("no class planes to take the arg-max of")
    return labels


# Above this share of unsure cells, upsampled_argmax would be slower than resizing the scores whole.
UNSURE_CELLS_MAX = 0.2


def as_distribution(scores: np.ndarray, axis: int = 0) -> np.ndarray:
    """Class scores -> probabilities summing to 1 along ``axis``: already such (a softmax output) as they are,
    anything else (logits) through a softmax."""
    if scores.min() >= 0 and np.allclose(scores.sum(axis=axis), 1.0, atol=1e-3):
        return scores
    shifted = np.exp(scores - scores.max(axis=axis, keepdims=True))
    return (shifted / shifted.sum(axis=axis, keepdims=True)).astype(np.float32, copy=False)


def upsampled_argmax(scores: np.ndarray, size: tuple[int, int]) -> np.ndarray | None:
    """The class ids of PyTorch's bilinear resize of ``scores`` to ``size`` (``align_corners=False``), arg-maxed
    over classes, without making the full-size scores; None where that would be slower or a score is not finite
    (the caller resizes).

    ``scores`` is (C, h, w) float32, ``size`` is (H, W); the result is (H, W) uint8. Each output pixel blends four
    neighbouring source pixels (a *cell*) with non-negative weights. Where the cell's four pixels share their
    top class, and each leads the runner-up by far more than float32 rounding can move a blend, every blend has
    that top class too, so most pixels take it from the source without arithmetic. The rest (pixels on class
    borders) are blended here, in float32, as PyTorch does them; an exact near-tie there may round either way,
    as it does between PyTorch's own channels-last and planar kernels. The unsure cells are blended one by one in
    a compiled loop (segmentation/kernels.py), their corners' scores read from a small table of only the pixels
    the unsure cells read (timings: benchmarks/mask2former_post.py, benchmarks/results.md)."""
    summary = _summary(scores)
    return None if summary is None else labels_from_summary(summary, size)


def compact_scores(scores: np.ndarray) -> np.ndarray | dict:
    """(C, h, w) float32 class scores -> what :func:`labels_at` needs of them to finish at any size, as a model
    process sends them: each pixel's top class, which cells are sure, and the scores of the corner pixels of the
    unsure cells only (most of a photo's cells are sure, so this is a fraction of the scores' bytes). The scores
    themselves where :func:`upsampled_argmax` declines them. The labels finished from either are the same."""
    summary = _summary(scores)
    return scores if summary is None else summary


def _summary(scores: np.ndarray) -> dict | None:
    cells = _sure_cells(scores)
    if cells is None:
        return None
    top, sure = cells
    corners = ~sure  # each unsure cell needs its pixel and its lower, right and lower-right neighbours
    corners[1:] |= corners[:-1].copy()
    corners[:, 1:] |= corners[:, :-1].copy()
    points = np.flatnonzero(corners).astype(np.int32)
    # pixel-major (P, C): a blend reads all of a pixel's classes from one place rather than from C planes
    values = np.ascontiguousarray(scores.reshape(len(scores), -1)[:, points].T)
    return {"top": top, "sure": sure, "points": points, "values": values}


def warm_up() -> None:
    """Compile the loops of :func:`compact_scores` and :func:`labels_at` now (one to two seconds for the three, once
    per process), so the first photo a server answers does not wait for them."""
    scores = np.zeros((2, 8, 8), np.float32)
    scores[0, :4], scores[1, 4:] = 1.0, 1.0  # one class border: 8 of 64 cells unsure
    labels_from_summary(_summary(scores), (16, 16))


def labels_from_summary(summary: dict, size: tuple[int, int]) -> np.ndarray:
    """:func:`compact_scores`' summary -> (H, W) uint8 class ids at ``size``, as :func:`upsampled_argmax` gives them
    from the scores."""
    top, sure, points, values = summary["top"], summary["sure"], summary["points"], summary["values"]
    if top.shape == tuple(size):
        return top
    row = np.zeros(top.size, np.int32)  # each listed pixel's row of ``values``; no unsure cell reads the others
    row[points] = np.arange(len(points), dtype=np.int32)
    return _upsampled(values, row, top, sure, size)


def _sure_cells(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """(C, h, w) scores -> (top class per pixel, (h, w) bool: the cell from this pixel to its lower-right
    neighbours is sure to keep that class when blended), or None where :func:`upsampled_argmax` declines."""
    if scores.ndim != 3 or not 1 <= len(scores) <= 255:
        raise ValueError(f"scores must be (C, h, w) with 1 to 255 classes (ids are uint8), got shape {scores.shape}")
    peak = float(max(scores.max(), -scores.min()))  # NaN if any score is
    if not np.isfinite(peak):
        return None
    top, lead = _top_class(scores)
    sure = np.empty(top.shape, bool)
    kernels.compiled(kernels.sure_cells)(top, lead, lead.dtype.type(1e-5 * max(1.0, peak)), sure)
    if 1.0 - sure.mean() > UNSURE_CELLS_MAX:
        return None
    return top, sure


def _upsampled(values: np.ndarray, row: np.ndarray, top: np.ndarray, sure: np.ndarray,
               size: tuple[int, int]) -> np.ndarray:
    h, w = top.shape
    r0, r1, rw0, rw1 = _bilinear_taps(h, size[0])
    c0, c1, cw0, cw1 = _bilinear_taps(w, size[1])
    rows_per, cols_per = np.bincount(r0, minlength=h), np.bincount(c0, minlength=w)  # each cell's output block
    first_row, first_col = np.cumsum(rows_per) - rows_per, np.cumsum(cols_per) - cols_per
    blend = kernels.compiled(kernels.blend_unsure_cells)
    # each source pixel's top class repeated over its output block (r0 and c0 never decrease): right where the
    # cell is sure; the rest is blended
    out = np.repeat(np.repeat(top, cols_per, axis=1), rows_per, axis=0)

    def fill(rows: slice) -> None:
        blend(values, row, sure, first_row, rows_per, r1, rw0, rw1, first_col, cols_per, c1, cw0, cw1,
              rows.start, rows.stop, out[rows])

    bands = _row_bands(size[0], _band_count() if size[0] * size[1] >= BAND_MIN_PIXELS else 1)
    if len(bands) == 1:
        fill(bands[0])
    else:  # bands of output rows at once: the compiled blend releases the GIL
        list(_band_pool().map(fill, bands))
    return out


def _row_bands(rows: int, n: int) -> list[slice]:
    edges = np.linspace(0, rows, n + 1).astype(int)
    return [slice(a, b) for a, b in zip(edges[:-1], edges[1:]) if b > a]


def _bilinear_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per output index along one axis: PyTorch's two source indices and their weights for a bilinear resize with
    ``align_corners=False``, in its float32 arithmetic (``aten/src/ATen/native/UpSample.h``)."""
    scale = np.float32(n_in) / np.float32(n_out)
    centre = np.maximum(scale * (np.arange(n_out, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5), np.float32(0))
    first = np.minimum(centre.astype(np.intp), n_in - 1)  # centre >= 0, so truncation is the floor
    w1 = np.clip(centre - first.astype(np.float32), np.float32(0), np.float32(1))
    return first, first + (first < n_in - 1), np.float32(1) - w1, w1


def _top_class(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(C, h, w) finite scores -> per pixel the first class with the highest score (as an arg-max picks) and its
    lead over the next best score."""
    scores = np.ascontiguousarray(scores)
    top, lead = np.empty(scores.shape[1:], np.uint8), np.empty(scores.shape[1:], scores.dtype)
    kernels.compiled(kernels.top_class)(scores, top, lead)
    return top, lead
