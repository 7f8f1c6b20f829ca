"""Compiled runtimes (segmentation/runtimes.py): chosen at import by speed and agreement, served with a fallback."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

from segmentation import MODEL_NAMES, runtimes
from segmentation.samples import Samples

pytest.importorskip("openvino")
pytest.importorskip("onnxruntime")


def stored(name: str):
    import bentoml

    entry = bentoml.models.get(f"{name}:latest")
    return Path(entry.path), dict(entry.info.metadata)


def sample_images() -> list[np.ndarray]:
    samples = Samples()
    return [samples.image(i) for i in samples.ids()]


def labels(predictor, images) -> list[np.ndarray]:
    return [predictor.predict([image]).labels[0] for image in images]


def compiled_entry(name: str, folder: Path, precision: str = "fp32", backend: str = "openvino") -> tuple[Path, dict]:
    """A copy of the stored ``name`` served through ``backend`` in ``precision``: the import's own artifact where it
    chose that backend, else converted here as the import converts (the demo models are small, so which runtime is
    fastest for them can go either way)."""
    from segmentation.store import load_predictor

    path, meta = stored(name)
    shutil.copytree(path, folder)
    if meta["runtime"]["name"] != backend:
        predictor = load_predictor(name, path, meta, precision="fp32", native=True)
        artifact = runtimes.BACKENDS[backend].artifact
        runtimes.BACKENDS[backend].convert(predictor, folder / artifact)
        meta = {**meta, "runtime": {**meta["runtime"], "name": backend, "artifact": artifact}}
    meta["runtime"] = {**meta["runtime"], "precision": precision}
    return folder, meta


def artifact_folders(folder: Path) -> list[Path]:
    return [folder / Path(b.artifact).parent for b in runtimes.BACKENDS.values()
            if (folder / Path(b.artifact).parent).exists()]


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_the_import_records_what_it_measured_and_stores_the_chosen_artifact(demo_store, name):
    path, meta = stored(name)
    record = meta["runtime"]
    kinds = {(c["runtime"], c["precision"]) for c in record["candidates"]}
    assert ("native", "fp32") in kinds and ("openvino", "fp32") in kinds, record
    for backend in runtimes.BACKENDS:  # every backend measured, or its failure said
        assert any(c["runtime"] == backend for c in record["candidates"]) or any(
            f.startswith(f"{backend} conversion failed") for f in record["failures"]), record
    assert record["reason"]
    if record["name"] in runtimes.BACKENDS:
        chosen = next(c for c in record["candidates"] if (c["runtime"], c["precision"]) == (record["name"],
                                                                                            record["precision"]))
        floor = 0.999 if record["precision"] == "fp32" else 0.995
        assert chosen["batch_invariant"] and chosen["worst_image"] >= floor and chosen["agreement"] >= floor
        assert (path / record["artifact"]).is_file()
        assert artifact_folders(path) == [(path / record["artifact"]).parent]  # the chosen one's only
    else:
        assert artifact_folders(path) == []


# ONNX Runtime takes the PyTorch models; Mask2Former's export carries a float64 sampling grid its CPU kernels refuse
@pytest.mark.parametrize("name, backend", [(n, "openvino") for n in MODEL_NAMES] + [("unet", "onnxruntime")])
def test_the_compiled_runtime_labels_the_samples_as_the_native_model_does(demo_store, name, backend, tmp_path,
                                                                           caplog):
    from segmentation.store import load_predictor

    path, meta = compiled_entry(name, tmp_path / "entry", backend=backend)
    compiled = load_predictor(name, path, meta, precision="fp32")
    assert compiled.runtime == backend and isinstance(compiled.forward, runtimes.CompiledForward)
    assert "could not be used" not in caplog.text
    native = load_predictor(name, path, meta, precision="fp32", native=True)
    images = sample_images()
    ours, theirs = labels(compiled, images), labels(native, images)
    agreement = sum(int((a == b).sum()) for a, b in zip(ours, theirs)) / sum(a.size for a in ours)
    assert agreement >= runtimes.FP32_FLOOR, (name, agreement)
    batched = compiled.predict(images).labels  # and the same batched as alone
    assert all(np.array_equal(a, b) for a, b in zip(ours, batched))


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_the_runtime_the_import_chose_keeps_its_recorded_agreement(demo_store, name):
    from segmentation.store import load_predictor

    path, meta = stored(name)
    record = meta["runtime"]
    if record["name"] == "native":
        pytest.skip(f"{name}'s import chose the native path: {record['reason']}")
    served = load_predictor(name, path, meta)
    assert served.runtime == record["name"]
    native = load_predictor(name, path, meta, precision="fp32", native=True)
    images = sample_images()
    ours, theirs = labels(served, images), labels(native, images)
    agreement = sum(int((a == b).sum()) for a, b in zip(ours, theirs)) / sum(a.size for a in ours)
    floor = runtimes.FP32_FLOOR if served.precision == "fp32" else runtimes.REDUCED_FLOOR
    assert agreement >= floor, (name, served.precision, agreement)


def test_seg_runtime_native_serves_the_framework_path(demo_store, monkeypatch, tmp_path):
    from segmentation.store import load_predictor

    path, meta = compiled_entry("unet", tmp_path / "entry")
    monkeypatch.setenv("SEG_RUNTIME", "native")
    predictor = load_predictor("unet", path, meta)
    assert predictor.runtime == "native" and not isinstance(predictor.forward, runtimes.CompiledForward)
    images = sample_images()[:2]
    expected = load_predictor("unet", path, meta, native=True)
    assert all(np.array_equal(a, b) for a, b in zip(labels(predictor, images), labels(expected, images)))
    described = runtimes.describe("unet", meta, {"runtime": "native", "precision": predictor.precision})
    assert described["name"] == "native" and described["reason"] == "SEG_RUNTIME=native"
    assert described["chosen_at_import"] == "openvino"


@pytest.mark.parametrize("backend, damage", [("openvino", "truncated weights"), ("openvino", "garbled graph"),
                                             ("openvino", "missing"), ("onnxruntime", "truncated weights")])
def test_a_damaged_artifact_falls_back_to_native_with_a_log_line(demo_store, tmp_path, caplog, backend, damage):
    from segmentation.store import load_predictor

    copy, meta = compiled_entry("unet", tmp_path / "entry", backend=backend)
    graph = copy / meta["runtime"]["artifact"]
    if damage == "truncated weights":
        weights = graph.with_suffix(".bin") if backend == "openvino" else graph
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 3])
    elif damage == "garbled graph":
        graph.write_text(graph.read_text()[:500])
    else:
        shutil.rmtree(graph.parent)
    with caplog.at_level(logging.WARNING, logger="segmentation.runtimes"):
        predictor = load_predictor("unet", copy, meta)
    assert predictor.runtime == "native"
    lines = [r.getMessage() for r in caplog.records if "could not be used" in r.getMessage()]
    assert len(lines) == 1 and "unet" in lines[0] and "serving natively" in lines[0], caplog.text
    images = sample_images()[:2]
    expected = load_predictor("unet", copy, meta, native=True)
    assert all(np.array_equal(a, b) for a, b in zip(labels(predictor, images), labels(expected, images)))


def _unet_make():
    from segmentation.store import load_predictor

    path, meta = stored("unet")
    return lambda precision: load_predictor("unet", path, meta, precision=precision, native=True)


def test_a_conversion_that_fails_serves_natively_and_says_why(demo_store, tmp_path, monkeypatch, caplog):
    def broken(predictor, path):
        raise RuntimeError("unsupported operation: aten::frobnicate\nmore detail")

    for backend in runtimes.BACKENDS.values():
        monkeypatch.setattr(backend, "convert", broken)
    with caplog.at_level(logging.INFO, logger="segmentation.runtimes"):
        record = runtimes.choose("unet", _unet_make(), "fp32", tmp_path, images=sample_images()[:2])
    assert record["name"] == "native" and "aten::frobnicate" in record["reason"]
    assert all(f"{b} conversion failed" in record["reason"] for b in runtimes.BACKENDS)
    assert "\n" not in record["reason"]  # one line
    assert artifact_folders(tmp_path) == []
    assert any("serving native" in r.getMessage() and "frobnicate" in r.getMessage() for r in caplog.records)


def test_a_conversion_that_disagrees_is_not_chosen(demo_store, tmp_path, monkeypatch):
    real = runtimes.use_compiled

    def inverted(predictor, run, precision, runtime):  # a runtime whose answers are wrong
        predictor = real(predictor, run, precision, runtime)
        forward = predictor.forward
        predictor.forward = lambda batch: 1.0 - forward(batch)
        return predictor

    monkeypatch.setattr(runtimes, "use_compiled", inverted)
    record = runtimes.choose("unet", _unet_make(), "fp32", tmp_path, images=sample_images()[:2])
    assert record["name"] == "native" and "like native fp32 (needs" in record["reason"], record["reason"]
    assert artifact_folders(tmp_path) == []


def test_candidates_are_judged_by_their_precision_floor():
    exact = runtimes.Candidate("openvino", "fp32", 1.0, 0.9995, 0.9985, True, 1)
    reduced = runtimes.Candidate("openvino", "bf16", 1.0, 0.9995, 0.9985, True, 1)
    assert not exact.acceptable and reduced.acceptable  # held to the worst image, by precision
    assert not runtimes.Candidate("openvino", "bf16", 1.0, 0.999, 0.994, True, 1).acceptable
    assert not runtimes.Candidate("openvino", "bf16", 1.0, 1.0, 1.0, False, 2).acceptable


def test_on_a_cpu_without_bf16_the_native_baseline_is_the_fp32_it_would_serve(demo_store, tmp_path, monkeypatch):
    # Emulated bf16 is never served on such a CPU (serving_precision), so it must neither be raced nor be the
    # baseline a compiled runtime's speed-up is stated against; the recorded bf16 stays for a CPU that has it.
    monkeypatch.setattr(runtimes, "cpu_has_bf16", lambda: False)
    make, asked = _unet_make(), []
    record = runtimes.choose("unet", lambda p: asked.append(p) or make(p), "bf16", tmp_path,
                             images=sample_images()[:2])
    assert "bf16" not in asked
    assert {(c["runtime"], c["precision"]) for c in record["candidates"]} <= {
        ("native", "fp32"), ("openvino", "fp32"), ("onnxruntime", "fp32")}
    assert "no native bf16" in record["reason"] and "native bf16 forward" not in record["reason"]
    if record["name"] == "native":
        assert record["precision"] == "bf16"
    else:
        assert "the native fp32 forward" in record["reason"]
