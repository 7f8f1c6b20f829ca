"""Groundwork for issue #23: Mask2Former's forward through OpenVINO against eager PyTorch, on this CPU.

    .venv/bin/pip install openvino==2026.4.1      # not a dependency of the project yet
    .venv/bin/python benchmarks/openvino_probe.py [--preset full|demo] [--photos 4]

``full``: the published model's size with random weights (speed; its logits compared with PyTorch's); ``demo``: the
trained demo model from the store (label agreement on Cityscapes photos means something there). Converts the model
with ``openvino.convert_model`` (traced on one processed photo), compiles it for the CPU with an f32 and a bf16
inference-precision hint, and logs seconds per image at batch 1 (median of 5), the speed-up over PyTorch fp32, and
per photo the share of pixels whose label (transformers' post-processing) equals PyTorch's.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from segmentation.models.mask2former import PRESETS, build_model, build_processor, load_pretrained  # noqa: E402
from segmentation.models.mask2former import semantic_maps  # noqa: E402

log = logging.getLogger("openvino_probe")


class Outputs(torch.nn.Module):
    """The two tensors transformers' post-processing reads, as a plain tuple for tracing."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pixel_values):
        out = self.model(pixel_values=pixel_values)
        return out.class_queries_logits, out.masks_queries_logits


def seconds_per_call(fn, x, runs: int = 5) -> float:
    fn(x)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    import openvino as ov

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=("full", "demo"), default="full")
    ap.add_argument("--photos", type=int, default=4)
    args = ap.parse_args()
    torch.set_num_threads(len(__import__("os").sched_getaffinity(0)))
    if args.preset == "demo":
        import bentoml

        model, processor = load_pretrained(Path(bentoml.models.get("mask2former:latest").path))
    else:
        model, processor = build_model("full"), build_processor(PRESETS["full"]["input_size"])
    net = Outputs(model.eval())
    photos = sorted((ROOT.parent / "shared" / "cityscapes-sample" / "images").glob("*.png"))[: args.photos]
    images = [np.asarray(Image.open(p).convert("RGB")) for p in photos]
    x = processor(images=images[:1], return_tensors="pt")["pixel_values"]
    with torch.inference_mode():
        native = seconds_per_call(net, x)
    log.info("%s: PyTorch fp32, batch 1: %.3f s per image", args.preset, native)
    t = time.perf_counter()
    converted = ov.convert_model(net, example_input=x)
    log.info("converted in %.1f s", time.perf_counter() - t)
    for hint in ("f32", "bf16"):
        compiled = ov.Core().compile_model(converted, "CPU", {"INFERENCE_PRECISION_HINT": hint})
        request = compiled.create_infer_request()
        took = seconds_per_call(lambda b: request.infer({0: b.numpy()}), x)
        agreement, worst_logit = [], 0.0
        for image in images:
            xi = processor(images=[image], return_tensors="pt")["pixel_values"]
            with torch.inference_mode():
                classes, masks = net(xi)
            result = request.infer({0: xi.numpy()})
            ov_classes, ov_masks = torch.from_numpy(result[0]), torch.from_numpy(result[1])
            worst_logit = max(worst_logit, float((ov_classes - classes).abs().max()))
            size = [image.shape[:2]]
            agreement.append(float((semantic_maps(classes, masks, size)[0] == semantic_maps(ov_classes, ov_masks,
                                                                                             size)[0]).mean()))
        log.info("OpenVINO %s: %.3f s per image (%.2fx); labels equal to PyTorch's per photo %s; largest class-logit "
                 "difference %.2g", hint, took, native / took, [round(a, 5) for a in agreement], worst_logit)


if __name__ == "__main__":
    main()
