"""What every architecture's demo training shares: the generated scenes, seeded batches, a progress bar, and
quality measured on held-out scenes through the same predictor the service uses, at the scenes' original size.

Each architecture's module holds its own ``SCHEDULE`` and ``fit`` (``train_demo``): seeded and a fixed number of
steps (not a time budget), so the same machine gives the same weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tqdm.auto import tqdm

from .classes import CLASS_NAMES, LABEL_ID_TO_SUPERCLASS, NUM_CLASSES
from .metrics import confusion_matrix, scores
from .models.base import Predictor
from .preprocessing import resize_labels, resize_rgb
from .scenes import generate_dataset


SCENE_SIZE = (128, 256)  # (H, W) of generated training scenes: Cityscapes' 1:2 aspect
TRAIN_SEEDS = range(0, 192)
HELDOUT_SEEDS = range(100_000, 100_024)  # never trained on
UNET_FOREGROUND = "vehicle"


@dataclass(frozen=True)
class Schedule:
    steps: int
    batch_size: int
    lr: float


def scene_data(seeds, size=SCENE_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """(N, H, W, 3) uint8 images and (N, H, W) uint8 superclass ids."""
    images, label_ids = generate_dataset(seeds, *size)
    return images, LABEL_ID_TO_SUPERCLASS[label_ids]


def resized(images: np.ndarray, labels: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    return (np.stack([resize_rgb(i, size) for i in images]), np.stack([resize_labels(m, size) for m in labels]))


def batches(n: int, schedule: Schedule, seed: int):
    rng = np.random.default_rng(seed)
    for _ in range(schedule.steps):
        yield rng.choice(n, schedule.batch_size, replace=False)


def progress(name: str, steps: int):
    return tqdm(total=steps, desc=f"training {name}", unit="step", leave=True, mininterval=1.0)


def evaluate_multiclass(predictor: Predictor, images: np.ndarray, labels: np.ndarray) -> dict:
    pred = predictor.predict(list(images)).labels
    cm = confusion_matrix(labels, np.stack(pred), NUM_CLASSES)
    s = scores(cm)
    return {
        "mean_iou": round(s["mean_iou"], 4),
        "pixel_accuracy": round(s["pixel_accuracy"], 4),
        "iou": {n: (None if np.isnan(v) else round(float(v), 4)) for n, v in zip(CLASS_NAMES, s["iou"])},
        "heldout_scenes": len(images),
    }


def evaluate_binary(predictor: Predictor, images: np.ndarray, truth: np.ndarray) -> dict:
    pred = np.stack(predictor.predict(list(images)).labels)
    s = scores(confusion_matrix(truth, pred, 2))
    return {"dice": round(float(s["dice"][1]), 4), "iou": round(float(s["iou"][1]), 4), "heldout_scenes": len(images)}
