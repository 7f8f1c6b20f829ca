"""Segmentation quality from a confusion matrix built with one ``bincount``."""

from __future__ import annotations

import numpy as np


def confusion_matrix(truth: np.ndarray, pred: np.ndarray, num_classes: int) -> np.ndarray:
    """(C, C) int64 counts, rows = ground truth, columns = prediction."""
    if truth.shape != pred.shape:
        raise ValueError(f"ground truth {truth.shape} and prediction {pred.shape} differ in shape")
    t = truth.reshape(-1).astype(np.int64)
    p = pred.reshape(-1).astype(np.int64)
    if t.size and (t.max() >= num_classes or p.max() >= num_classes or t.min() < 0 or p.min() < 0):
        raise ValueError(f"class ids must be within 0..{num_classes - 1}")
    return np.bincount(t * num_classes + p, minlength=num_classes**2).reshape(num_classes, num_classes)


def scores(cm: np.ndarray, excluded: tuple[int, ...] = ()) -> dict:
    """Per-class IoU and Dice (NaN where a class is in neither map, or ``excluded``), mean IoU over classes
    present, pixel accuracy."""
    tp = np.diag(cm).astype(np.float64)
    fp = cm.sum(axis=0) - tp
    fn = cm.sum(axis=1) - tp
    union = tp + fp + fn
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, tp / union, np.nan)
        dice = np.where(union > 0, 2 * tp / (2 * tp + fp + fn), np.nan)
    iou[list(excluded)] = np.nan
    dice[list(excluded)] = np.nan
    total = cm.sum()
    return {
        "iou": iou,
        "dice": dice,
        "mean_iou": float(np.nanmean(iou)) if np.any(~np.isnan(iou)) else float("nan"),
        "pixel_accuracy": float(tp.sum() / total) if total else float("nan"),
    }


def class_fractions(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """(C,) float64: the fraction of pixels of each class."""
    counts = np.bincount(labels.reshape(-1), minlength=num_classes)[:num_classes]
    return counts / max(labels.size, 1)


VOID = 0  # the superclass Cityscapes leaves out of its scores


def truth_confusion(truth: np.ndarray, pred: np.ndarray, num_classes: int, foreground: int | None = None):
    """The confusion matrix of a prediction against superclass ground truth, scored as Cityscapes does: pixels
    whose truth is void are left out. For a binary model, ``foreground`` is the superclass its class 1 stands
    for. Sum these over images for a data set's scores; ``scores(cm, excluded=excluded_classes(...))``."""
    if truth.shape != pred.shape:
        raise ValueError(f"ground truth {truth.shape[::-1]} and image {pred.shape[::-1]} differ in size (W, H)")
    keep = truth != VOID
    kept = truth[keep]
    if foreground is not None:
        kept = (kept == foreground).astype(np.uint8)
    return confusion_matrix(kept, pred[keep], num_classes)


def excluded_classes(binary: bool) -> tuple[int, ...]:
    """The classes left out of the mean: void for the superclasses; none for a binary model (its background
    is everything but the foreground, void pixels aside)."""
    return () if binary else (VOID,)


def reported(cm: np.ndarray, binary: bool) -> dict:
    """``scores`` as the service and the folder job report them: void excluded for the superclasses, every figure
    rounded to 4 places, None where a class is in neither map (JSON has no NaN)."""
    s = scores(cm, excluded=excluded_classes(binary))
    clean = lambda v: None if np.isnan(v) else round(float(v), 4)  # noqa: E731
    return {
        "iou": [clean(v) for v in s["iou"]],
        "dice": [clean(v) for v in s["dice"]],
        "mean_iou": clean(s["mean_iou"]),
        "pixel_accuracy": clean(s["pixel_accuracy"]),
    }
