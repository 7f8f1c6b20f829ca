"""UNet for binary segmentation (PyTorch), as the reference specifies it.

Double 3x3 conv blocks with InstanceNorm2d(affine=True) and ReLU; encoder 32 -> 64 -> 128 -> 256 -> 512;
bilinear upsampling with skip concatenation (512+256 -> 256, 256+128 -> 128, 128+64 -> 64, 64+32 -> 32) and
dropout 0.3 / 0.2 / 0.1 / 0.0; one logit channel; 256x256 RGB input in [0, 1]; sigmoid > 0.5 is foreground.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn
from torch.nn import functional as F

from ..preprocessing import Normalization, Pipeline, to_batch
from ..registry import SPECS, Loaded, pipeline_of
from ..training import Schedule
from .base import Predictor

# Channel widths of the encoder, shallow to deep. `full` is the reference; `small` trains in a minute on a CPU.
PRESETS: dict[str, tuple[int, ...]] = {"full": (32, 64, 128, 256, 512), "small": (8, 16, 32, 64, 128)}
DROPOUT = (0.3, 0.2, 0.1, 0.0)  # up blocks, deep to shallow
INPUT_SIZE = (256, 256)
THRESHOLD = 0.5
SPEC = SPECS["unet"]
# The UNet app this replaces: 256x256 bilinear, [0, 1], sigmoid > 0.5, the mask resized back to the photo's size.
REFERENCE_PIPELINE = SPEC.pipeline


class DoubleConv(nn.Sequential):
    def __init__(self, cin: int, cout: int):
        super().__init__(
            nn.Conv2d(cin, cout, 3, padding=1),
            nn.InstanceNorm2d(cout, affine=True),
            nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1),
            nn.InstanceNorm2d(cout, affine=True),
            nn.ReLU(inplace=True),
        )


class Up(nn.Module):
    def __init__(self, cin: int, cskip: int, cout: int, dropout: float):
        super().__init__()
        self.conv = DoubleConv(cin + cskip, cout)
        self.dropout = nn.Dropout2d(dropout)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)  # [N, cin, h, w]
        return self.dropout(self.conv(torch.cat([skip, x], dim=1)))  # [N, cout, h, w]


class UNet(nn.Module):
    def __init__(self, widths: tuple[int, ...] = PRESETS["full"]):
        super().__init__()
        if len(widths) != 5:
            raise ValueError(f"UNet needs 5 encoder widths, got {widths}")
        self.widths = tuple(widths)
        self.inc = DoubleConv(3, widths[0])
        self.downs = nn.ModuleList(DoubleConv(widths[i], widths[i + 1]) for i in range(4))
        self.ups = nn.ModuleList(
            Up(widths[4 - i], widths[3 - i], widths[3 - i], DROPOUT[i]) for i in range(4)
        )
        self.outc = nn.Conv2d(widths[0], 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N, 3, H, W] -> [N, 1, H, W] logits
        skips = [self.inc(x)]
        for down in self.downs:
            skips.append(down(F.max_pool2d(skips[-1], 2)))
        x = skips.pop()
        for up in self.ups:
            x = up(x, skips.pop())
        return self.outc(x)


def widths_from_state_dict(state: dict[str, torch.Tensor]) -> tuple[int, ...]:
    """The encoder widths a checkpoint was trained with, read off its conv weights."""
    try:
        first = state["inc.0.weight"].shape[0]
        return (first, *(state[f"downs.{i}.0.weight"].shape[0] for i in range(4)))
    except KeyError as e:
        raise ValueError(f"not a UNet checkpoint of this architecture: no weight named {e.args[0]!r}") from None


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A .safetensors file, or a .pth/.pt holding a state_dict or {'model_state_dict': ...}. Never unpickles code."""
    if path.suffix == ".safetensors":
        return load_file(str(path))
    if path.suffix not in (".pth", ".pt"):
        raise ValueError(f"a UNet checkpoint must be .pth, .pt or .safetensors, got {path.name!r}")
    obj = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(obj, dict) and "model_state_dict" in obj:
        obj = obj["model_state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError("the checkpoint holds no state_dict of tensors")
    return obj


def load_state_dict(state: dict[str, torch.Tensor]) -> UNet:
    model = UNet(widths_from_state_dict(state))
    model.load_state_dict(state, strict=True)  # RuntimeError names every missing, unexpected or mis-shaped key
    return model.eval()


class _Probabilities(nn.Module):
    """The foreground probabilities [N, h, w], as the forward gives them: what a compiler traces."""

    def __init__(self, model: UNet):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.model(x))[:, 0]


class UNetPredictor(Predictor):
    name = "unet"
    num_classes = 2
    input_size = INPUT_SIZE
    lanes: int = 1  # see use_lanes
    _lanes: ThreadPoolExecutor | None = None

    def __init__(self, model: UNet, norm: Normalization = Normalization(), threshold: float = THRESHOLD,
                 precision: str = "fp32", pipeline: Pipeline = REFERENCE_PIPELINE):
        if pipeline.upsample != "labels-nearest":
            raise ValueError("UNet's mask is thresholded at its input size and resized as labels (labels-nearest)")
        self.model = model.eval() if model is not None else None  # None: a shell for a compiled runtime
        self.norm = norm
        self.pipeline = pipeline
        self.threshold = threshold
        self.precision = self.checked_precision(precision)

    def preprocess(self, images: list[np.ndarray]) -> torch.Tensor:
        batch = to_batch(images, self.input_size, self.norm, self.pipeline.resize)  # [N, h, w, 3]
        return torch.from_numpy(batch).permute(0, 3, 1, 2).contiguous()  # [N, 3, h, w]

    def use_lanes(self, lanes: int) -> None:
        """Run a batch of two or more images as ``lanes`` single-threaded forwards at once, one share of the batch
        each, instead of one forward over the batch with ``lanes`` threads. UNet's convolutions are small: threads
        that split each of them wait on each other and spin, while whole images in parallel keep every core busy
        (served here: see services.SPLIT_BATCH). A lone image still gets every thread. The labels are the same (in
        bf16 the probabilities too; in fp32 they move by float rounding, as between a batch and a lone image):
        tested."""
        if self._lanes is not None:
            self._lanes.shutdown()
        self.lanes = max(1, int(lanes))
        self._lanes = ThreadPoolExecutor(self.lanes, thread_name_prefix="unet-lane") if self.lanes > 1 else None

    def forward(self, batch: torch.Tensor) -> np.ndarray:
        if self._lanes is None or len(batch) < 2:
            return self._forward(batch)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # one batch at a time runs in a model service, so this global is ours meanwhile
        try:
            n = min(self.lanes, len(batch))  # image j goes to lane j % n
            outs = list(self._lanes.map(self._forward, [batch[i::n] for i in range(n)]))
        finally:
            torch.set_num_threads(threads)
        probs = np.empty((len(batch), *outs[0].shape[1:]), outs[0].dtype)
        for i, out in enumerate(outs):
            probs[i::n] = out
        return probs

    @torch.inference_mode()
    def _forward(self, batch: torch.Tensor) -> np.ndarray:
        self.model.eval()
        # bf16: autocast runs convolutions in bfloat16 through oneDNN; the sigmoid and threshold in fp32.
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            logits = self.model(batch)
        return torch.sigmoid(logits.float())[:, 0].numpy()  # [N, h, w] probabilities

    def exportable(self) -> nn.Module:
        return _Probabilities(self.model).eval()

    def outputs(self, probs: np.ndarray) -> list[np.ndarray]:
        return list((probs > self.threshold).astype(np.uint8))  # [h, w] in {0, 1} each


# --- the architecture's side of the store and the import (segmentation.registry.Architecture) -------------------

def save(model: UNet, folder: Path, processor=None) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / SPEC.artifact)


def load(folder: Path, metadata: dict, precision: str) -> UNetPredictor:
    norm = Normalization.from_dict(metadata.get("normalization"))
    model = load_state_dict(read_state_dict(folder / SPEC.artifact))
    return UNetPredictor(model, norm, threshold=float(metadata.get("threshold", THRESHOLD)), precision=precision,
                         pipeline=pipeline_of(SPEC.name, metadata))


def shell(folder: Path, metadata: dict) -> UNetPredictor:
    norm = Normalization.from_dict(metadata.get("normalization"))
    return UNetPredictor(None, norm, threshold=float(metadata.get("threshold", THRESHOLD)),
                         pipeline=pipeline_of(SPEC.name, metadata))


def _loaded(model: UNet, preset: str, foreground: str, pipeline: Pipeline = REFERENCE_PIPELINE) -> Loaded:
    def make(precision: str) -> UNetPredictor:
        return UNetPredictor(model, precision=precision, pipeline=pipeline)

    return Loaded(model, make, INPUT_SIZE, preset, sum(p.numel() for p in model.parameters()), foreground=foreground)


def load_artifact(path: Path, pipeline: Pipeline | None, labels: str | None) -> Loaded:
    if labels is not None:
        raise ValueError("UNet is a binary model: --labels does not apply to it")
    model = load_state_dict(read_state_dict(path))
    preset = next((k for k, v in PRESETS.items() if v == model.widths), "custom")
    return _loaded(model, preset, "foreground", pipeline or REFERENCE_PIPELINE)


SCHEDULE = Schedule(steps=90, batch_size=8, lr=3e-3)


def fit(model, data, foreground: int, seed: int = 0) -> None:
    from ..training import batches, progress, resized

    images, labels = resized(*data, size=(256, 256))
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0  # [N, 3, 256, 256]
    y = torch.from_numpy((labels == foreground).astype(np.float32))[:, None]  # [N, 1, 256, 256]
    sched = SCHEDULE
    opt = torch.optim.Adam(model.parameters(), lr=sched.lr)
    model.train()
    with progress("unet", sched.steps) as bar:
        for idx in batches(len(x), sched, seed):
            loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
            bar.update()
    model.eval()


def train_demo(data) -> Loaded:
    from ..classes import CLASS_NAMES
    from ..training import UNET_FOREGROUND

    torch.manual_seed(0)
    model = UNet(PRESETS["small"])
    fit(model, data, CLASS_NAMES.index(UNET_FOREGROUND))
    return _loaded(model, "small", UNET_FOREGROUND)


def build_full() -> Loaded:
    return _loaded(UNet(PRESETS["full"]).eval(), "full", "vehicle")
