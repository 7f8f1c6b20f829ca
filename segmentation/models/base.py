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

from ..classes import LabelSet
from ..precision import PRECISIONS
from ..preprocessing import Pipeline, labels_at


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
    pipeline: Pipeline = Pipeline()  # the resize filter in, and how answers come back to the photo's size
    label_map: np.ndarray | None = None  # (K,) uint8: the model's own class -> served class; None: the same
    runtime: str = "native"  # or "openvino": what runs the forward pass (segmentation/runtimes.py)

    def fold_into(self, label_set: LabelSet) -> "Predictor":
        """Serve a model that predicts ``label_set`` (e.g. the 19 Cityscapes trainIds) in the superclasses: its
        own arg-max first, then the table, as the reference apps do. Returns the predictor."""
        self.label_map = label_set.lookup_table()
        return self

    @abstractmethod
    def preprocess(self, images: list[np.ndarray]) -> Any:
        """(H_i, W_i, 3) uint8 RGB images -> one framework batch."""

    @abstractmethod
    def forward(self, batch: Any) -> Any:
        """The network, in inference mode."""

    def exportable(self) -> Any:
        """The network as a module a compiler traces (a ``torch.nn.Module`` or a Keras model): the preprocessed
        batch in, as arrays, what :meth:`forward` returns (segmentation/runtimes.py)."""
        raise NotImplementedError(f"{type(self).__name__} has no compiled runtime")

    def from_compiled(self, outputs: list[np.ndarray]) -> Any:
        """A compiled network's outputs (arrays, in :meth:`exportable`'s order) -> what :meth:`forward` returns."""
        return outputs[0]

    def outputs(self, outputs: Any) -> list[np.ndarray]:
        """Raw outputs -> per image, its answer at the input size, as :func:`~segmentation.preprocessing.labels_at`
        finishes it: (h, w) uint8 labels or (C, h, w) float32 class scores (``pipeline.upsample``). A gateway
        that resizes images itself asks for these, and finishes them at the photo's size."""
        raise NotImplementedError(f"{type(self).__name__} finishes its answers itself (postprocess)")

    def class_probabilities(self, outputs: Any) -> list[np.ndarray]:
        """Raw outputs -> per image (K, h, w) float32 class probabilities at the model's own resolution, in its own
        K classes, each pixel's summing to 1 (for the ensemble, segmentation/ensemble.py)."""
        raise NotImplementedError(f"{type(self).__name__} gives no class probabilities")

    def probabilities(self, images: list[np.ndarray]) -> Prediction:
        """Per image (C, h, w) float32 probabilities of the served classes at the model's resolution (a model
        that predicts another label set has its classes' probabilities summed into the served ones)."""
        t0 = time.perf_counter()
        batch = self.preprocess(images)
        t1 = time.perf_counter()
        outputs = self.forward(batch)
        t2 = time.perf_counter()
        probs = self.class_probabilities(outputs)
        if self.label_map is not None:
            fold = np.eye(int(self.label_map.max()) + 1, dtype=np.float32)[self.label_map].T  # (C, K) one-hot
            probs = [np.tensordot(fold, p, axes=1).astype(np.float32, copy=False) for p in probs]
        t3 = time.perf_counter()
        return Prediction(
            probs, {"preprocess": (t1 - t0) * 1e3, "inference": (t2 - t1) * 1e3, "postprocess": (t3 - t2) * 1e3}
        )

    def postprocess(self, outputs: Any, sizes: list[tuple[int, int]]) -> list[np.ndarray]:
        """Raw outputs -> (H_i, W_i) uint8 class ids at each image's original ``sizes[i]`` = (H_i, W_i)."""
        return [labels_at(out, size) for out, size in zip(self.outputs(outputs), sizes)]

    @staticmethod
    def checked_precision(precision: str) -> str:
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        return precision

    def predict(self, images: list[np.ndarray], finish: bool = True) -> Prediction:
        """Label maps at the images' own sizes; with ``finish=False``, each image's answer at the input size
        instead (:meth:`outputs`), for the caller to finish."""
        if not images:
            return Prediction([], {})
        sizes = [img.shape[:2] for img in images]
        t0 = time.perf_counter()
        batch = self.preprocess(images)
        t1 = time.perf_counter()
        outputs = self.forward(batch)
        t2 = time.perf_counter()
        labels = self.postprocess(outputs, sizes) if finish else self.outputs(outputs)
        if finish and self.label_map is not None:
            labels = [self.label_map[m] for m in labels]
        t3 = time.perf_counter()
        return Prediction(
            labels,
            {"preprocess": (t1 - t0) * 1e3, "inference": (t2 - t1) * 1e3, "postprocess": (t3 - t2) * 1e3},
        )
