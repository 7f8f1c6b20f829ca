"""The BentoML model store: what each stored model's metadata holds; saving and loading go through the model's
architecture (``segmentation.registry``), in its native format: ``model.keras`` for DilatedNet, a
``save_pretrained`` folder (safetensors) for Mask2Former, ``model.safetensors`` (the state_dict) for UNet.
``bentoml models get NAME:latest`` shows the metadata.
"""

from __future__ import annotations

import importlib.metadata
import logging
from pathlib import Path
from typing import Any

from . import runtimes
from .classes import LABEL_SETS, binary_table, multiclass_table
from .models.base import Predictor
from .precision import serving_precision
from .preprocessing import Normalization, Pipeline
from .registry import spec

log = logging.getLogger(__name__)

IMPORT_HINT = "python import_models.py --demo"


def framework_versions(name: str) -> dict[str, str]:
    out = {}
    for pkg in spec(name).packages:
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def build_metadata(name: str, *, preset: str, input_size: tuple[int, int], source: str, source_sha256: str,
                   demo: bool, metrics: dict | None = None, foreground: str | None = None,
                   normalization: Normalization | None = None, parameters: int | None = None,
                   precision: str = "fp32", bf16_agreement: float | None = None,
                   bf16_batch_invariant: bool | None = None, pipeline: Pipeline | None = None,
                   label_set: str = "superclass") -> dict[str, Any]:
    framework = spec(name).framework
    binary = spec(name).task == "binary"
    table = binary_table(foreground or "foreground") if binary else multiclass_table()
    return {
        "task": "binary" if binary else "multiclass",
        "classes": [c.name for c in table],
        "palette": [list(c.color) for c in table],
        "input_size": list(input_size),
        "preset": preset,
        "source": source,
        "source_sha256": source_sha256,
        "framework": framework,
        "framework_versions": framework_versions(name),
        "demo": demo,
        "metrics": metrics or {},
        "normalization": (normalization or Normalization()).as_dict(),
        **({"pipeline": recorded.as_dict()} if (recorded := pipeline or spec(name).pipeline) else {}),
        # what the model itself predicts; served in the superclasses through LABEL_SETS' table
        **({"label_set": label_set, "model_classes": list(LABEL_SETS[label_set].classes)} if not binary else {}),
        "parameters": parameters,
        "precision": precision,  # what the forward pass runs in where the CPU allows (segmentation/precision.py)
        # measured at import: fraction of pixels bf16 labels like fp32; bf16 labels an image alike alone and batched
        **({"bf16_agreement": bf16_agreement} if bf16_agreement is not None else {}),
        **({"bf16_batch_invariant": bf16_batch_invariant} if bf16_batch_invariant is not None else {}),
        **({"threshold": 0.5, "foreground": foreground} if binary else {}),
    }


def save(name: str, model: Any, metadata: dict, processor: Any = None, compiled: Path | None = None):
    """Write ``model`` into a new store entry, in its architecture's native format, with the compiled runtime's
    artifact from the folder ``compiled`` beside it (segmentation/runtimes.py). Any exception inside leaves the
    store as it was."""
    import shutil

    import bentoml

    labels = {"framework": metadata["framework"], "preset": metadata["preset"], "demo": str(metadata["demo"]).lower()}
    architecture = spec(name).architecture
    with bentoml.models.create(name, labels=labels, metadata=metadata) as bento_model:
        architecture.save(model, Path(bento_model.path), processor)
        if compiled is not None:
            shutil.copytree(compiled, Path(bento_model.path), dirs_exist_ok=True)
    log.info("saved %s to the model store", bento_model.tag)
    return bento_model


def load_predictor(name: str, path: Path, metadata: dict, precision: str | None = None, native: bool = False,
                   threads: int | None = None) -> Predictor:
    """A stored model's folder and metadata -> a ready predictor (imports only that model's framework), its forward
    through the compiled runtime its import chose unless ``native`` (or ``SEG_RUNTIME=native``); the native model
    is loaded only where no compiled one serves, or its artifact cannot be used (segmentation/runtimes.py says why).

    ``precision`` defaults to :func:`serving_precision` of the one recorded at import (fp32 for older entries); given,
    it is the compiled runtime's precision too."""
    architecture = spec(name).architecture
    if not native and runtimes.recorded(metadata)["runtime"] != "native" and hasattr(architecture, "shell"):
        compiled = runtimes.attach(name, architecture.shell(Path(path), metadata), Path(path), metadata, threads,
                                   precision)
        if compiled.runtime != "native":
            return compiled  # the framework's weights are never loaded
    predictor = architecture.load(Path(path), metadata, precision or serving_precision(metadata.get("precision")))
    predictor.runtime = "native"
    return predictor


def legend(metadata: dict) -> list[dict]:
    """The classes of a stored model, with names and colours."""
    return [
        {"id": i, "name": n, "color": list(c)} for i, (n, c) in enumerate(zip(metadata["classes"], metadata["palette"]))
    ]


def save_ensemble(metadata: dict):
    """A store entry for the ensemble: no weights of its own, its members' tags, blend weights and scores in the
    metadata (``bentoml models get ensemble:latest``)."""
    import bentoml

    labels = {"framework": "ensemble", "demo": str(metadata["demo"]).lower()}
    with bentoml.models.create("ensemble", labels=labels, metadata=metadata) as bento_model:
        Path(bento_model.path, "members.txt").write_text(
            "\n".join(f"{m} {tag}" for m, tag in metadata["members"].items()) + "\n"
        )
    log.info("saved %s to the model store", bento_model.tag)
    return bento_model


def ensemble_metadata(members: dict[str, str], weights: dict[str, float], metrics: dict, demo: bool) -> dict:
    table = multiclass_table()
    return {
        "task": "multiclass",
        "classes": [c.name for c in table],
        "palette": [list(c.color) for c in table],
        "framework": "ensemble",
        "members": members,
        "weights": weights,
        "metrics": metrics,
        "demo": demo,
    }
