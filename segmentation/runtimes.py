"""Compiled runtimes: a stored model's forward pass through OpenVINO or ONNX Runtime, chosen at import by speed and
agreement.

The native artifact (``model.keras``, the ``save_pretrained`` folder, ``model.safetensors``) stays the source of
truth. At import, :func:`choose` converts the model's network for each backend (OpenVINO: ``openvino.convert_model``
from the PyTorch module, the transformers model or the Keras model itself; ONNX Runtime: ``torch.onnx.export`` for
the PyTorch ones), loads it for this CPU in fp32 and, where the backend and the CPU offer it, bf16, and measures each
candidate against the native path: time per image at the model's best batch, the share of pixels whose served label
equals native fp32's (on the samples in ``data/``, held-out generated scenes and the Cityscapes photos in
``../shared/cityscapes-sample`` where present), and whether an image's labels are the same batched as alone. Of the
candidates, native ones included, the fastest that keeps ``FP32_FLOOR`` (fp32) or ``REDUCED_FLOOR`` (bf16) of the
pixels of every image and is batch-invariant is chosen: a compiled one is recorded as the model's ``runtime`` and
its artifact (``openvino/model.xml`` + ``.bin``, or ``onnx/model.onnx``) stored next to the native one; otherwise the
model is served natively, in the precision that kept the answers, and the record says why.

At serving time :func:`attach` swaps the predictor's forward for the compiled one; preprocessing and
post-processing stay the predictor's own, so the answers go through the same steps. ``SEG_RUNTIME=native``
serves the native path; an artifact that cannot be read or compiled is logged in one line and the model is served
natively. Where a compiled runtime serves, the framework's network is never loaded: the predictor is a shell
(``Architecture.shell``) with its pre- and post-processing only; the native model is loaded when the artifact
cannot be used.
"""

from __future__ import annotations

import logging
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .precision import AGREEMENT_FLOOR, cpu_has_bf16, label_agreement, serving_precision
from .settings import settings

log = logging.getLogger(__name__)

FP32_FLOOR = 0.999  # a full-precision runtime must label (nearly) every pixel as the native fp32 path does
REDUCED_FLOOR = AGREEMENT_FLOOR  # bf16 may move a few border pixels, as the native bf16 path may
PHOTOS = Path(__file__).resolve().parents[2] / "shared" / "cityscapes-sample" / "images"


@dataclass
class Candidate:
    runtime: str
    precision: str
    ms_per_image: float
    agreement: float  # share of pixels labelled as native fp32 labels them, over all images
    worst_image: float  # the same share on the image where it is lowest: what the floor holds to
    batch_invariant: bool
    batch: int  # the batch size its speed was measured at (the best of 1 and the model's batch)

    @property
    def floor(self) -> float:
        return FP32_FLOOR if self.precision == "fp32" else REDUCED_FLOOR

    @property
    def acceptable(self) -> bool:
        return self.worst_image >= self.floor and self.batch_invariant


# --- the backends: converting a predictor's network, and running it ------------------------------------------

def _example(predictor) -> np.ndarray:
    """One preprocessed image: what a network is traced on. Static shapes: a compiler builds faster kernels for a
    fixed batch of one than for a dynamic batch (`make bench`), and an image then meets the same kernels whatever
    its batch."""
    return _as_array(predictor.preprocess([np.zeros((*predictor.input_size, 3), np.uint8)]))


def _as_array(batch: Any) -> np.ndarray:
    return np.ascontiguousarray(batch.numpy() if hasattr(batch, "numpy") else np.asarray(batch), dtype=np.float32)


class OpenVINO:
    name = "openvino"
    artifact = "openvino/model.xml"  # + model.bin

    @staticmethod
    def precisions() -> tuple[str, ...]:
        return ("fp32", "bf16") if cpu_has_bf16() else ("fp32",)

    @staticmethod
    def version() -> str:
        import openvino as ov

        return ov.__version__

    @staticmethod
    def convert(predictor, path: Path) -> None:
        """From the PyTorch module, the transformers model or the Keras model itself (``predictor.exportable()``)."""
        import openvino as ov

        example = _example(predictor)
        model = ov.convert_model(predictor.exportable(), example_input=example)
        model.reshape({model.inputs[0]: list(example.shape)})
        path.parent.mkdir(parents=True, exist_ok=True)
        ov.save_model(model, str(path), compress_to_fp16=False)  # the weights as they are

    @staticmethod
    def load(path: Path, precision: str, threads: int | None) -> Callable[[np.ndarray], list[np.ndarray]]:
        import openvino as ov

        # Not pinned to cores (OpenVINO 2026.4 pins by default): two single-threaded processes were pinned to the
        # same core, and a pinned thread cannot step aside from the gateway's work on its core.
        config = {"INFERENCE_PRECISION_HINT": {"fp32": "f32", "bf16": "bf16"}[precision], "PERFORMANCE_HINT": "LATENCY",
                  "ENABLE_CPU_PINNING": False}
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        compiled = ov.Core().compile_model(str(path), "CPU", config)

        def run(image: np.ndarray) -> list[np.ndarray]:
            result = compiled.create_infer_request().infer({0: image})  # its own buffers: calls may overlap
            return [result[output] for output in compiled.outputs]

        return run


class ONNXRuntime:
    name = "onnxruntime"
    artifact = "onnx/model.onnx"

    @staticmethod
    def precisions() -> tuple[str, ...]:
        return ("fp32",)  # used as exported: it has no switch like OpenVINO's precision hint

    @staticmethod
    def version() -> str:
        import onnxruntime

        return onnxruntime.__version__

    @staticmethod
    def convert(predictor, path: Path) -> None:
        """PyTorch modules through ``torch.onnx.export`` (TorchScript tracing); Keras has no converter here."""
        import torch

        network = predictor.exportable()
        if not isinstance(network, torch.nn.Module):
            raise NotImplementedError(f"no ONNX converter for a {type(network).__module__} model in this project")
        path.parent.mkdir(parents=True, exist_ok=True)
        with torch.inference_mode(False), torch.no_grad():
            torch.onnx.export(network, (torch.from_numpy(_example(predictor)),), str(path), dynamo=False,
                              opset_version=17, input_names=["input"])

    @staticmethod
    def load(path: Path, precision: str, threads: int | None) -> Callable[[np.ndarray], list[np.ndarray]]:
        import onnxruntime

        if precision != "fp32":
            raise ValueError(f"ONNX Runtime serves fp32 only, not {precision}")
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = int(threads or 0)  # 0: its default, a thread per core
        options.inter_op_num_threads = 1
        session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        return lambda image: session.run(None, {name: image})


BACKENDS = {b.name: b for b in (OpenVINO, ONNXRuntime)}


class CompiledForward:
    """A predictor's ``forward`` through a compiled network of one image: the framework batch in, image by image,
    what the native forward returns out (``predictor.from_compiled``)."""

    def __init__(self, run: Callable[[np.ndarray], list[np.ndarray]], adapt: Callable[[list[np.ndarray]], Any]):
        self.run = run
        self.adapt = adapt

    def __call__(self, batch: Any) -> Any:
        images = _as_array(batch)
        results = [self.run(images[i : i + 1]) for i in range(len(images))]
        return self.adapt([np.concatenate(outputs) for outputs in zip(*results)])


def use_compiled(predictor, run: Callable[[np.ndarray], list[np.ndarray]], precision: str, runtime: str):
    """``predictor`` with its forward replaced by ``run``, a compiled network of one image. Returns the predictor."""
    predictor.forward = CompiledForward(run, predictor.from_compiled)
    predictor.precision = precision
    predictor.runtime = runtime
    return predictor


# --- measuring at import ------------------------------------------------------------------------------------

def measuring_images() -> list[np.ndarray]:
    """What the runtimes are compared on: the samples in data/, held-out generated scenes and, where present, the
    Cityscapes photos beside the project."""
    from PIL import Image

    from .samples import Samples
    from .training import HELDOUT_SEEDS, scene_data

    samples = Samples()
    images = [samples.image(i) for i in samples.ids()]
    images += list(scene_data(HELDOUT_SEEDS[:4])[0])
    images += [np.asarray(Image.open(p).convert("RGB")) for p in sorted(PHOTOS.glob("*.png"))]
    return images


def _ms_per_image(forward: Callable[[Any], Any], batch: Any, runs: int = 5, seconds: float = 1.0) -> float:
    """Median milliseconds per image of ``forward(batch)``: at least ``runs`` calls and ``seconds`` of them, so a
    small model's few-millisecond forward is timed over enough calls to rise above the machine's noise."""
    forward(batch)  # warm-up: first-call allocations and kernel selection
    times: list[float] = []
    while len(times) < runs or sum(times) < seconds:
        t = time.perf_counter()
        forward(batch)
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3 / len(batch)


def _measure(runtime: str, precision: str, predictor, images: Sequence[np.ndarray], reference: list[np.ndarray],
             batch_sizes: Sequence[int]) -> Candidate:
    alone = [predictor.predict([image]).labels[0] for image in images]
    n = max(batch_sizes)
    batched = [labels for i in range(0, len(images), n) for labels in predictor.predict(list(images[i : i + n])).labels]
    invariant = all(np.array_equal(a, b) for a, b in zip(alone, batched))
    speeds = {n: _ms_per_image(predictor.forward, predictor.preprocess([images[0]] * n)) for n in batch_sizes}
    best = min(speeds, key=speeds.get)
    worst = min(label_agreement([a], [b]) for a, b in zip(reference, alone))
    return Candidate(runtime, precision, round(speeds[best], 2), round(label_agreement(reference, alone), 6),
                     round(worst, 6), invariant, best)


def choose(name: str, make: Callable[[str], Any], native_precision: str, folder: Path,
           images: Sequence[np.ndarray] | None = None, batch: int = 2) -> dict:
    """Convert, measure and choose the runtime of the model ``make(precision)`` builds predictors of; write the
    chosen backend's artifact into ``folder`` (at its ``artifact`` path). Returns the ``runtime`` record for the
    model's metadata. Never raises for a conversion that fails or disagrees: the record says native, and why."""
    images = list(images if images is not None else measuring_images())
    sizes = sorted({1, max(1, batch)})
    fp32 = make("fp32")
    reference = [fp32.predict([image]).labels[0] for image in images]
    candidates = [_measure("native", "fp32", fp32, images, reference, sizes)]
    # Raced in the precision this CPU would serve: emulated bf16 is never served, so timing it is no baseline.
    native_here = _on_this_cpu(native_precision)
    if native_here != "fp32":
        candidates.append(_measure("native", native_here, make(native_here), images, reference, sizes))
    native = candidates[-1]  # what would be served here without a compiled runtime
    failures, conversion_s = [], {}
    staging = Path(tempfile.mkdtemp(prefix=f"{name}-convert-"))
    try:
        for backend in BACKENDS.values():
            try:
                t0 = time.perf_counter()
                backend.convert(fp32, staging / backend.artifact)
                conversion_s[backend.name] = round(time.perf_counter() - t0, 1)
                for precision in backend.precisions():
                    predictor = use_compiled(make("fp32"), backend.load(staging / backend.artifact, precision, None),
                                             precision, backend.name)
                    candidates.append(_measure(backend.name, precision, predictor, images, reference, sizes))
            except Exception as e:  # noqa: BLE001 - a backend that cannot take this model is left out, saying why
                first = _one_line(e)
                failures.append(f"{backend.name} conversion failed ({type(e).__name__}: {first})")
                log.info("%s: %s", name, failures[-1])
        # the fastest candidate that keeps the answers; the native path when that is a native one, or none does
        eligible = [c for c in candidates if c.acceptable]
        best = min(eligible, key=lambda c: c.ms_per_image) if eligible else None
        # native: in the precision that keeps the answers (fp32 where bf16 moves too many pixels of some image);
        # bf16 that this CPU could not race stays recorded, for a CPU that has it
        raced = best is not None and native_here == native_precision
        record: dict[str, Any] = {"name": "native", "precision": best.precision if raced else native_precision}
        if best is not None and best.runtime != "native":
            backend = BACKENDS[best.runtime]
            shutil.copytree((staging / backend.artifact).parent, (folder / backend.artifact).parent)
            record = {"name": best.runtime, "precision": best.precision, "artifact": backend.artifact,
                      "version": backend.version()}
            reason = (f"{best.runtime} {best.precision}: {native.ms_per_image / best.ms_per_image:.2f}x the native "
                      f"{native.precision} forward, labels {best.agreement:.4%} like native fp32 (worst image "
                      f"{best.worst_image:.4%}), batch-invariant")
            if not native.acceptable:
                reason += f" (native {native.precision} is not: {_why_not(native, best)})"
        else:
            others = [_why_not(c, best or native) for c in candidates if c is not best]
            reason = f"native {record['precision']}: " + "; ".join(others + failures)
        if native_here != native_precision:
            reason += f" (this CPU has no native {native_precision}: natively it runs {native_here})"
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("%s: serving %s (%s)", name, reason.split(":")[0], reason)
    return {**record, "reason": reason, "conversion_s": conversion_s, "failures": failures,
            "candidates": [asdict(c) for c in candidates]}


def _one_line(e: Exception, limit: int = 300) -> str:
    """An exception's message on one line (OpenVINO's start with a source location and put the reason below)."""
    return " ".join(str(e).split())[:limit]


def _why_not(c: Candidate, best: Candidate) -> str:
    what = f"{c.runtime} {c.precision}"
    if not c.batch_invariant:
        return f"{what} labels an image differently batched and alone"
    if c.worst_image < c.floor:
        return f"{what} labels {c.worst_image:.4%} of an image's pixels like native fp32 (needs {c.floor:.1%})"
    return f"{what} is slower ({c.ms_per_image} against {best.ms_per_image} ms per image)"


# --- serving ------------------------------------------------------------------------------------------------

def recorded(metadata: dict) -> dict:
    """The runtime and precision a stored model is to be served in: native if ``SEG_RUNTIME=native`` or its import
    chose no compiled runtime, else that one; the precision as recorded, unless ``SEG_PRECISION`` or the CPU say
    otherwise."""
    record = metadata.get("runtime") or {}
    if settings().runtime == "native" or record.get("name", "native") == "native":
        return {"runtime": "native", "precision": serving_precision(metadata.get("precision"))}
    precision = settings().precision or record.get("precision", "fp32")
    return {"runtime": record["name"], "precision": _on_this_cpu(precision)}


def measured_seconds_per_image(metadata: dict) -> float | None:
    """Seconds per image of the forward a stored model is served in (:func:`recorded`), as its import measured it
    on the importing CPU; None where the import measured no such candidate."""
    served = recorded(metadata)
    for c in (metadata.get("runtime") or {}).get("candidates", []):
        if (c.get("runtime"), c.get("precision")) == (served["runtime"], served["precision"]):
            return c["ms_per_image"] / 1e3
    return None


def _on_this_cpu(precision: str) -> str:
    """bf16 only where the CPU computes it natively; elsewhere fp32 (emulated bf16 would be slower)."""
    return "fp32" if precision == "bf16" and not cpu_has_bf16() else precision


def describe(name: str, metadata: dict, served: dict) -> dict:
    """What ``/models`` says of a model's runtime: the one serving (``served``, from its process), the one its
    import chose, why, and what was measured."""
    record = metadata.get("runtime") or {"name": "native", "reason": "imported before compiled runtimes existed"}
    reason = record.get("reason")
    if served["runtime"] != record["name"]:
        reason = ("SEG_RUNTIME=native" if settings().runtime == "native"
                  else f"the {record['name']} artifact could not be used: the {name} model's log says why")
    return {"name": served["runtime"], "precision": served["precision"], "chosen_at_import": record["name"],
            "reason": reason, "candidates": record.get("candidates", [])}


def attach(name: str, predictor, folder: Path, metadata: dict, threads: int | None = None,
           precision: str | None = None):
    """``predictor`` (a shell or a native one) switched to the compiled runtime its import chose, unless
    ``SEG_RUNTIME=native``, in ``precision`` if given (else as recorded); an artifact that cannot be used leaves it
    as it was (``runtime`` native), with one log line saying why. Returns the predictor."""
    predictor.runtime = "native"
    wanted = recorded(metadata)
    if wanted["runtime"] == "native":
        return predictor
    if precision is not None:
        wanted["precision"] = _on_this_cpu(precision)
    artifact = metadata["runtime"].get("artifact")
    try:
        run = BACKENDS[wanted["runtime"]].load(Path(folder) / artifact, wanted["precision"], threads)
    except Exception as e:  # noqa: BLE001 - a corrupt or missing artifact, or no such backend: serve natively
        first = _one_line(e)
        log.warning("%s: the %s artifact %s could not be used (%s: %s); serving natively", name,
                    wanted["runtime"], artifact, type(e).__name__, first)
        return predictor
    return use_compiled(predictor, run, wanted["precision"], wanted["runtime"])
