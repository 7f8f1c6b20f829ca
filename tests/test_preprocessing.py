import numpy as np
import pytest

from segmentation.preprocessing import IMAGENET_MEAN, IMAGENET_STD, Normalization, resize_labels, to_batch


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
