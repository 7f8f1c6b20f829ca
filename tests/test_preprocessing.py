import numpy as np
import pytest
from PIL import Image

from segmentation import preprocessing
from segmentation.preprocessing import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Normalization,
    band_splits,
    resize_labels,
    resize_rgb,
    to_batch,
)


def test_to_batch_resizes_scales_and_normalises_channels_last():
    a = np.full((10, 20, 3), 255, np.uint8)
    b = np.zeros((30, 15, 3), np.uint8)
    batch = to_batch([a, b], (8, 8))
    assert batch.shape == (2, 8, 8, 3) and batch.dtype == np.float32
    assert np.allclose(batch[0], 1.0) and np.allclose(batch[1], 0.0)
    norm = to_batch([a], (8, 8), Normalization(IMAGENET_MEAN, IMAGENET_STD))
    assert np.allclose(norm[0, 0, 0], (1 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD), atol=1e-5)


def test_each_image_is_preprocessed_alone():
    rng = np.random.default_rng(1)
    imgs = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in [(40, 60), (17, 90), (64, 64)]]
    together = to_batch(imgs, (32, 32))
    for i, img in enumerate(imgs):
        assert np.array_equal(together[i], to_batch([img], (32, 32))[0])


def test_to_batch_refuses_non_rgb():
    with pytest.raises(ValueError, match="image 0"):
        to_batch([np.zeros((4, 4), np.uint8)], (2, 2))


def test_resize_labels_is_nearest_so_ids_never_blend():
    labels = np.array([[0, 7], [3, 5]], np.uint8)
    big = resize_labels(labels, (100, 50))
    assert big.shape == (100, 50)
    assert set(np.unique(big)) == {0, 3, 5, 7}
    assert big[0, 0] == 0 and big[-1, -1] == 5 and big[0, -1] == 7


def _pillow_bilinear(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    return np.asarray(Image.fromarray(image).resize(size[::-1], Image.BILINEAR))


@pytest.mark.parametrize(
    "in_hw, out_hw",
    [
        ((1024, 2048), (256, 256)),
        ((1080, 1920), (256, 256)),
        ((999, 1003), (256, 300)),
        ((1200, 900), (512, 512)),
        ((1024, 1024), (384, 384)),
        ((1080, 1000), (255, 256)),
    ],
)
def test_banded_resize_gives_the_pixels_of_one_pillow_resize(in_hw, out_hw, monkeypatch):
    monkeypatch.setattr(preprocessing, "_band_count", lambda: 2)  # bands even on a one-CPU runner
    image = np.random.default_rng(sum(in_hw + out_hw)).integers(0, 256, (*in_hw, 3), dtype=np.uint8)
    assert np.array_equal(resize_rgb(image, out_hw), _pillow_bilinear(image, out_hw))


def test_no_bands_where_pillow_would_order_the_passes_differently():
    assert band_splits(1200, 512, 2) == ((256, 600.0),)  # exact weights, but the bands' pass order differs
    assert preprocessing.bands_for((1200, 900), (512, 512), 2) is None
    assert preprocessing.bands_for((1024, 2048), (256, 256), 2) == ((128, 512.0),)


def test_bands_only_where_the_filter_weights_stay_exact():
    assert band_splits(1024, 256, 2) == ((128, 512.0),)  # a 2048x1024 photo to the models' 256 rows
    assert band_splits(999, 256, 2) == ((128, 499.5),)
    assert band_splits(1080, 255, 2) is None  # 1080 / 255 is not a binary fraction
    assert band_splits(1024, 384, 2) is None
    # why the refusal matters: cut there anyway, Pillow's recomputed centres round differently and pixels change
    image = np.random.default_rng(0).integers(0, 256, (1080, 800, 3), dtype=np.uint8)
    picture, edge = Image.fromarray(image), 127 * 1080 / 255
    cut = np.concatenate(
        [
            np.asarray(picture.resize((200, 127), Image.BILINEAR, box=(0, 0, 800, edge))),
            np.asarray(picture.resize((200, 128), Image.BILINEAR, box=(0, edge, 800, 1080))),
        ]
    )
    assert not np.array_equal(cut, _pillow_bilinear(image, (255, 200)))


# --- arg-max of an upsampled score map (Mask2Former's last post-processing step) --------------------------------


def _torch_upsampled_argmax(scores: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """What upsampled_argmax replaces: PyTorch's channels-last resize, then the arg-max."""
    import torch
    from torch.nn import functional as F

    t = torch.from_numpy(scores)[None].contiguous(memory_format=torch.channels_last)
    return F.interpolate(t, size=size, mode="bilinear", align_corners=False)[0].argmax(dim=0).to(torch.uint8).numpy()


def _regions(classes: int = 8, side: int = 384, blobs: int = 12, seed: int = 0) -> np.ndarray:
    """(C, side, side) float32 class scores in smooth regions, like a segmentation model's."""
    import torch
    from torch.nn import functional as F

    coarse = torch.from_numpy(np.random.default_rng(seed).random((1, classes, blobs, blobs), dtype=np.float32))
    return F.interpolate(coarse, size=(side, side), mode="bicubic", align_corners=False)[0].numpy()


@pytest.mark.parametrize("size", [(1024, 2048), (1080, 1920), (2048, 1024), (600, 251), (384, 384), (97, 131), (1, 1)])
def test_upsampled_argmax_gives_pytorchs_labels(size):
    from segmentation.preprocessing import upsampled_argmax

    for seed in range(2):
        scores = _regions(seed=seed)
        ours = upsampled_argmax(scores, size)
        assert ours is not None and ours.shape == size and ours.dtype == np.uint8
        assert np.array_equal(ours, _torch_upsampled_argmax(scores, size))


@pytest.mark.parametrize("bands", [1, 3, 4])
def test_upsampled_argmax_gives_the_same_labels_in_any_number_of_row_bands(bands, monkeypatch):
    from segmentation import preprocessing

    scores, size = _regions(), (1080, 1920)
    monkeypatch.setattr(preprocessing, "_band_count", lambda: bands)
    assert np.array_equal(preprocessing.upsampled_argmax(scores, size), _torch_upsampled_argmax(scores, size))


def test_upsampled_argmax_breaks_ties_like_an_argmax():
    from segmentation.preprocessing import upsampled_argmax

    scores = _regions()
    scores[5, 100:140] = scores[2, 100:140] = scores[:, 100:140].max(axis=0) + 1  # classes 2 and 5 tie in a stripe
    ours = upsampled_argmax(scores, (1024, 2048))
    assert ours is not None
    assert set(np.unique(ours[300:360])) == {2}  # rows well inside the stripe: the first of the tied classes
    assert np.array_equal(ours, _torch_upsampled_argmax(scores, (1024, 2048)))


@pytest.mark.parametrize("size", [(1024, 2048), (600, 251), (384, 384), (1, 1)])
def test_summarised_scores_finish_to_the_same_labels_in_a_fraction_of_the_bytes(size):
    """What a model process sends back (compact_scores) gives the labels the whole scores give."""
    from segmentation.preprocessing import compact_scores, labels_at

    for seed in range(3):
        scores = _regions(seed=seed)
        scores[5, 100:140] = scores[2, 100:140] = scores[:, 100:140].max(axis=0) + 1  # a tie, decided by order
        summary = compact_scores(scores)
        assert isinstance(summary, dict)
        sent = sum(v.nbytes for v in summary.values())
        assert sent < scores.nbytes / 2
        assert np.array_equal(labels_at(summary, size), _torch_upsampled_argmax(scores, size))


def _blended_by_numpy(summary: dict, size: tuple[int, int]) -> np.ndarray:
    """labels_at's blend as numpy expressions over every pixel of an unsure cell: what the compiled loop replaces."""
    top, sure, points, values = summary["top"], summary["sure"], summary["points"], summary["values"]
    row = np.zeros(top.size, np.int32)
    row[points] = np.arange(len(points), dtype=np.int32)
    (r0, r1, rw0, rw1), (c0, c1, cw0, cw1) = (preprocessing._bilinear_taps(n, m) for n, m in zip(top.shape, size))
    out = top[np.ix_(r0, c0)]
    ys, xs = np.nonzero(~sure[np.ix_(r0, c0)])
    above, below, left, right = r0[ys] * top.shape[1], r1[ys] * top.shape[1], c0[xs], c1[xs]
    blend = values[row[above + left]] * (rw0[ys] * cw0[xs])[:, None]
    blend += values[row[above + right]] * (rw0[ys] * cw1[xs])[:, None]
    blend += values[row[below + left]] * (rw1[ys] * cw0[xs])[:, None]
    blend += values[row[below + right]] * (rw1[ys] * cw1[xs])[:, None]
    out[ys, xs] = blend.argmax(axis=1)
    return out


@pytest.mark.parametrize("classes", [2, 8, 19])
def test_the_compiled_blend_rounds_as_numpy_does(classes):
    """Near-ties decided by float32 rounding come out as numpy's: no fused multiply-add, the same order."""
    from segmentation.preprocessing import compact_scores, labels_at

    rng, checked = np.random.default_rng(classes), 0
    for trial in range(16):
        scores = _regions(classes, side=64, blobs=3, seed=trial)
        if trial % 2:
            scores = np.round(scores * 256) / 256  # exact ties between classes, and blends that round onto them
        summary = compact_scores(scores)
        if isinstance(summary, dict):
            size = (int(rng.integers(40, 400)), int(rng.integers(40, 400)))
            assert np.array_equal(labels_at(summary, size), _blended_by_numpy(summary, size))
            checked += 1
    assert checked >= 12


def _sure_by_numpy(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """compact_scores' top classes and sure cells as numpy passes over whole planes: what the compiled loops
    replace."""
    top, best, second = np.zeros(scores.shape[1:], np.uint8), scores[0].copy(), np.full_like(scores[0], -np.inf)
    for k in range(1, len(scores)):
        np.maximum(second, np.minimum(best, scores[k]), out=second)
        top[scores[k] > best] = k
        np.maximum(best, scores[k], out=best)
    tp, lp = np.pad(top, ((0, 1), (0, 1)), mode="edge"), np.pad(best - second, ((0, 1), (0, 1)), mode="edge")
    agree = (tp[:-1, :-1] == tp[1:, :-1]) & (tp[:-1, :-1] == tp[:-1, 1:]) & (tp[:-1, :-1] == tp[1:, 1:])
    least_lead = np.minimum(np.minimum(lp[:-1, :-1], lp[1:, :-1]), np.minimum(lp[:-1, 1:], lp[1:, 1:]))
    peak = float(max(scores.max(), -scores.min()))
    return top, agree & (least_lead > 1e-5 * max(1.0, peak))


@pytest.mark.parametrize("classes", [1, 2, 8, 19])
def test_the_compiled_top_classes_and_sure_cells_are_numpys(classes):
    """Ties go to the first class, and a lead within float32 rounding of the bar counts as numpy counts it."""
    for trial in range(6):
        scores = _regions(classes, side=int(40 + 37 * trial), blobs=4, seed=trial)
        if trial % 2:
            scores = np.round(scores * 64) / 64  # exact ties between classes, and leads of exactly zero
        expected_top, expected_sure = _sure_by_numpy(scores)
        cells = preprocessing._sure_cells(scores)
        if cells is None:  # too many unsure cells for upsampled_argmax to pay
            assert 1 - expected_sure.mean() > preprocessing.UNSURE_CELLS_MAX
            continue
        assert np.array_equal(cells[0], expected_top) and np.array_equal(cells[1], expected_sure)
    scores = np.zeros((2, 8, 40), np.float32)
    scores[0, :, :30] = 1.0  # the peak: the bar is 1e-5
    scores[1, :, 30:35] = np.float32(1e-5)  # a lead right at the bar: not sure
    scores[1, :, 35:] = np.nextafter(np.float32(1e-5), np.float32(1))  # one float32 step above it: sure
    top, sure = preprocessing._sure_cells(scores)
    assert np.array_equal(sure, _sure_by_numpy(scores)[1])
    assert sure[:, :29].all() and not sure[:, 29:35].any() and sure[:, 35:].all()


def test_scores_upsampled_argmax_declines_travel_whole():
    from segmentation.preprocessing import compact_scores, labels_at

    noise = np.random.default_rng(0).random((8, 64, 64), dtype=np.float32)
    assert compact_scores(noise) is noise  # borders everywhere: the gateway resizes the scores whole
    assert labels_at(compact_scores(noise), (128, 128)).shape == (128, 128)


def test_upsampled_argmax_declines_where_borders_are_everywhere_or_scores_are_not_numbers():
    from segmentation.preprocessing import upsampled_argmax

    noise = np.random.default_rng(0).random((8, 384, 384), dtype=np.float32)
    assert upsampled_argmax(noise, (1024, 2048)) is None  # the caller resizes the scores whole
    broken = _regions()
    for bad in (np.nan, np.inf):
        broken[3, 10, 10] = bad
        assert upsampled_argmax(broken, (1024, 2048)) is None


def test_upsampled_argmax_refuses_scores_its_ids_cannot_hold():
    from segmentation.preprocessing import upsampled_argmax

    with pytest.raises(ValueError, match="255 classes"):
        upsampled_argmax(np.zeros((256, 4, 4), np.float32), (8, 8))
    with pytest.raises(ValueError, match=r"\(C, h, w\)"):
        upsampled_argmax(np.zeros((4, 4), np.float32), (8, 8))


@pytest.mark.parametrize("resample", ["bicubic", "box", "nearest"])
def test_any_recorded_filter_gives_pillows_pixels_banded_or_whole(resample, monkeypatch):
    monkeypatch.setattr(preprocessing, "_band_count", lambda: 2)
    image = np.random.default_rng(5).integers(0, 256, (1024, 2048, 3), dtype=np.uint8)
    pillow = np.asarray(Image.fromarray(image).resize((256, 256), preprocessing.RESIZE_FILTERS[resample]))
    assert np.array_equal(resize_rgb(image, (256, 256), resample), pillow)


def test_pipeline_is_data_with_checked_values():
    from segmentation.preprocessing import Pipeline

    p = Pipeline.from_dict({"resize": "box"}, Pipeline("bicubic", "scores-bilinear"))
    assert p == Pipeline("box", "scores-bilinear") and Pipeline.from_dict(p.as_dict()) == p
    with pytest.raises(ValueError, match="not one of nearest, bilinear, bicubic"):
        Pipeline(resize="cubic")
    with pytest.raises(ValueError, match="scores-bilinear, labels-nearest"):
        Pipeline(upsample="bicubic")


@pytest.mark.parametrize("size", [(1024, 2048), (300, 700), (256, 256)])
def test_labels_at_resizes_scores_bilinearly_before_the_argmax(size):
    """The reference's `tf.image.resize(probs, (H, W), "bilinear")` then arg-max: half-pixel centres, as PyTorch's."""
    from segmentation.preprocessing import labels_at

    scores = _regions(side=256)
    ours = labels_at(scores, size)
    assert ours.shape == size and ours.dtype == np.uint8
    assert np.array_equal(ours, _torch_upsampled_argmax(scores, size))
    noisy = np.random.default_rng(0).random((8, 64, 64), dtype=np.float32)  # borders everywhere: the whole-stack path
    agree = np.mean(labels_at(noisy, size) == _torch_upsampled_argmax(noisy, size))
    assert agree > 0.9999, agree


@pytest.mark.parametrize("classes", [1, 2, 8, 19, 34])
def test_scores_resized_whole_take_the_arg_max_plane_by_plane(classes):
    """Where upsampled_argmax declines, each class plane is resized with OpenCV and the labels are the arg-max over
    the planes, the first class winning equal scores (coarse scores make many exact ties); scores with a NaN take
    numpy's arg-max of the resized stack."""
    import cv2

    from segmentation.preprocessing import _resized_argmax

    def resized(scores, size):
        return [cv2.resize(np.ascontiguousarray(p), size[::-1], interpolation=cv2.INTER_LINEAR) for p in scores]

    rng = np.random.default_rng(classes)
    coarse = rng.integers(0, 4, (classes, 48, 40)).astype(np.float32)  # ties everywhere: borders everywhere
    for scores in (coarse, rng.random((classes, 48, 40), dtype=np.float32)):
        for size in [(96, 80), (100, 333), (48, 40)]:
            expected = np.stack(resized(scores, size), axis=-1).argmax(axis=-1).astype(np.uint8)
            assert np.array_equal(_resized_argmax(scores, size), expected)
    wide = coarse.astype(np.float64)  # a model answering in float64 gets float32's labels
    assert np.array_equal(_resized_argmax(wide, (96, 80)), _resized_argmax(coarse, (96, 80)))
    broken = coarse.copy()
    broken[-1, 5, 5] = np.nan
    stack = cv2.resize(np.ascontiguousarray(broken.transpose(1, 2, 0)), (80, 96), interpolation=cv2.INTER_LINEAR)
    assert np.array_equal(_resized_argmax(broken, (96, 80)), stack.reshape(96, 80, -1).argmax(axis=-1))


def test_labels_at_resizes_labels_with_nearest_neighbour():
    from segmentation.preprocessing import labels_at

    labels = np.random.default_rng(0).integers(0, 8, (32, 32)).astype(np.uint8)
    assert np.array_equal(labels_at(labels, (96, 64)), resize_labels(labels, (96, 64)))
    with pytest.raises(ValueError, match=r"\(h, w\) labels or \(C, h, w\) scores"):
        labels_at(np.zeros((1, 2, 3, 4), np.float32), (8, 8))
