"""Mask2Former (Hugging Face transformers) with a Swin backbone, for the 8 Cityscapes superclasses."""

from __future__ import annotations

import math
import threading
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, SwinConfig
from transformers.models.mask2former.image_processing_pil_mask2former import Mask2FormerImageProcessorPil

from ..classes import CLASS_NAMES, LABEL_SETS, NUM_CLASSES, recognise_label_set
from ..preprocessing import IMAGENET_MEAN, IMAGENET_STD, Pipeline, upsampled_argmax
from ..registry import SPECS, Loaded, label_set_of
from ..training import Schedule
from .base import Predictor

SPEC = SPECS["mask2former"]

# Backbone and head sizes. `full` is the layout of facebook/mask2former-swin-small-cityscapes-semantic
# (69 M parameters with 8 classes); `small` builds offline in a second and trains on a CPU in minutes.
PRESETS: dict[str, dict] = {
    "full": dict(
        swin=dict(embed_dim=96, depths=[2, 2, 18, 2], num_heads=[3, 6, 12, 24], window_size=7),
        head=dict(hidden_dim=256, num_queries=100, decoder_layers=10, encoder_layers=6, mask_feature_size=256,
                  feature_size=256, encoder_feedforward_dim=1024, dim_feedforward=2048, num_attention_heads=8),
        input_size=(384, 384),
    ),
    "small": dict(
        swin=dict(embed_dim=32, depths=[1, 1, 2, 1], num_heads=[1, 2, 4, 8], window_size=4),
        head=dict(hidden_dim=64, num_queries=16, decoder_layers=3, encoder_layers=2, mask_feature_size=64,
                  feature_size=64, encoder_feedforward_dim=128, dim_feedforward=256, num_attention_heads=4),
        input_size=(128, 128),
    ),
}


def build_config(preset: str = "small") -> Mask2FormerConfig:
    if preset not in PRESETS:
        raise ValueError(f"unknown Mask2Former preset {preset!r}; expected one of {sorted(PRESETS)}")
    p = PRESETS[preset]
    swin = SwinConfig(out_features=["stage1", "stage2", "stage3", "stage4"], **p["swin"])
    return Mask2FormerConfig(
        backbone_config=swin,
        num_labels=NUM_CLASSES,
        id2label=dict(enumerate(CLASS_NAMES)),
        label2id={n: i for i, n in enumerate(CLASS_NAMES)},
        **p["head"],
    )


def build_processor(input_size: tuple[int, int]) -> Mask2FormerImageProcessorPil:
    """A fixed-size processor: every image is resized to ``input_size`` on its own, so no batch padding."""
    h, w = input_size
    return Mask2FormerImageProcessorPil(
        size={"height": h, "width": w},
        do_resize=True,
        do_rescale=True,
        do_normalize=True,
        image_mean=list(IMAGENET_MEAN),
        image_std=list(IMAGENET_STD),
        ignore_index=255,
        do_reduce_labels=False,
        num_labels=NUM_CLASSES,
    )


def build_model(preset: str = "small", seed: int = 0) -> Mask2FormerForUniversalSegmentation:
    torch.manual_seed(seed)
    return Mask2FormerForUniversalSegmentation(build_config(preset)).eval()


def load_pretrained(path: Path) -> tuple[Mask2FormerForUniversalSegmentation, Mask2FormerImageProcessorPil]:
    """A ``save_pretrained`` folder (config.json, model.safetensors, preprocessor_config.json). Safetensors only."""
    model = Mask2FormerForUniversalSegmentation.from_pretrained(str(path), use_safetensors=True, local_files_only=True)
    return model.eval(), load_processor(path)


def load_processor(path: Path) -> Mask2FormerImageProcessorPil:
    if (path / "preprocessor_config.json").exists():
        return Mask2FormerImageProcessorPil.from_pretrained(str(path), local_files_only=True)
    return build_processor(PRESETS["full"]["input_size"])


def processor_pipeline(processor: Mask2FormerImageProcessorPil) -> Pipeline | None:
    """The pipeline the gateway can run for this processor, or None where only the processor can.

    A processor that resizes every image to one fixed size with Pillow's bilinear filter gives the same pixels as
    the gateway's resize (preprocessing.resize_rgb) followed by the processor (it leaves an image of its size as
    it is), so the gateway sends the model-size image instead of the photo, and gets back the class scores that
    ``post_process_semantic_segmentation`` resizes bilinearly to the photo's size. Any other processor (sized by
    its shortest edge, another filter, a size its ``size_divisor`` rounds) keeps both steps in the model's
    process."""
    size, divisor = processor.size, getattr(processor, "size_divisor", 0) or 0
    fixed = getattr(size, "height", None) and getattr(size, "width", None) and not getattr(size, "shortest_edge", None)
    if not (processor.do_resize and fixed and int(processor.resample) == 2):  # 2: PIL.Image.BILINEAR
        return None
    if divisor and (size.height % divisor or size.width % divisor):
        return None
    return Pipeline("bilinear", "scores-bilinear")


# transformers scales every mask to this size before combining masks and classes, whatever the input size.
REFERENCE_MASK_SIZE = (384, 384)


def semantic_maps(
    class_logits: torch.Tensor, mask_logits: torch.Tensor, sizes: list[tuple[int, int]]
) -> list[np.ndarray]:
    """transformers' ``post_process_semantic_segmentation``, step for step, with the same labels out, image by image.

    Two steps differ in how, not in what. The masks are resized into a buffer kept between calls
    (:func:`_class_scores`). The last step (a bilinear resize of the class scores to each image's size, then
    the arg-max) goes through :func:`~segmentation.preprocessing.upsampled_argmax`, which blends only the pixels on
    class borders; where it declines (scores with borders everywhere), the scores are resized whole, channels-last,
    since an arg-max across contiguous channels is many times faster than across channel planes.

    class_logits [N, Q, C+1], mask_logits [N, Q, h, w] -> per image (H_i, W_i) uint8 class ids."""
    classes = class_logits.float().softmax(dim=-1)[..., :-1]  # drop the "no object" class
    out = []
    for i, size in enumerate(sizes):
        scores = _class_scores(classes[i : i + 1], mask_logits[i : i + 1].float())  # [1, C, 384, 384]
        labels = upsampled_argmax(scores[0].numpy(), tuple(size))
        if labels is None:
            one = scores.contiguous(memory_format=torch.channels_last)
            full = F.interpolate(one, size=tuple(size), mode="bilinear", align_corners=False)  # stays channels-last
            labels = full[0].permute(1, 2, 0).argmax(dim=-1).to(torch.uint8).numpy()  # [H_i, W_i]
        out.append(labels)
    return out


class _KeptBuffer:
    """One float32 buffer for a process, grown on demand and lent to one caller at a time."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.data: torch.Tensor | None = None

    def view(self, shape: tuple[int, ...]) -> torch.Tensor:
        """A contiguous ``shape`` view of the buffer; hold ``lock`` while it is in use."""
        size = math.prod(shape)
        if self.data is None or self.data.numel() < size:
            with torch.inference_mode(False):  # a plain tensor: written to inside inference mode and outside it
                self.data = torch.empty(size)
        return self.data[:size].view(shape)


_masks = _KeptBuffer()


def _class_scores(classes: torch.Tensor, mask_logits: torch.Tensor) -> torch.Tensor:
    """transformers' class scores for one image: every mask resized to REFERENCE_MASK_SIZE (bilinear), sigmoid,
    weighted by the class probabilities and summed over queries. [1, Q, C], [1, Q, h, w] -> [1, C, 384, 384].

    The resized masks are large (100 queries x 384 x 384 floats), beyond what malloc recycles, so a fresh tensor
    for them comes from the kernel page by page, which costs more than the resize itself. So they go into one buffer
    kept for the process (the same kernel, the same numbers)."""
    with _masks.lock:
        masks = _masks.view((*mask_logits.shape[:2], *REFERENCE_MASK_SIZE))
        torch.ops.aten.upsample_bilinear2d.out(mask_logits, list(REFERENCE_MASK_SIZE), False, None, None, out=masks)
        return torch.einsum("bqc, bqhw -> bchw", classes, masks.sigmoid_()).contiguous()


def _contiguous_inputs(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """The decoder's cross-attention gets (sequence, batch, channel) views of the pixel features. Under bf16
    autocast, a linear on such a view with batch > 1 runs as a batched matmul against a copy of its weight
    expanded per position (about 1 s per batch of 2 here); on a contiguous input it is one plain matmul."""
    args = tuple(a.contiguous() if torch.is_tensor(a) else a for a in args)
    return args, {k: v.contiguous() if torch.is_tensor(v) else v for k, v in kwargs.items()}


class _Logits(nn.Module):
    """The two tensors the post-processing reads, as a plain tuple: what a compiler traces."""

    def __init__(self, model: Mask2FormerForUniversalSegmentation):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model(pixel_values=pixel_values)
        return out.class_queries_logits, out.masks_queries_logits


class Mask2FormerPredictor(Predictor):
    name = "mask2former"
    num_classes = NUM_CLASSES

    def __init__(
        self,
        model: Mask2FormerForUniversalSegmentation,
        processor: Mask2FormerImageProcessorPil,
        precision: str = "fp32",
    ):
        self.model = model.eval() if model is not None else None  # None: a shell for a compiled runtime
        self.processor = processor
        size = processor.size
        self.input_size = (int(size["height"]), int(size["width"])) if "height" in size else self.input_size
        self.precision = self.checked_precision(precision)
        hooked = getattr(self.model, "_seg_contiguous_attention", False)
        if self.model is not None and self.precision == "bf16" and not hooked:
            for module in self.model.modules():
                if isinstance(module, nn.MultiheadAttention):
                    module.register_forward_pre_hook(_contiguous_inputs, with_kwargs=True)
            self.model._seg_contiguous_attention = True

    def preprocess(self, images: list[np.ndarray]) -> torch.Tensor:
        return self.processor(images=images, return_tensors="pt")["pixel_values"]  # [N, 3, h, w]

    @torch.inference_mode()
    def forward(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # bf16: autocast runs matmuls and convolutions in bfloat16 (about 1.7x here), softmax and sampling in fp32.
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            outputs = self.model(pixel_values=batch)
        return outputs.class_queries_logits.float(), outputs.masks_queries_logits.float()

    def exportable(self) -> nn.Module:
        return _Logits(self.model).eval()

    def from_compiled(self, outputs: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.from_numpy(outputs[0]), torch.from_numpy(outputs[1])

    @torch.inference_mode()
    def class_probabilities(self, outputs: tuple[torch.Tensor, torch.Tensor]) -> list[np.ndarray]:
        """transformers' class scores at REFERENCE_MASK_SIZE (what its post-processing resizes to the photo's
        size), each pixel's normalised over the classes."""
        class_logits, mask_logits = outputs
        classes = class_logits.float().softmax(dim=-1)[..., :-1]
        out = []
        for i in range(classes.shape[0]):
            scores = _class_scores(classes[i : i + 1], mask_logits[i : i + 1].float())[0]
            out.append((scores / scores.sum(dim=0, keepdim=True).clamp_min(1e-12)).numpy())
        return out

    @torch.inference_mode()
    def postprocess(self, outputs: tuple[torch.Tensor, torch.Tensor], sizes: list[tuple[int, int]]) -> list[np.ndarray]:
        return semantic_maps(*outputs, sizes)

    @torch.inference_mode()
    def outputs(self, outputs: tuple[torch.Tensor, torch.Tensor]) -> list[np.ndarray]:
        """transformers' class scores at REFERENCE_MASK_SIZE, (C, 384, 384) float32 per image: what
        :func:`semantic_maps` resizes to the photo's size, for a gateway that does that step (``scores-bilinear``)."""
        class_logits, mask_logits = outputs
        classes = class_logits.float().softmax(dim=-1)[..., :-1]
        return [_class_scores(classes[i : i + 1], mask_logits[i : i + 1].float())[0].numpy()
                for i in range(len(classes))]


# --- the architecture's side of the store and the import (segmentation.registry.Architecture) -------------------

def save(model: Mask2FormerForUniversalSegmentation, folder: Path, processor=None) -> None:
    model.save_pretrained(folder, safe_serialization=True)
    processor.save_pretrained(folder)


def load(folder: Path, metadata: dict, precision: str) -> Mask2FormerPredictor:
    return Mask2FormerPredictor(*load_pretrained(folder), precision=precision).fold_into(label_set_of(metadata))


def shell(folder: Path, metadata: dict) -> Mask2FormerPredictor:
    return Mask2FormerPredictor(None, load_processor(Path(folder))).fold_into(label_set_of(metadata))


def _loaded(model, processor, preset: str, label_set=None) -> Loaded:
    label_set = label_set or LABEL_SETS["superclass"]

    def make(precision: str) -> Mask2FormerPredictor:
        return Mask2FormerPredictor(model, processor, precision=precision).fold_into(label_set)

    params = sum(p.numel() for p in model.parameters())
    return Loaded(model, make, make("fp32").input_size, preset, params, processor=processor, label_set=label_set,
                  pipeline=processor_pipeline(processor))


def load_artifact(path: Path, pipeline, labels: str | None) -> Loaded:
    if not path.is_dir():
        raise ValueError("Mask2Former needs a save_pretrained folder, a zip of one, or a Hugging Face Hub id")
    model, processor = load_pretrained(path)
    id2label = model.config.id2label
    label_set = recognise_label_set(model.config.num_labels, [id2label[i] for i in sorted(id2label)], labels)
    return _loaded(model, processor, "custom", label_set)


SCHEDULE = Schedule(steps=260, batch_size=8, lr=4e-4)


def fit(model, processor, data, seed: int = 0) -> None:
    from ..training import batches, progress

    images, labels = data
    enc = processor(images=list(images), segmentation_maps=list(labels), return_tensors="pt")
    pixel_values, mask_labels, class_labels = enc["pixel_values"], enc["mask_labels"], enc["class_labels"]
    sched = SCHEDULE
    opt = torch.optim.AdamW(model.parameters(), lr=sched.lr, weight_decay=0.05)
    lr_at = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=sched.lr, total_steps=sched.steps, pct_start=0.1)
    model.train()
    with progress("mask2former", sched.steps) as bar:
        for idx in batches(len(images), sched, seed):
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


def train_demo(data) -> Loaded:
    model, processor = build_model("small"), build_processor(PRESETS["small"]["input_size"])
    fit(model, processor, data)
    return _loaded(model, processor, "small")


def build_full() -> Loaded:
    return _loaded(build_model("full"), build_processor(PRESETS["full"]["input_size"]), "full")
