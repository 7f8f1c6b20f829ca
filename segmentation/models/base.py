"""The contract every predictor follows: preprocess a list of images into a batch, forward, postprocess.

An image's result never depends on what else is in its batch: every image is resized to the model's fixed
input size on its own, and normalisation, the networks' layers (BatchNorm in inference mode, InstanceNorm,
attention) and postprocessing act per image.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..precision import PRECISIONS


@dataclass
class Prediction:
    """Label maps, one (H_i, W_i) uint8 per input image at its original size, and the batch's stage times."""

    labels: list[np.ndarray]
    timings_ms: dict[str, float] = field(default_factory=dict)


class Predictor(ABC):
    name: str = ""
    num_classes: int = 0
    input_size: tuple[int, int] = (256, 256)  # (h, w)
    precision: str = "fp32"  # or "bf16": see segmentation/precision.py

    @abstractmethod
    def preprocess(self, images: list[np.ndarray]) -> Any:
        """(H_i, W_i, 3) uint8 RGB images -> one framework batch."""

    @abstractmethod
    def forward(self, batch: Any) -> Any:
        """The network, in inference mode."""

    @abstractmethod
    def postprocess(self, outputs: Any, sizes: list[tuple[int, int]]) -> list[np.ndarray]:
        """Raw outputs -> (H_i, W_i) uint8 class ids at each image's original ``sizes[i]`` = (H_i, W_i)."""

    @staticmethod
    def checked_precision(precision: str) -> str:
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        return precision

    def predict(self, images: list[np.ndarray]) -> Prediction:
        if not images:
            return Prediction([], {})
        sizes = [img.shape[:2] for img in images]
        t0 = time.perf_counter()
        batch = self.preprocess(images)
        t1 = time.perf_counter()
        outputs = self.forward(batch)
        t2 = time.perf_counter()
        labels = self.postprocess(outputs, sizes)
        t3 = time.perf_counter()
        return Prediction(
            labels,
            {"preprocess": (t1 - t0) * 1e3, "inference": (t2 - t1) * 1e3, "postprocess": (t3 - t2) * 1e3},
        )
