"""A fourth architecture, as a user would add one: a tiny PyTorch per-pixel classifier of the 8 superclasses.

tests/test_fourth_architecture.py copies the project, drops this file into ``segmentation/models/`` and adds
its one ``ModelSpec`` line to ``segmentation/registry.py``; nothing else is touched.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..classes import NUM_CLASSES
from ..preprocessing import Pipeline, to_batch
from ..registry import SPECS, Loaded, pipeline_of
from .base import Predictor

SPEC = SPECS["toynet"]
INPUT_SIZE = (64, 128)


def build(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, NUM_CLASSES, 1), nn.Softmax(dim=1)
    ).eval()


class ToyPredictor(Predictor):
    name = "toynet"
    num_classes = NUM_CLASSES
    input_size = INPUT_SIZE

    def __init__(self, model: nn.Module, precision: str = "fp32", pipeline: Pipeline = SPEC.pipeline):
        self.model, self.precision, self.pipeline = model.eval(), self.checked_precision(precision), pipeline

    def preprocess(self, images: list[np.ndarray]) -> torch.Tensor:
        return torch.from_numpy(to_batch(images, self.input_size, resample=self.pipeline.resize)).permute(0, 3, 1, 2)

    @torch.inference_mode()
    def forward(self, batch: torch.Tensor) -> np.ndarray:
        return self.model(batch.contiguous()).numpy()  # [N, C, h, w] probabilities

    def outputs(self, probs: np.ndarray) -> list[np.ndarray]:
        return [np.ascontiguousarray(p) for p in probs]  # scores, resized bilinearly by the gateway


def _loaded(model: nn.Module, preset: str) -> Loaded:
    return Loaded(model, lambda precision: ToyPredictor(model, precision), INPUT_SIZE, preset,
                  sum(p.numel() for p in model.parameters()))


def save(model: nn.Module, folder: Path, processor=None) -> None:
    save_file(model.state_dict(), folder / SPEC.artifact)


def load(folder: Path, metadata: dict, precision: str) -> ToyPredictor:
    model = build()
    model.load_state_dict(load_file(folder / SPEC.artifact))
    return ToyPredictor(model, precision, pipeline_of(SPEC.name, metadata))


def load_artifact(path: Path, pipeline: Pipeline | None, labels: str | None) -> Loaded:
    model = build()
    model.load_state_dict(load_file(path))
    return _loaded(model, "custom")


def train_demo(data) -> Loaded:
    """A few steps of cross-entropy on the generated scenes at the input size."""
    images, labels = data
    x = torch.from_numpy(to_batch(list(images), INPUT_SIZE)).permute(0, 3, 1, 2).contiguous()
    y = torch.nn.functional.interpolate(torch.from_numpy(labels)[:, None].float(), size=INPUT_SIZE,
                                        mode="nearest")[:, 0].long()
    model = build()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for step in range(30):
        idx = torch.arange(step * 8, step * 8 + 8) % len(x)
        loss = torch.nn.functional.nll_loss(torch.log(model(x[idx]) + 1e-6), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return _loaded(model.eval(), "small")


def build_full() -> Loaded:
    return _loaded(build(), "full")
