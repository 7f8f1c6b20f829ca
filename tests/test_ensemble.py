"""The ensemble's fusion, without a model: what it computes, how much memory it takes, how weights are fitted."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from segmentation import ensemble as E


def smooth_probabilities(seed: int, classes: int, size: tuple[int, int]) -> np.ndarray:
    """(C, h, w) float32 class probabilities with regions and borders, like a model's."""
    rng = np.random.default_rng(seed)
    coarse = torch.from_numpy(rng.random((1, classes, size[0] // 8, size[1] // 8), dtype=np.float32))
    x = F.interpolate(coarse, size=size, mode="bilinear", align_corners=False)[0].numpy() ** 6
    return (x / x.sum(axis=0, keepdims=True)).astype(np.float32)


def reference_fuse(probabilities, weights, size) -> np.ndarray:
    """The definition, written with full-size stacks in PyTorch: resize each member's probabilities like
    F.interpolate(align_corners=False), weight, sum, arg-max."""
    total = sum(
        w * F.interpolate(torch.from_numpy(p)[None], size=size, mode="bilinear", align_corners=False)[0]
        for p, w in zip(probabilities, weights)
    )
    return total.argmax(dim=0).to(torch.uint8).numpy()


@pytest.mark.parametrize("weights", [(0.5, 0.5), (0.8, 0.2), (0.3, 0.7)])
def test_fuse_is_the_weighted_mean_of_the_resized_probabilities(weights):
    members = [smooth_probabilities(1, 8, (256, 256)), smooth_probabilities(2, 8, (384, 384))]
    size = (1024, 2048)
    fused = E.fuse(members, weights, size)
    reference = reference_fuse(members, weights, size)
    assert fused.shape == size and fused.dtype == np.uint8
    assert (fused == reference).mean() >= 0.99999  # float rounding may flip an exact tie, nothing more


def test_a_member_alone_gives_its_own_labels():
    a, b = smooth_probabilities(3, 8, (64, 64)), smooth_probabilities(4, 8, (96, 96))
    own = reference_fuse([a], [1.0], (200, 300))
    assert (E.fuse([a, b], [1.0, 0.0], (200, 300)) == own).mean() >= 0.99999


def test_fuse_keeps_no_full_size_stack_of_scores():
    members = [smooth_probabilities(5, 8, (256, 256)), smooth_probabilities(6, 8, (384, 384))]
    size = (1024, 2048)
    stack = 8 * size[0] * size[1] * 4  # one member's probabilities at the photo's size
    tracemalloc.start()
    E.fuse(members, (0.5, 0.5), size)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 0.6 * stack, f"fusing took {peak / 2**20:.1f} MiB at its peak"


def test_weights_are_checked_and_scaled():
    assert E.parse_weights("dilatednet=1, mask2former=3") == {"dilatednet": 0.25, "mask2former": 0.75}
    for bad in ("dilatednet=1", "dilatednet=-1,mask2former=2", "dilatednet=0,mask2former=0", "unet=1,x=2", "junk"):
        with pytest.raises(ValueError, match="SEG_ENSEMBLE_WEIGHTS"):
            E.parse_weights(bad)


def test_fitting_prefers_the_member_that_is_right():
    truth = np.tile(np.repeat(np.arange(1, 5, dtype=np.uint8), 16), (32, 1))  # four vertical bands of classes
    onehot = np.eye(8, dtype=np.float32)[truth].transpose(2, 0, 1)
    right = onehot * 0.5 + 0.5 / 8  # right, unsure
    wrong = np.roll(onehot * 0.9 + 0.1 / 8, 1, axis=0)  # sure, and always one class off
    probs = {"dilatednet": [wrong], "mask2former": [right]}
    weights, grid = E.fit(probs, [truth])
    assert weights == {"dilatednet": 0.3, "mask2former": 0.7}  # the most even blend that is still right
    assert grid[0.0] == grid[0.3] == 1.0 and grid[0.4] < 1.0 and grid[1.0] == 0.0
