"""Mask2Former in OpenVINO with part of the network in bf16 and the rest in fp32: does keeping one part in full
precision bring bf16's labels within the agreement floor (segmentation/runtimes.py)?

The converted network is cut where the nodes whose names match a pattern hand tensors on to the others; each part
is compiled in its own precision, and an image runs through one then the other. Labels are compared with the
native fp32 forward's on the import's measuring images (data samples, held-out scenes, the Cityscapes photos).

Usage: BENTOML_HOME=<store with a trained Mask2Former> .venv/bin/python benchmarks/openvino_split.py
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
import tempfile
from pathlib import Path

import numpy as np
import openvino as ov

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from segmentation import runtimes  # noqa: E402
from segmentation.precision import label_agreement  # noqa: E402

log = logging.getLogger("openvino_split")
CONFIG = {"PERFORMANCE_HINT": "LATENCY", "ENABLE_CPU_PINNING": False}  # as runtimes.OpenVINO.load compiles
HINTS = {"fp32": "f32", "bf16": "bf16"}
# label: (the first part's node-name pattern, its precision, the rest's precision); no pattern: one network
VARIANTS = {
    "all bf16": (None, "bf16", None),
    "all fp32": (None, "fp32", None),
    "Swin encoder bf16, rest fp32": (r"pixel_level_module\.encoder", "bf16", "fp32"),
    "Swin encoder fp32, rest bf16": (r"pixel_level_module\.encoder", "fp32", "bf16"),
    "pixel module bf16, transformer decoder fp32": (r"pixel_level_module", "bf16", "fp32"),
}


def cut(xml: Path, pattern: str) -> tuple[ov.Model, ov.Model]:
    """(the nodes matching ``pattern`` up to the tensors they hand on, the rest from those tensors as inputs)."""
    rx = re.compile(pattern)
    core = ov.Core()

    def boundary(model: ov.Model) -> list:
        found = []
        for op in model.get_ordered_ops():
            if op.get_type_name() in ("Constant", "Parameter") or not rx.search(op.get_friendly_name()):
                continue
            for out in op.outputs():
                consumers = [t for t in out.get_target_inputs() if not rx.search(t.get_node().get_friendly_name())]
                if consumers:
                    found.append((out, consumers))
        return found

    first = core.read_model(str(xml))
    head = ov.Model([out for out, _ in boundary(first)], first.get_parameters(), "first")
    rest = core.read_model(str(xml))  # a second copy: its edges are rewired
    inputs = []
    for out, consumers in boundary(rest):
        parameter = ov.opset13.parameter(out.get_partial_shape(), out.get_element_type())
        for target in consumers:
            target.replace_source_output(parameter.output(0))
        inputs.append(parameter)
    log.info("cut at %d tensors", len(inputs))
    return head, ov.Model(rest.get_results(), inputs, "rest")


def forward(xml: Path, pattern: str | None, first: str, rest: str | None):
    if pattern is None:
        return runtimes.OpenVINO.load(xml, first, None)  # one network, as served
    core = ov.Core()
    head, tail = cut(xml, pattern)
    a = core.compile_model(head, "CPU", {**CONFIG, "INFERENCE_PRECISION_HINT": HINTS[first]})
    b = core.compile_model(tail, "CPU", {**CONFIG, "INFERENCE_PRECISION_HINT": HINTS[rest]})

    def run(image: np.ndarray) -> list[np.ndarray]:
        handed = a.create_infer_request().infer({0: image})
        result = b.create_infer_request().infer({i: handed[o] for i, o in enumerate(a.outputs)})
        return [result[o] for o in b.outputs]

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", action="append", choices=sorted(VARIANTS), help="default: all of them")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    import bentoml

    from segmentation.store import load_predictor

    stored = bentoml.models.get("mask2former:latest")
    metadata = dict(stored.info.metadata)

    def make() -> object:
        return load_predictor("mask2former", Path(stored.path), metadata, precision="fp32", native=True)

    fp32 = make()
    images = runtimes.measuring_images()
    reference = [fp32.predict([image]).labels[0] for image in images]
    folder = tempfile.TemporaryDirectory(prefix="m2f-split-")
    xml = Path(folder.name) / runtimes.OpenVINO.artifact
    runtimes.OpenVINO.convert(fp32, xml)
    log.info("| parts | ms per image | agreement | worst image | batch-invariant |\n|---|---|---|---|---|")
    for label in args.variant or VARIANTS:
        predictor = runtimes.use_compiled(make(), forward(xml, *VARIANTS[label]), "bf16", "openvino")
        alone = [predictor.predict([image]).labels[0] for image in images]
        batched = [labels for i in range(0, len(images), 2) for labels in predictor.predict(images[i : i + 2]).labels]
        invariant = all(np.array_equal(a, b) for a, b in zip(alone, batched))
        ms = runtimes._ms_per_image(predictor.forward, predictor.preprocess([images[0]]), runs=7, seconds=3.0)
        worst = min(label_agreement([a], [b]) for a, b in zip(reference, alone))
        log.info("| %s | %.2f | %.4f %% | %.4f %% | %s |", label, ms, 100 * label_agreement(reference, alone),
                 100 * worst, "yes" if invariant else "no")
    folder.cleanup()


if __name__ == "__main__":
    main()
