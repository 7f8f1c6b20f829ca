"""The public segmentation service: decode, dispatch to the model's own service, render, encode.

    bentoml serve service:Segmentation          # http://localhost:3000 (Swagger UI at /)

Three model services (``segmentation/services.py``) each own one model, its threads and its adaptive batching;
this thin gateway awaits them, so concurrent requests form batches there. CPU-bound work here (decoding,
rendering, encoding) runs in worker threads so the event loop keeps accepting requests.
"""

from __future__ import annotations

import asyncio
import logging
import time
from http import HTTPStatus
from pathlib import Path
from typing import Annotated, Any, Literal

import aiohttp
import bentoml
import numpy as np
from bentoml.exceptions import InvalidArgument, NotFound
from bentoml.validators import ContentType
from PIL import Image
from pydantic import Field
from starlette.responses import Response

from segmentation.classes import CLASS_NAMES, TRUTH_KINDS, label_ids_to_superclasses, multiclass_table
from segmentation.classes import truth_to_superclasses
from segmentation.encodings import mask_json
from segmentation.images import ImageRejected, decode_image, decode_mask
from segmentation import bentoml_workarounds
from segmentation.limits import IMAGES_IN_FLIGHT, BodySizeLimit
from segmentation.metrics import class_fractions, reported, truth_confusion
from segmentation import runtimes
from segmentation.preprocessing import labels_at, resize_rgb, warm_up
from segmentation.render import (
    MEDIA_TYPES,
    colorize,
    encode,
    render_binary_color,
    render_binary_overlay,
    render_overlay,
)
from segmentation.samples import UnknownSample
from segmentation.settings import SettingsError, settings
from segmentation import ensemble as E
from segmentation.registry import label_set_of, pipeline_of
from segmentation.services import (
    MODEL_REFS,
    MODEL_SERVICES,
    ModelUnavailable,
    call_model,
    in_model_ms,
    model_queue,
    require_models,
    stored_model,
)
from segmentation.store import legend as legend_of
from segmentation.web import routes_app, samples

log = logging.getLogger(__name__)
SETTINGS = settings()  # a bad SEG_* value stops the server here, naming the variable
bentoml_workarounds.apply(spool_max_size=SETTINGS.request_limit)
require_models()  # a clear start-up error, before BentoML's own lookup, when the store lacks a model

ModelName = Literal[E.SERVED_NAMES]  # the registry's architectures and their ensemble
try:
    ENSEMBLE_WEIGHTS = E.parse_weights(SETTINGS.ensemble_weights) if SETTINGS.ensemble_weights else None
except ValueError as e:
    raise SettingsError(f"bad setting: {e}") from None
OutputKind = Literal["overlay", "color", "mask"]
ImageFormat = Literal["png", "jpeg", "webp"]
Alpha = Annotated[float, Field(ge=0.0, le=1.0, description="weight of the label colours in the overlay")]
Upload = Annotated[Path, ContentType("image/*")]
Encoding = Literal["rle", "polygons", "png"]
Tolerance = Annotated[float, Field(ge=0.0, le=100.0, description="polygon simplification, in pixels (0: exact)")]
MaskKind = Literal[tuple(TRUTH_KINDS)]
# JSON answers declare their media type: BentoML 1.4.39 otherwise rebuilds the output's JSON schema for every
# response to find it.
Report = Annotated[dict[str, Any], ContentType("application/json")]
Reports = Annotated[list[dict[str, Any]], ContentType("application/json")]


def server_timing(stages_ms: dict[str, float]) -> str:
    """A ``Server-Timing`` header value: ``decode;dur=35.1, inference;dur=810.4, ...`` (batch_size is left out)."""
    return ", ".join(f"{name};dur={ms:.1f}" for name, ms in stages_ms.items() if name != "batch_size")


class PayloadTooLarge(bentoml.exceptions.BentoMLException):
    error_code = HTTPStatus.REQUEST_ENTITY_TOO_LARGE  # BentoML reads ``error_code.value``: a plain int fails there


def _reject(e: ImageRejected) -> Exception:
    return PayloadTooLarge(str(e)) if e.status == 413 else InvalidArgument(str(e))


class Segmentation:
    """The public service; its model services are attributes named after the models (set below)."""

    def __init__(self) -> None:
        self.samples = samples  # the one index of data/, shared with the GET routes
        self.stored = {name: stored_model(ref, name) for name, ref in MODEL_REFS.items()}
        self.metadata = {name: dict(s.info.metadata) for name, s in self.stored.items()}
        self.pipelines = {name: pipeline_of(name, meta) for name, meta in self.metadata.items()}
        # where the gateway finishes a model's answers, it also folds the model's own classes into the served ones
        self.label_maps = {name: label_set_of(meta).lookup_table() for name, meta in self.metadata.items()
                           if self.pipelines[name] and meta["task"] == "multiclass"}
        warm_up()  # labels_at's compiled loops
        # the ensemble of DilatedNet and Mask2Former, when the store holds one fitted on the members served now;
        # otherwise every other model is served and model=ensemble answers 404 saying why
        self.ensemble, self.ensemble_problem = E.availability({m: str(self.stored[m].tag) for m in E.MEMBERS})
        if self.ensemble is None:
            log.error("model=%s is not served: %s", E.NAME, self.ensemble_problem)
        else:
            self.stored[E.NAME] = self.ensemble
            self.metadata[E.NAME] = meta = dict(self.ensemble.info.metadata)
            self.ensemble_weights = ENSEMBLE_WEIGHTS or E.normalised(meta["weights"])
            log.info("model=%s: %s with weights %s", E.NAME, self.ensemble.tag, self.ensemble_weights)

    def served_metadata(self, model: str) -> dict:
        """A served model's metadata; for an ensemble that cannot be served, a 404 that says why (BentoML hides
        the message of any 5xx)."""
        if model == E.NAME and self.ensemble is None:
            raise NotFound(f"model={E.NAME} is not available on this server: {self.ensemble_problem}")
        return self.metadata[model]

    # --- the steps every image API shares ------------------------------------------------------------------

    async def _read_upload(self, image: Path, decode=decode_image) -> np.ndarray:
        try:
            data = await asyncio.to_thread(Path(image).read_bytes)
            return await asyncio.to_thread(decode, data)
        except ImageRejected as e:
            raise _reject(e) from None

    def _sample(self, image_id: str) -> np.ndarray:
        try:
            return self.samples.image(image_id)
        except UnknownSample as e:
            raise NotFound(str(e)) from None

    async def _call(self, model: str, pixels: np.ndarray, api: str = "predict") -> tuple[dict, float, float]:
        """One image to the model's own service: (its answer, ms the gateway spent resizing, ms of the call).

        For a model with a pipeline (DilatedNet, UNet, and Mask2Former where its processor is a fixed-size bilinear
        resize) the gateway resizes with the recorded filter (giving the pixels the predictor's own step would), so
        only a model-size image crosses to the model process, not a 6 MB photo."""
        service, pipeline = getattr(self, model), self.pipelines[model]
        size = tuple(self.metadata[model]["input_size"]) if pipeline else None
        t0 = time.perf_counter()
        sent = await asyncio.to_thread(resize_rgb, pixels, size, pipeline.resize) if pipeline else pixels
        t1 = time.perf_counter()
        try:
            (result,) = await call_model(service, [sent], model, api)
        except (aiohttp.ClientError, ConnectionError) as e:  # the model's worker died mid-call; it is restarted
            log.warning("%s model service dropped a call: %r", model, e)
            raise ModelUnavailable(
                f"the {model} model service restarted while answering; retry the request", retry_after_s=10
            ) from None
        return result, (t1 - t0) * 1e3, (time.perf_counter() - t1) * 1e3

    async def predict(self, model: str, pixels: np.ndarray) -> dict[str, Any]:
        """(H, W, 3) uint8 -> {"labels": (H, W) uint8, "timings_ms": {...}} from the model's own service.

        For a model with a pipeline the gateway also finishes the model-size answer (labels_at, as the predictor
        would), so the labels are the same. Stage times then include the gateway's share, and ``queue`` is the
        rest of the call: waiting for the model's worker (the batch ahead) and the transfer between processes."""
        self.served_metadata(model)
        if model == E.NAME:
            return await self._predict_ensemble(pixels)
        result, resize_ms, call_ms = await self._call(model, pixels)
        t2 = time.perf_counter()
        labels = (
            await asyncio.to_thread(self._finish, model, result["output"], pixels.shape[:2])
            if self.pipelines[model]
            else result["output"]
        )
        timings = result["timings_ms"]  # read only: a batch's results may share it
        in_model = in_model_ms(timings)
        timings = {
            **timings,
            "preprocess": timings["preprocess"] + resize_ms,
            "postprocess": timings["postprocess"] + (time.perf_counter() - t2) * 1e3,
            "queue": max(0.0, call_ms - in_model),
        }
        return {"labels": labels, "timings_ms": timings}

    async def _predict_ensemble(self, pixels: np.ndarray) -> dict[str, Any]:
        """Both members' class probabilities, asked of their services at once (each batching as usual), fused
        at the photo's size (segmentation/ensemble.py). Stage times are the slower member's, fusing included
        in ``postprocess``."""
        calls = await asyncio.gather(*(self._call(m, pixels, "probabilities") for m in E.MEMBERS))
        t0 = time.perf_counter()
        weights = [self.ensemble_weights[m] for m in E.MEMBERS]
        labels = await asyncio.to_thread(E.fuse, [r["output"] for r, _, _ in calls], weights, pixels.shape[:2])
        fuse_ms = (time.perf_counter() - t0) * 1e3
        stages = [(r["timings_ms"], resize_ms, call_ms) for r, resize_ms, call_ms in calls]
        timings = {
            "preprocess": max(t["preprocess"] + resize_ms for t, resize_ms, _ in stages),
            "inference": max(t["inference"] for t, _, _ in stages),
            "postprocess": max(t["postprocess"] for t, _, _ in stages) + fuse_ms,
            "batch_size": max(t.get("batch_size", 1) for t, _, _ in stages),
            "queue": max(max(0.0, call_ms - in_model_ms(t)) for t, _, call_ms in stages),
        }
        return {"labels": labels, "timings_ms": timings}

    def _finish(self, model: str, output: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        """A model-size answer -> (H, W) uint8 served class ids at the photo's ``size``."""
        labels = labels_at(output, size)
        lut = self.label_maps.get(model)
        return labels if lut is None else lut[labels]

    def _render(
        self, model: str, pixels: np.ndarray, labels: np.ndarray, output: str, alpha: float, fmt: str
    ) -> Response:
        if output == "mask":
            body = encode(labels, "png")
        elif self.metadata[model]["task"] == "binary":
            picture = render_binary_overlay(pixels, labels) if output == "overlay" else render_binary_color(labels)
            body = encode(picture, fmt)
        else:
            palette = np.asarray(self.metadata[model]["palette"], dtype=np.uint8)
            picture = (
                render_overlay(pixels, labels, alpha, palette) if output == "overlay" else colorize(labels, palette)
            )
            body = encode(picture, fmt)
        return Response(body, media_type=MEDIA_TYPES[fmt])

    async def segment_pixels(
        self,
        pixels: np.ndarray,
        model: str,
        output: str = "overlay",
        alpha: float = 0.5,
        fmt: str = "png",
        decode_ms: float | None = None,
    ) -> Response:
        """(H, W, 3) uint8 RGB -> the encoded picture. Shared by the APIs and the reference routes (web.py).

        The response's ``Server-Timing`` header gives this request's stages in ms (decode, preprocess, inference,
        postprocess, queue = waiting for the model and inter-process transfer, render = overlay and encoding), as
        browsers' developer tools and benchmarks/ read it."""
        if output == "mask" and fmt != "png":
            raise InvalidArgument(
                f"output=mask is a lossless single-channel PNG; format={fmt!r} is not available for it"
            )
        result = await self.predict(model, pixels)
        t0 = time.perf_counter()
        response = await asyncio.to_thread(self._render, model, pixels, result["labels"], output, alpha, fmt)
        stages = {
            **({"decode": decode_ms} if decode_ms is not None else {}),
            **result["timings_ms"],
            "render": (time.perf_counter() - t0) * 1e3,
        }
        response.headers["Server-Timing"] = server_timing(stages)
        return response

    # --- APIs ----------------------------------------------------------------------------------------------

    @bentoml.api
    async def segment(
        self,
        image: Upload,
        model: ModelName = "mask2former",
        output: OutputKind = "overlay",
        alpha: Alpha = 0.5,
        format: ImageFormat = "png",
    ) -> Image.Image:
        """Segment an uploaded image. `overlay`: label colours blended over the photo; `color`: the colour map;
        `mask`: single-channel PNG of class ids (0-7; 0/1 for unet). Always at the input's width and height."""
        t0 = time.perf_counter()
        pixels = await self._read_upload(image)
        return await self.segment_pixels(pixels, model, output, alpha, format, (time.perf_counter() - t0) * 1e3)

    @bentoml.api
    async def segment_by_id(
        self,
        image_id: str,
        model: ModelName = "mask2former",
        output: OutputKind = "overlay",
        alpha: Alpha = 0.5,
        format: ImageFormat = "png",
    ) -> Image.Image:
        """`segment` for a sample image in data/images (ids from GET /images)."""
        pixels = await asyncio.to_thread(self._sample, image_id)
        return await self.segment_pixels(pixels, model, output, alpha, format)

    @bentoml.api
    async def analyze(self, image: Upload, model: ModelName = "mask2former") -> Report:
        """Per-class pixel fractions and where the time went."""
        t0 = time.perf_counter()
        pixels = await self._read_upload(image)
        t1 = time.perf_counter()
        result = await self.predict(model, pixels)
        t2 = time.perf_counter()
        meta = self.metadata[model]
        fractions = class_fractions(result["labels"], len(meta["classes"]))
        timings = dict(result["timings_ms"])
        batch_size = int(timings.pop("batch_size", 1))
        return {
            "width": int(pixels.shape[1]),
            "height": int(pixels.shape[0]),
            "model": model,
            "tag": str(self.stored[model].tag),
            "classes": [{**c, "fraction": round(float(f), 6)} for c, f in zip(legend_of(meta), fractions)],
            "timings_ms": {
                "decode": round((t1 - t0) * 1e3, 2),
                **{k: round(v, 2) for k, v in timings.items()},
                "total": round((t2 - t0) * 1e3, 2),
            },
            "batch_size": batch_size,
        }

    def mask_answer(self, model: str, labels: np.ndarray, encoding: str, tolerance: float = 0.0) -> dict:
        """The served mask as data (``segmentation.encodings``) with the image's size and the model's tag."""
        return {
            "width": int(labels.shape[1]),
            "height": int(labels.shape[0]),
            "model": model,
            "tag": str(self.stored[model].tag),
            "encoding": encoding,
            **mask_json(labels, legend_of(self.metadata[model]), encoding, tolerance),
        }

    @bentoml.api
    async def segment_json(
        self,
        image: Upload,
        model: ModelName = "mask2former",
        encoding: Encoding = "rle",
        tolerance: Tolerance = 0.0,
        ctx: bentoml.Context = None,
    ) -> Report:
        """The mask as data, per class present (id, name, colour, pixel count, bounding box [x, y, w, h]):
        `rle`: COCO compressed RLE (pycocotools.mask.decode reads it); `polygons`: outer rings and holes in pixel
        coordinates, simplified within `tolerance` pixels; `png`: the whole class-id mask as base64 PNG."""
        t0 = time.perf_counter()
        pixels = await self._read_upload(image)
        t1 = time.perf_counter()
        result = await self.predict(model, pixels)
        t2 = time.perf_counter()
        answer = await asyncio.to_thread(self.mask_answer, model, result["labels"], encoding, tolerance)
        stages = {"decode": (t1 - t0) * 1e3, **result["timings_ms"], "encode": (time.perf_counter() - t2) * 1e3}
        ctx.response.headers["Server-Timing"] = server_timing(stages)
        return answer

    @bentoml.api
    async def segment_batch(
        self,
        images: list[Upload],
        model: ModelName = "mask2former",
        encoding: Encoding = "rle",
        tolerance: Tolerance = 0.0,
    ) -> Reports:
        """`segment_json` for several images (field `images`, repeated; at most SEG_MAX_BATCH_IMAGES): one
        answer per image, in order, each with its `index`, `filename` and `status`; an image that cannot be
        segmented gets its own `status` and `error`, the others are answered. The images ride the model's
        adaptive batching together."""
        if not images:
            raise InvalidArgument("send one or more image files in the 'images' field")
        if len(images) > SETTINGS.max_batch_images:
            raise InvalidArgument(
                f"{len(images)} images in one call; at most {SETTINGS.max_batch_images} (SEG_MAX_BATCH_IMAGES)"
            )

        in_flight = asyncio.Semaphore(IMAGES_IN_FLIGHT)

        async def one(index: int, image: Path) -> dict:
            entry = {"index": index, "filename": bentoml_workarounds.upload_name(image)}
            try:
                async with in_flight:
                    pixels = await self._read_upload(image)
                    result = await self.predict(model, pixels)
                    answer = await asyncio.to_thread(self.mask_answer, model, result["labels"], encoding, tolerance)
            except bentoml.exceptions.BentoMLException as e:
                return {**entry, "status": int(e.error_code), "error": str(e)}
            return {**entry, "status": 200, **answer}

        return list(await asyncio.gather(*(one(i, image) for i, image in enumerate(images))))

    async def score(self, model: str, pixels: np.ndarray, truth: np.ndarray) -> dict:
        """Per-class IoU and Dice, mean IoU and pixel accuracy of the model on ``pixels`` against ``truth``
        (superclass ids), scored as Cityscapes does: pixels whose truth is void are left out."""
        meta = self.served_metadata(model)
        binary = meta["task"] == "binary"
        foreground = None
        if binary:
            fg = meta.get("foreground")
            if fg not in CLASS_NAMES:
                raise InvalidArgument(
                    f"the {model} model's foreground {fg!r} is not a Cityscapes superclass to evaluate against"
                )
            foreground = CLASS_NAMES.index(fg)
        if truth.shape != pixels.shape[:2]:
            raise InvalidArgument(
                f"the mask is {truth.shape[1]}x{truth.shape[0]} and the image {pixels.shape[1]}x{pixels.shape[0]}:"
                " they must be the same size"
            )
        result = await self.predict(model, pixels)
        cm = truth_confusion(truth, result["labels"], len(meta["classes"]), foreground)
        s = reported(cm, binary)
        return {
            "model": model,
            "tag": str(self.stored[model].tag),
            "classes": [{**c, "iou": i, "dice": d} for c, i, d in zip(legend_of(meta), s["iou"], s["dice"])],
            "mean_iou": s["mean_iou"],
            "pixel_accuracy": s["pixel_accuracy"],
            "ignored": "pixels whose ground truth is void",
        }

    @bentoml.api
    async def evaluate(
        self,
        image_id: str | None = None,
        model: ModelName = "mask2former",
        # lists, since BentoML 1.4.39 cannot make a file input optional (its schema of Path | None fails)
        image: list[Upload] = [],  # noqa: B006 - pydantic copies defaults
        mask: list[Upload] = [],  # noqa: B006
        mask_kind: MaskKind = "label_ids",
    ) -> Report:
        """Per-class IoU and Dice, mean IoU and pixel accuracy against a ground truth: a sample's (`image_id`, as
        JSON), or an uploaded `image` with its `mask` (multipart; `mask_kind`: Cityscapes `label_ids` or
        `train_ids`, or `superclasses` 0-7). Pixels whose truth is void are left out, as Cityscapes scores."""
        if len(image) > 1 or len(mask) > 1:
            raise InvalidArgument(f"send one image and one mask; got {len(image)} and {len(mask)}")
        if (image_id is None) == (not image):
            raise InvalidArgument("send either image_id (a sample) or an image with its mask, not both or neither")
        if image:
            if not mask:
                raise InvalidArgument("an uploaded image needs its ground truth: send it as 'mask'")
            pixels = await self._read_upload(image[0])
            ids = await self._read_upload(mask[0], decode_mask)
            try:
                truth = truth_to_superclasses(ids, mask_kind)
            except ValueError as e:
                raise InvalidArgument(f"the mask is not {mask_kind}: {e}") from None
            return {"image_id": None, **await self.score(model, pixels, truth)}
        pixels = await asyncio.to_thread(self._sample, image_id)
        if not self.samples.has_mask(image_id):
            raise NotFound(f"sample {image_id!r} has no ground-truth mask")
        truth = label_ids_to_superclasses(self.samples.label_ids(image_id))
        return {"image_id": image_id, **await self.score(model, pixels, truth)}

    async def _serving(self, model: str) -> dict:
        """What the model's process runs its forward in; what its import recorded if the process does not say."""
        try:
            return await getattr(self, model).to_async.serving()
        except Exception as e:  # noqa: BLE001 - /models answers whatever a model service's state
            log.warning("%s model service did not say its runtime: %r", model, e)
            return runtimes.recorded(self.metadata[model])

    @bentoml.api
    async def models(self) -> Reports:
        """The served models with their store tags, stored metrics, and the runtime and precision their forward
        pass runs in (with why, and what was measured at import); last the ensemble, with its members' tags and
        weights (or, when it cannot be served, why)."""
        names = [name for name in self.metadata if name != E.NAME]
        served = dict(zip(names, await asyncio.gather(*(self._serving(name) for name in names))))
        return [
            {
                "name": name,
                "framework": meta["framework"],
                "tag": str(self.stored[name].tag),
                "task": meta["task"],
                **({"foreground": meta.get("foreground")} if meta["task"] == "binary" else {}),
                "preset": meta["preset"],
                "classes": meta["classes"],
                "input_size": meta["input_size"],
                "demo": meta["demo"],
                "metrics": meta["metrics"],
                "precision": served[name]["precision"],
                "runtime": runtimes.describe(name, meta, served[name]),
                **({"label_set": meta.get("label_set", "superclass")} if meta["task"] == "multiclass" else {}),
                "pipeline": self.pipelines[name].as_dict() if self.pipelines[name] else "the model's image processor",
                "bf16_agreement": meta.get("bf16_agreement"),
                "queue": model_queue(name).state(),
            }
            for name, meta in self.metadata.items()
            if name != E.NAME
        ] + [self._ensemble_entry()]

    def _ensemble_entry(self) -> dict:
        if self.ensemble is None:
            return {"name": E.NAME, "framework": "ensemble", "available": False, "problem": self.ensemble_problem,
                    "members": {m: None for m in E.MEMBERS}}
        meta = self.metadata[E.NAME]
        return {
            "name": E.NAME,
            "framework": "ensemble",
            "available": True,
            "tag": str(self.ensemble.tag),
            "task": "multiclass",
            "classes": meta["classes"],
            "demo": meta["demo"],
            "members": meta["members"],
            "weights": self.ensemble_weights,
            "fitted_weights": meta["weights"],
            "metrics": meta["metrics"],
        }

    @bentoml.api
    def legend(self, model: ModelName | None = None) -> Report:
        """Class names and colours: the 8 superclasses, or a model's own classes (the binary ones for unet)."""
        classes = legend_of(self.served_metadata(model)) if model else [c.as_dict() for c in multiclass_table()]
        meta = self.metadata[model] if model else {}
        own = meta.get("model_classes") if meta.get("label_set", "superclass") != "superclass" else None
        table = label_set_of(meta).to_superclass if own else ()
        return {
            "model": model,
            "classes": classes,
            **(
                {
                    "label_set": meta["label_set"],
                    "model_classes": [{"id": i, "name": n, "superclass": int(table[i])} for i, n in enumerate(own)],
                }
                if own
                else {}
            ),
        }


for _name, _model_service in MODEL_SERVICES.items():  # one dependency per architecture, before BentoML reads them
    setattr(Segmentation, _name, bentoml.depends(_model_service))
if E.stored() is not None:  # the ensemble's store entry travels in the Bento with its members
    Segmentation.ensemble_model = bentoml.models.BentoModel(f"{E.NAME}:latest")
Segmentation = bentoml.service(
    name="segmentation", workers=1, traffic={"timeout": SETTINGS.timeout_s, "max_concurrency": SETTINGS.max_concurrency}
)(bentoml.asgi_app(routes_app, path="/")(Segmentation))
Segmentation.add_asgi_middleware(BodySizeLimit)
