"""Fit the `small` presets briefly on generated scenes, so a fresh machine gets demo models that see structure.

Seeded and a fixed number of steps (not a time budget), so the same machine gives the same weights. Quality is
measured on held-out scenes through the same predictor the service uses, at the scenes' original size.
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


SCHEDULES = {
    "dilatednet": Schedule(steps=450, batch_size=8, lr=1e-3),
    "mask2former": Schedule(steps=260, batch_size=8, lr=4e-4),
    "unet": Schedule(steps=90, batch_size=8, lr=3e-3),
}


def scene_data(seeds, size=SCENE_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """(N, H, W, 3) uint8 images and (N, H, W) uint8 superclass ids."""
    images, label_ids = generate_dataset(seeds, *size)
    return images, LABEL_ID_TO_SUPERCLASS[label_ids]


def _resized(images: np.ndarray, labels: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    return (np.stack([resize_rgb(i, size) for i in images]), np.stack([resize_labels(m, size) for m in labels]))


def _batches(n: int, schedule: Schedule, seed: int):
    rng = np.random.default_rng(seed)
    for _ in range(schedule.steps):
        yield rng.choice(n, schedule.batch_size, replace=False)


def _progress(name: str, steps: int):
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


def fit_dilatednet(model, data, seed: int = 0) -> None:
    import keras
    import tensorflow as tf

    images, labels = _resized(*data, size=tuple(model.input_shape[1:3]))
    x = images.astype(np.float32) / 255.0
    sched = SCHEDULES["dilatednet"]
    model.compile(optimizer=keras.optimizers.Adam(sched.lr), loss="sparse_categorical_crossentropy")
    with _progress("dilatednet", sched.steps) as bar:
        for idx in _batches(len(x), sched, seed):
            loss = model.train_on_batch(tf.constant(x[idx]), tf.constant(labels[idx]))
            bar.set_postfix(loss=f"{float(np.asarray(loss).ravel()[0]):.3f}", refresh=False)
            bar.update()


def fit_unet(model, data, foreground: int, seed: int = 0) -> None:
    import torch

    images, labels = _resized(*data, size=(256, 256))
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0  # [N, 3, 256, 256]
    y = torch.from_numpy((labels == foreground).astype(np.float32))[:, None]  # [N, 1, 256, 256]
    sched = SCHEDULES["unet"]
    opt = torch.optim.Adam(model.parameters(), lr=sched.lr)
    model.train()
    with _progress("unet", sched.steps) as bar:
        for idx in _batches(len(x), sched, seed):
            loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
            bar.update()
    model.eval()


def fit_mask2former(model, processor, data, seed: int = 0) -> None:
    import torch

    images, labels = data
    enc = processor(images=list(images), segmentation_maps=list(labels), return_tensors="pt")
    pixel_values, mask_labels, class_labels = enc["pixel_values"], enc["mask_labels"], enc["class_labels"]
    sched = SCHEDULES["mask2former"]
    opt = torch.optim.AdamW(model.parameters(), lr=sched.lr, weight_decay=0.05)
    lr_at = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=sched.lr, total_steps=sched.steps, pct_start=0.1)
    model.train()
    with _progress("mask2former", sched.steps) as bar:
        for idx in _batches(len(images), sched, seed):
            out = model(
                pixel_values=pixel_values[idx],
                mask_labels=[mask_labels[i] for i in idx],
                class_labels=[class_labels[i] for i in idx],
            )
            opt.zero_grad()
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            lr_at.step()
            bar.set_postfix(loss=f"{out.loss.item():.2f}", refresh=False)
            bar.update()
    model.eval()
