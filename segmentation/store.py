"""The BentoML model store: what each stored model holds, how it is saved in its native format, how it loads.

Layout of a stored model (``bentoml models get NAME:latest`` shows the metadata):
- dilatednet: ``model.keras``
- mask2former: a ``save_pretrained`` folder of model (safetensors) and image processor
- unet: ``model.safetensors`` (the state_dict)
"""

from __future__ import annotations

import importlib.metadata
import logging
from pathlib import Path
from typing import Any

from . import MODEL_NAMES
from .classes import LABEL_SETS, binary_table, multiclass_table
from .models.base import Predictor
from .precision import serving_precision
from .preprocessing import Normalization, Pipeline

log = logging.getLogger(__name__)

FRAMEWORKS = {"dilatednet": "keras", "mask2former": "transformers", "unet": "pytorch"}
_PACKAGES = {"keras": ("keras", "tensorflow-cpu"), "transformers": ("transformers", "torch"), "pytorch": ("torch",)}
ARTIFACT_FILES = {"dilatednet": "model.keras", "unet": "model.safetensors", "mask2former": "config.json"}
IMPORT_HINT = "python import_models.py --demo"


def default_pipeline(name: str) -> Pipeline | None:
    """The reference pipeline's resize filter and upsampling for ``name`` (None: Mask2Former's processor does both)."""
    if name == "dilatednet":
        from .models.dilatednet import REFERENCE_PIPELINE
    elif name == "unet":
        from .models.unet import REFERENCE_PIPELINE
    else:
        return None
    return REFERENCE_PIPELINE


def pipeline_of(name: str, metadata: dict) -> Pipeline | None:
    """The stored model's pipeline: what its import recorded, the reference's for what it did not."""
    default = default_pipeline(name)
    return Pipeline.from_dict(metadata.get("pipeline"), default) if default else None


def framework_versions(framework: str) -> dict[str, str]:
    out = {}
    for pkg in _PACKAGES[framework]:
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
    framework = FRAMEWORKS[name]
    binary = name == "unet"
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
        "framework_versions": framework_versions(framework),
        "demo": demo,
        "metrics": metrics or {},
        "normalization": (normalization or Normalization()).as_dict(),
        **({"pipeline": (pipeline or default_pipeline(name)).as_dict()} if default_pipeline(name) else {}),
        # what the model itself predicts; served in the superclasses through LABEL_SETS' table
        **({"label_set": label_set, "model_classes": list(LABEL_SETS[label_set].classes)} if not binary else {}),
        "parameters": parameters,
        "precision": precision,  # what the forward pass runs in where the CPU allows (segmentation/precision.py)
        # measured at import: fraction of pixels bf16 labels like fp32; bf16 labels an image alike alone and batched
        **({"bf16_agreement": bf16_agreement} if bf16_agreement is not None else {}),
        **({"bf16_batch_invariant": bf16_batch_invariant} if bf16_batch_invariant is not None else {}),
        **({"threshold": 0.5, "foreground": foreground} if binary else {}),
    }


def save(name: str, model: Any, metadata: dict, processor: Any = None):
    """Write ``model`` into a new store entry. Any exception inside leaves the store as it was."""
    import bentoml

    if name not in MODEL_NAMES:
        raise ValueError(f"unknown model {name!r}; expected one of {MODEL_NAMES}")
    labels = {"framework": metadata["framework"], "preset": metadata["preset"], "demo": str(metadata["demo"]).lower()}
    with bentoml.models.create(name, labels=labels, metadata=metadata) as bento_model:
        if name == "dilatednet":
            model.save(bento_model.path_of(ARTIFACT_FILES[name]))
        elif name == "unet":
            from safetensors.torch import save_file

            save_file(
                {k: v.contiguous() for k, v in model.state_dict().items()}, bento_model.path_of(ARTIFACT_FILES[name])
            )
        else:
            model.save_pretrained(bento_model.path, safe_serialization=True)
            processor.save_pretrained(bento_model.path)
    log.info("saved %s to the model store", bento_model.tag)
    return bento_model


def load_predictor(name: str, path: Path, metadata: dict, precision: str | None = None) -> Predictor:
    """A stored model's folder and metadata -> a ready predictor (imports only that model's framework).

    ``precision`` defaults to :func:`serving_precision` of the one recorded at import (fp32 for older entries)."""
    path = Path(path)
    norm = Normalization.from_dict(metadata.get("normalization"))
    precision = precision or serving_precision(metadata.get("precision"))
    if name == "dilatednet":
        from .models.dilatednet import DilatedNetPredictor, load_keras

        return DilatedNetPredictor(
            load_keras(path / ARTIFACT_FILES[name], lean=True),
            norm,
            precision=precision,
            pipeline=pipeline_of(name, metadata),
        ).fold_into(label_set_of(metadata))
    if name == "unet":
        from .models.unet import UNetPredictor, load_state_dict, read_state_dict

        return UNetPredictor(
            load_state_dict(read_state_dict(path / ARTIFACT_FILES[name])),
            norm,
            threshold=float(metadata.get("threshold", 0.5)),
            precision=precision,
            pipeline=pipeline_of(name, metadata),
        )
    if name == "mask2former":
        from .models.mask2former import Mask2FormerPredictor, load_pretrained

        return Mask2FormerPredictor(*load_pretrained(path), precision=precision).fold_into(label_set_of(metadata))
    raise ValueError(f"unknown model {name!r}; expected one of {MODEL_NAMES}")


def label_set_of(metadata: dict):
    """The label set a stored multiclass model predicts (the superclasses where its import recorded none)."""
    return LABEL_SETS[metadata.get("label_set", "superclass")]


def legend(metadata: dict) -> list[dict]:
    """The classes of a stored model, with names and colours."""
    return [
        {"id": i, "name": n, "color": list(c)} for i, (n, c) in enumerate(zip(metadata["classes"], metadata["palette"]))
    ]
