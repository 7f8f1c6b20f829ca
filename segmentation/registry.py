"""The architectures this project serves, one spec each; everything else is derived from these lines.

The store (what a model entry holds, how it is saved and loaded), ``import_models.py`` (demo training and users'
artifacts), the model services (batching, workers), the gateway's ``model`` parameter, the benchmark and the
tests' model lists all read ``ARCHITECTURES``. Adding an architecture: its module in ``segmentation/models/``
(implementing :class:`Architecture`), one line here, and its tests.

Framework-free: the gateway reads the specs, and imports an architecture's module only where that model runs.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from .preprocessing import Pipeline

if TYPE_CHECKING:
    from pathlib import Path

    import numpy as np

    from .classes import LabelSet
    from .models.base import Predictor


@dataclass
class Loaded:
    """A model in memory, ready to be checked, measured and stored."""

    model: Any
    make: Any  # precision ("fp32" | "bf16") -> Predictor
    input_size: tuple[int, int]
    preset: str
    parameters: int
    processor: Any = None
    label_set: LabelSet | None = None  # multiclass models: the classes the model itself predicts
    foreground: str | None = None  # binary models: what the foreground is (a superclass name for the demo)
    pipeline: Pipeline | None = None  # where the model's own processor allows the gateway to do its steps


class Architecture(Protocol):
    """What an architecture's module provides (``segmentation/models/dilatednet.py`` is one)."""

    def save(self, model: Any, folder: Path, processor: Any = None) -> None:
        """Write ``model`` in its native format into a new store entry's ``folder``."""

    def load(self, folder: Path, metadata: dict, precision: str) -> Predictor:
        """A stored model's folder and metadata -> a predictor serving in ``precision``."""

    def shell(self, folder: Path, metadata: dict) -> Predictor:
        """Optional, for a compiled runtime: the predictor's pre- and post-processing without the network (the
        compiled one runs the forward, so the framework's weights are never loaded)."""

    def load_artifact(self, path: Path, pipeline: Pipeline | None, labels: str | None) -> Loaded:
        """A user's artifact (file or folder) -> a loaded model; ``labels`` names its label set if given."""

    def train_demo(self, data: tuple[np.ndarray, np.ndarray]) -> Loaded:
        """The small demo model, briefly trained on generated scenes (images, labelIds)."""

    def build_full(self) -> Loaded:
        """The published model's size with random weights (the benchmark's)."""


@dataclass(frozen=True)
class ModelSpec:
    name: str
    module: str  # the architecture's module (Architecture), imported only where the model runs
    framework: str  # "keras" | "pytorch" | "transformers": its thread settings and recorded versions
    packages: tuple[str, ...]  # their versions are recorded with a stored model
    task: str  # "multiclass": the 8 superclasses (or a Cityscapes label set); "binary": foreground or not
    artifact: str  # the file that marks a stored entry of this model
    pipeline: Pipeline | None  # resize in, upsample out (done by the gateway); None: the model's own processor's
    max_batch_size: int  # the best batch on 2 cores (`make bench`); batches amortise per-call overhead
    max_latency_ms: int  # longest a call may take, queue included (503 past it): well above a full batch
    demo_floor: tuple[str, float]  # the demo model's quality floor on held-out scenes (metric, value)
    workers: int = 1  # processes by default, as the CPUs allow; each holds a copy of the model
    split_batch: bool = False  # a batch runs as one single-threaded forward per thread (small convolutions)

    @property
    def architecture(self) -> Architecture:
        return importlib.import_module(self.module)


ARCHITECTURES: tuple[ModelSpec, ...] = (
    ModelSpec("dilatednet", "segmentation.models.dilatednet", "keras", ("keras", "tensorflow-cpu"), "multiclass",
              "model.keras", Pipeline("bicubic", "scores-bilinear"), 8, 60_000, ("mean_iou", 0.6)),
    ModelSpec("mask2former", "segmentation.models.mask2former", "transformers", ("transformers", "torch"),
              "multiclass", "config.json", None, 2, 60_000, ("mean_iou", 0.5)),
    ModelSpec("unet", "segmentation.models.unet", "pytorch", ("torch",), "binary", "model.safetensors",
              Pipeline("bilinear", "labels-nearest"), 2, 30_000, ("dice", 0.7), split_batch=True),
)
SPECS: dict[str, ModelSpec] = {s.name: s for s in ARCHITECTURES}
MODEL_NAMES: tuple[str, ...] = tuple(SPECS)


def spec(name: str) -> ModelSpec:
    try:
        return SPECS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; expected one of {', '.join(SPECS)}") from None


def pipeline_of(name: str, metadata: dict) -> Pipeline | None:
    """A stored model's pipeline: what its import recorded over its architecture's reference one; None where the
    model's own processor resizes and upsamples (an architecture without a reference pipeline whose import
    recorded none)."""
    default, recorded = spec(name).pipeline, metadata.get("pipeline")
    return Pipeline.from_dict(recorded, default) if default or recorded else None


def label_set_of(metadata: dict) -> LabelSet:
    """The label set a stored multiclass model predicts (the superclasses where its import recorded none)."""
    from .classes import LABEL_SETS

    return LABEL_SETS[metadata.get("label_set", "superclass")]
