"""DilatedNet and Mask2Former fused: their class probabilities, resized to the photo, weighted, then the arg-max.

Both predict the 8 superclasses. Each member gives its probabilities at its own resolution (DilatedNet's softmax
on its input grid; Mask2Former's class scores on transformers' mask grid, normalised per pixel), each is resized
bilinearly to the photo's size as its reference post-processing does, and the weighted sum's arg-max is the
ensemble's label. The sum is built one class at a time, so a photo never holds a full-size stack of scores: at
most a few full-size planes.

The weights come from a small grid fitted at import on generated scenes none of the members trained on, and are
stored, with the held-out scores of the members and the ensemble, in the model store as ``ensemble``.
"""

from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np

from .metrics import excluded_classes, scores, truth_confusion
from .preprocessing import running_argmax
from .registry import MODEL_NAMES

NAME = "ensemble"
MEMBERS = ("dilatednet", "mask2former")
SERVED_NAMES = (*MODEL_NAMES, NAME)  # what a request's ``model`` may name
GRID = tuple(i / 10 for i in range(11))  # DilatedNet's weight; Mask2Former gets the rest
FIT_SEEDS = range(100_000, 100_024)  # the members' held-out scenes (training.HELDOUT_SEEDS): never trained on
TEST_SEEDS = range(300_000, 300_032)  # never used for fitting, nor for training
ENV_WEIGHTS = "SEG_ENSEMBLE_WEIGHTS"
IMPORT_HINT = "python import_models.py --ensemble"


def fuse(probabilities: Sequence[np.ndarray], weights: Sequence[float], size: tuple[int, int]) -> np.ndarray:
    """Members' (C, h_i, w_i) float32 probabilities and their weights -> (H, W) uint8 labels at ``size``.

    Each member's class plane is resized bilinearly with pixel centres aligned (as ``tf.image.resize`` and
    ``F.interpolate(align_corners=False)`` do), weighted and summed; the running maximum over classes gives the
    arg-max (ties to the lower class id, as ``argmax`` does)."""
    if len(probabilities) != len(weights) or not probabilities:
        raise ValueError(f"{len(probabilities)} members' probabilities and {len(weights)} weights")
    classes = {p.shape[0] for p in probabilities}
    if len(classes) != 1:
        raise ValueError(f"members disagree on the number of classes: {sorted(classes)}")
    height, width = size
    members = [(p * np.float32(w)).astype(np.float32, copy=False) for p, w in zip(probabilities, weights) if w]
    plane = np.empty(size, dtype=np.float32)
    resized = np.empty(size, dtype=np.float32)

    def fused_planes():
        for c in range(classes.pop()):
            # weighting at the members' resolution is the same as after resizing: bilinear resizing is linear
            cv2.resize(members[0][c], (width, height), dst=plane, interpolation=cv2.INTER_LINEAR)
            for p in members[1:]:
                cv2.resize(p[c], (width, height), dst=resized, interpolation=cv2.INTER_LINEAR)
                cv2.add(plane, resized, dst=plane)
            yield plane

    return running_argmax(fused_planes())


def normalised(weights: dict[str, float]) -> dict[str, float]:
    """Weights by member, non-negative, scaled to sum to 1."""
    if set(weights) != set(MEMBERS):
        raise ValueError(f"give a weight for each of {', '.join(MEMBERS)}; got {', '.join(weights) or 'none'}")
    if any(w < 0 for w in weights.values()) or not sum(weights.values()) > 0:
        raise ValueError(f"weights must be >= 0 and not all 0; got {weights}")
    total = sum(weights.values())
    return {m: weights[m] / total for m in MEMBERS}


def parse_weights(text: str) -> dict[str, float]:
    """``SEG_ENSEMBLE_WEIGHTS``: ``dilatednet=0.4,mask2former=0.6`` (scaled to sum to 1)."""
    try:
        pairs = dict(item.split("=", 1) for item in text.replace(" ", "").split(",") if item)
        return normalised({name: float(value) for name, value in pairs.items()})
    except ValueError as e:
        raise ValueError(f"{ENV_WEIGHTS}={text!r}: {e} (e.g. dilatednet=0.4,mask2former=0.6)") from None


def mean_iou(cm: np.ndarray) -> float:
    return round(float(scores(cm, excluded=excluded_classes(binary=False))["mean_iou"]), 4)


def fit(member_probs: dict[str, list[np.ndarray]], truths: list[np.ndarray], grid=GRID) -> tuple[dict, dict]:
    """The grid weight with the best mean IoU (void left out, as Cityscapes scores) over ``truths``.
    Returns (weights, {DilatedNet's weight: mean IoU} for every grid point)."""
    results = {}
    for w in grid:
        weights = {"dilatednet": w, "mask2former": round(1 - w, 6)}
        results[w] = score(member_probs, truths, weights)
    best = max(grid, key=lambda w: (results[w], -abs(w - 0.5)))  # ties: the more even blend
    return {"dilatednet": best, "mask2former": round(1 - best, 6)}, results


def score(member_probs: dict[str, list[np.ndarray]], truths: list[np.ndarray], weights: dict[str, float]) -> float:
    """Mean IoU of the fused labels against ``truths`` (superclass ids), summed over the images."""
    cm = 0
    for i, truth in enumerate(truths):
        labels = fuse([member_probs[m][i] for m in MEMBERS], [weights[m] for m in MEMBERS], truth.shape)
        cm = cm + truth_confusion(truth, labels, member_probs[MEMBERS[0]][i].shape[0])
    return mean_iou(cm)


def stored():
    """The ensemble's latest store entry, or None."""
    import bentoml

    try:
        return bentoml.models.get(f"{NAME}:latest")
    except bentoml.exceptions.NotFound:
        return None


def availability(members_served: dict[str, str]) -> tuple[object | None, str | None]:
    """The ensemble's store entry if it can be served with the members the store serves now, else (None, why).

    ``members_served``: each architecture's served tag. The ensemble's weights were fitted on particular members,
    so an entry whose members are not the ones served (re-imported, or removed) is not served."""
    import bentoml

    entry = stored()
    if entry is None:
        return None, f"the model store has no ensemble; fit one: {IMPORT_HINT}"
    members = dict(entry.info.metadata.get("members", {}))
    for m in MEMBERS:
        tag = members.get(m)
        if tag is None:
            return None, f"{entry.tag} names no {m} member; fit it again: {IMPORT_HINT}"
        try:
            bentoml.models.get(tag)
        except bentoml.exceptions.NotFound:
            return None, f"{entry.tag} was fitted on {tag}, which the model store no longer holds; {IMPORT_HINT}"
        if members_served.get(m) != tag:
            return None, (
                f"{entry.tag} was fitted on {tag}, but {members_served.get(m)} is served; fit it again: {IMPORT_HINT}"
            )
    return entry, None
