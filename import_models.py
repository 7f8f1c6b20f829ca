"""Register the three segmentation models in the BentoML model store.

    python import_models.py --demo                          # build and briefly train the small demo models
    python import_models.py --unet weights.pth --sha256 unet=<hex>
    python import_models.py --dilatednet model.keras --mask2former https://host/m2f.zip
    python import_models.py --dilatednet model.keras --resize bilinear    # weights trained on bilinear resizes
    python import_models.py --mask2former facebook/mask2former-swin-small-cityscapes-semantic   # a Hub id
    python import_models.py --ensemble                      # fit DilatedNet + Mask2Former's blend again

Artifacts: DilatedNet a ``.keras`` file; Mask2Former a ``save_pretrained`` folder, a zip of one, or a Hugging Face
Hub id (``owner/name[@revision]``, safetensors only); UNet a
``.pth``/``.pt`` (state_dict or {'model_state_dict': ...}) or ``.safetensors``. Each may be a path or an http(s)
URL. Every artifact is loaded and run once on a generated scene before anything is written, and nothing is
written unless all of them pass: a failed import exits non-zero, names the problem, and leaves the store as it
was (``latest`` moves only on success). Nothing is ever unpickled: torch loads with ``weights_only=True``,
transformers reads safetensors only, Keras keeps ``safe_mode``.

The ensemble of DilatedNet and Mask2Former (``segmentation/ensemble.py``) is fitted on the models in the store
after ``--demo`` and after either member is imported, and stored as the model ``ensemble``.

How an image is resized to the model's input and how its answer comes back to the photo's size are recorded with
the model (``pipeline`` in its metadata). The defaults are the reference pipelines' (DilatedNet: Pillow's bicubic,
then the class scores resized bilinearly before the arg-max; UNet: bilinear, the mask resized as labels);
``--resize`` and ``--upsample`` record another choice for weights trained another way.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from segmentation.artifacts import ArtifactError, Fetched
from segmentation.classes import CLASS_NAMES, LABEL_SETS
from segmentation.models.base import Predictor
from segmentation import runtimes
from segmentation.precision import choose_precision
from segmentation.preprocessing import RESIZE_FILTERS, UPSAMPLING, Pipeline
from segmentation.samples import Samples
from segmentation.scenes import generate_scene
from segmentation.services import set_threads
from segmentation.registry import MODEL_NAMES, SPECS, spec
from segmentation.ensemble import MEMBERS as ENSEMBLE_MEMBERS
from segmentation.store import build_metadata, save, save_ensemble

log = logging.getLogger("import_models")


class ImportFailed(Exception):
    pass


@dataclass
class Prepared:
    name: str
    model: Any
    metadata: dict
    processor: Any = None
    seconds: float = 0.0
    compiled: tempfile.TemporaryDirectory | None = None  # the chosen compiled runtime's artifact, to store


def _smoke_test(name: str, predictor: Predictor) -> None:
    """Run the artifact once on a generated scene: the output must be a label map at the input's size."""
    image, _ = generate_scene(7, 96, 160)
    try:
        (labels,) = predictor.predict([image]).labels
    except Exception as e:  # noqa: BLE001 - any failure here means the artifact does not fit this project
        raise ImportFailed(f"{name}: the model failed on a test image: {type(e).__name__}: {e}") from None
    if labels.shape != image.shape[:2] or int(labels.max()) >= predictor.num_classes:
        raise ImportFailed(f"{name}: the model gave a {labels.shape} map with ids up to {labels.max()}")


def _choose_precision(name: str, make_predictor) -> dict:
    """Measure bf16 against fp32 on the sample images of data/ (never trained on): the metadata to record."""
    samples = Samples()
    images = [samples.image(i) for i in samples.ids()]
    precision, agreement, invariant = choose_precision(make_predictor, images)
    log.info("%s: bf16 labels %.4f of the pixels like fp32 on %d held-out images, %s -> serve in %s", name,
             agreement, len(images), "batch-invariant" if invariant else "NOT batch-invariant", precision)
    return {"precision": precision, "bf16_agreement": round(agreement, 6), "bf16_batch_invariant": invariant}


def _choose_runtime(name: str, make_predictor, metadata: dict, runtime: str) -> tempfile.TemporaryDirectory | None:
    """Convert and measure the compiled runtimes (segmentation/runtimes.py) unless ``runtime`` is native; records
    the choice in ``metadata`` and returns the folder holding the chosen artifact."""
    if runtime == "native":
        metadata["runtime"] = {"name": "native", "precision": metadata["precision"], "reason": "--runtime native"}
        return None
    folder = tempfile.TemporaryDirectory(prefix=f"{name}-runtime-")
    metadata["runtime"] = runtimes.choose(name, make_predictor, metadata["precision"], Path(folder.name),
                                          batch=spec(name).max_batch_size)
    if metadata["runtime"]["name"] == "native":  # bf16 that moved too many pixels of some image is not served
        metadata["precision"] = metadata["runtime"]["precision"]
    return folder


# --- demo models -------------------------------------------------------------------------------------------

def prepare_demo(name: str, data, heldout, runtime: str = "auto") -> Prepared:
    from segmentation import training as T

    t0 = time.perf_counter()
    model_spec = spec(name)
    loaded = model_spec.architecture.train_demo(data)
    predictor = loaded.make("fp32")
    if model_spec.task == "binary":
        foreground = CLASS_NAMES.index(loaded.foreground)
        metrics = T.evaluate_binary(predictor, heldout[0], (heldout[1] == foreground).astype("uint8"))
    else:
        metrics = T.evaluate_multiclass(predictor, *heldout)
    key, floor = model_spec.demo_floor
    log.info("%s demo: %s = %.3f on %d held-out scenes (floor %.2f)", name, key, metrics[key], len(heldout[0]), floor)
    if metrics[key] < floor:
        raise ImportFailed(f"{name}: the demo model reached {key} {metrics[key]:.3f}, below the floor of {floor}")
    metadata = build_metadata(
        name, preset=loaded.preset, input_size=loaded.input_size, source="demo: generated scenes, seed 0",
        source_sha256="", demo=True, metrics=metrics, foreground=loaded.foreground, parameters=loaded.parameters,
        pipeline=loaded.pipeline, **_choose_precision(name, loaded.make),
    )
    compiled = _choose_runtime(name, loaded.make, metadata, runtime)
    return Prepared(name, loaded.model, metadata, loaded.processor, time.perf_counter() - t0, compiled)


# --- the ensemble ------------------------------------------------------------------------------------------

def fit_ensemble() -> dict:
    """Fit DilatedNet's and Mask2Former's blend on generated scenes none of them trained on, as stored now: the
    ensemble's metadata, with the members' and the ensemble's mean IoU on other scenes never used for fitting."""
    import bentoml

    from segmentation import ensemble as E
    from segmentation.store import ensemble_metadata, load_predictor
    from segmentation.training import scene_data

    stored = {}
    for m in E.MEMBERS:
        try:
            stored[m] = bentoml.models.get(f"{m}:latest")
        except bentoml.exceptions.NotFound:
            raise ImportFailed(f"the ensemble needs {m} in the model store; import it first") from None
    predictors = {m: load_predictor(m, s.path, dict(s.info.metadata)) for m, s in stored.items()}
    fit_images, fit_truth = scene_data(E.FIT_SEEDS)
    test_images, test_truth = scene_data(E.TEST_SEEDS)

    def probs(images):
        return {m: [p.probabilities([img]).labels[0] for img in images] for m, p in predictors.items()}

    weights, grid = E.fit(probs(fit_images), list(fit_truth))
    test_probs = probs(test_images)
    alone = {m: E.score(test_probs, list(test_truth), {n: float(n == m) for n in E.MEMBERS}) for m in E.MEMBERS}
    fused = E.score(test_probs, list(test_truth), weights)
    metrics = {
        "mean_iou": fused,
        "members_mean_iou": alone,
        "gain_over_best_member": round(fused - max(alone.values()), 4),
        "fit_grid": {str(w): v for w, v in grid.items()},
        "fit_scenes": len(fit_images),
        "heldout_scenes": len(test_images),
        "scoring": "mean IoU, void left out as Cityscapes scores",
    }
    log.info("ensemble: weights %s; held-out mean IoU %.4f against %s", weights, fused, alone)
    demo = all(bool(s.info.metadata.get("demo")) for s in stored.values())
    return ensemble_metadata({m: str(s.tag) for m, s in stored.items()}, weights, metrics, demo)


# --- users' artifacts --------------------------------------------------------------------------------------

def prepare_artifact(name: str, source: str, sha256: str | None, overrides: dict | None = None,
                     labels: str | None = None, runtime: str = "auto") -> Prepared:
    """``overrides``: the pipeline's ``resize`` / ``upsample`` where they differ from the reference's; ``labels``:
    the label set the model predicts, where its class names or count do not say."""
    t0 = time.perf_counter()
    model_spec = spec(name)
    pipeline = Pipeline.from_dict(overrides, model_spec.pipeline) if model_spec.pipeline else None
    with Fetched(source, sha256, hub=model_spec.framework == "transformers") as fetched:
        try:
            loaded = model_spec.architecture.load_artifact(fetched.path, pipeline, labels)
            predictor = loaded.make("fp32")
        except (ArtifactError, ImportFailed):
            raise
        except Exception as e:  # noqa: BLE001 - report what the framework said, with the artifact's name
            what = f"{type(e).__name__}: {e}"
            raise ImportFailed(f"{name}: {source} could not be loaded as a {name} model: {what}") from None
        if loaded.label_set is not None and loaded.label_set.name != "superclass":
            log.info("%s: predicts the %d Cityscapes %s classes; served in the 8 superclasses (its arg-max, then "
                     "the table)", name, len(loaded.label_set.classes), loaded.label_set.name)
        _smoke_test(name, predictor)
        metadata = build_metadata(
            name, preset=loaded.preset, input_size=loaded.input_size, source=source, source_sha256=fetched.sha256,
            demo=False, foreground=loaded.foreground, parameters=loaded.parameters,
            pipeline=pipeline or loaded.pipeline, label_set=loaded.label_set.name if loaded.label_set else "superclass",
            **_choose_precision(name, loaded.make),
        )
        compiled = _choose_runtime(name, loaded.make, metadata, runtime)
    return Prepared(name, loaded.model, metadata, loaded.processor, time.perf_counter() - t0, compiled)


def _in_store(name: str) -> bool:
    import bentoml

    try:
        bentoml.models.get(f"{name}:latest")
        return True
    except bentoml.exceptions.NotFound:
        return False


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--demo", action="store_true", help="build and train the small demo models (about 5 minutes on 2 cores)"
    )
    for name in MODEL_NAMES:
        ap.add_argument(
            f"--{name}",
            metavar="PATH_OR_URL" + ("_OR_HUB_ID" if name == "mask2former" else ""),
            help=f"import your own {name} artifact",
        )
    ap.add_argument(
        "--sha256", action="append", default=[], metavar="MODEL=HEX", help="expected sha256 of an artifact (repeatable)"
    )
    ap.add_argument(
        "--resize",
        choices=list(RESIZE_FILTERS),
        help="the Pillow filter your DilatedNet/UNet was trained with (default: the reference pipeline's)",
    )
    ap.add_argument(
        "--upsample",
        choices=list(UPSAMPLING),
        help="DilatedNet: resize class scores bilinearly, or labels with nearest neighbour, to the photo",
    )
    ap.add_argument(
        "--labels",
        choices=list(LABEL_SETS),
        help="the classes your DilatedNet/Mask2Former predicts (default: recognised from its class names "
        "or count); trainid and labelid models are served in the 8 superclasses",
    )
    ap.add_argument(
        "--runtime", choices=("auto", "native"), default="auto",
        help="auto: convert each model for OpenVINO and ONNX Runtime and keep a conversion where it is faster and "
        "labels as the native model does (measured here); native: store the native model only",
    )
    ap.add_argument("--only", nargs="+", choices=MODEL_NAMES, help="with --demo: only these models")
    ap.add_argument(
        "--ensemble", action="store_true",
        help="fit the DilatedNet + Mask2Former ensemble on the models in the store (done after --demo, and after "
        "importing either member)",
    )
    ap.add_argument("--skip-existing", action="store_true", help="with --demo: leave models already in the store alone")
    args = ap.parse_args(argv)
    sources = {n: getattr(args, n) for n in MODEL_NAMES if getattr(args, n)}
    if args.demo and sources or not (args.demo or sources or args.ensemble):
        ap.error("give --demo, or one or more of --dilatednet / --mask2former / --unet (not both), or --ensemble")
    args.overrides = {k: v for k, v in (("resize", args.resize), ("upsample", args.upsample)) if v}
    if args.overrides and not any(SPECS[n].pipeline for n in sources):
        ap.error("--resize and --upsample apply to a --dilatednet or --unet artifact (Mask2Former's processor resizes)")
    checks = {}
    for item in args.sha256:
        name, _, hexdigest = item.partition("=")
        if name not in sources or len(hexdigest) != 64:
            ap.error(
                f"--sha256 takes MODEL=HEX for an artifact given on the command line, with 64 hex digits; got {item!r}"
            )
        checks[name] = hexdigest
    args.sources, args.checks = sources, checks
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    set_threads("pytorch")  # TensorFlow's threads are set where a DilatedNet is built or loaded
    t0 = time.perf_counter()
    try:
        if args.demo:
            from segmentation import training as T

            data, heldout = T.scene_data(T.TRAIN_SEEDS), T.scene_data(T.HELDOUT_SEEDS)
            names = [n for n in (args.only or MODEL_NAMES) if not (args.skip_existing and _in_store(n))]
            prepared = [prepare_demo(n, data, heldout, args.runtime) for n in names]
        else:
            prepared = [
                prepare_artifact(n, src, args.checks.get(n), args.overrides, args.labels, args.runtime)
                for n, src in args.sources.items()
            ]
    except (ArtifactError, ImportFailed) as e:
        log.error("import failed, the model store is unchanged: %s", e)
        return 1
    for p in prepared:  # every model passed: only now write to the store
        tag = save(p.name, p.model, p.metadata, p.processor, Path(p.compiled.name) if p.compiled else None).tag
        log.info("%s: %s in %.1f s %s", p.name, tag, p.seconds, p.metadata["metrics"] or "")
    if prepared:
        log.info("imported %d model(s) in %.1f s", len(prepared), time.perf_counter() - t0)
    # the ensemble follows its members: fitted again when one of them changed, or when asked
    members_changed = any(p.name in ENSEMBLE_MEMBERS for p in prepared)
    if args.ensemble or members_changed or (args.demo and not _in_store("ensemble")):
        try:
            save_ensemble(fit_ensemble())
        except ImportFailed as e:
            if args.ensemble:
                log.error("the ensemble was not fitted, the model store is unchanged: %s", e)
                return 1
            log.info("no ensemble: %s", e)
        except Exception as e:  # noqa: BLE001 - the members are stored; say what failed and how to try again
            log.error("the ensemble was not fitted (%s: %s); the models above are stored; fit it with "
                      "python import_models.py --ensemble", type(e).__name__, e)
            return 1
    elif not prepared:
        log.info("the store already holds %s and the ensemble; nothing to do", ", ".join(args.only or MODEL_NAMES))
    return 0


if __name__ == "__main__":
    sys.exit(main())
