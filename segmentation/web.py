"""GET routes, the dashboard and the reference API's routes, as a Starlette app mounted at ``/``.

BentoML hands a request to a mount at ``/`` only when one of this app's own routes matches, so ``/metrics``,
``/readyz``, the Swagger UI and the POST APIs keep working. Handlers that need a model reach the running
``Segmentation`` service through ``bentoml.get_current_service()``.

The reference routes keep the shapes of the FastAPI apps this service replaces, errors included
(``{"detail": "..."}``), so clients written for them keep working.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import bentoml
import numpy as np
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route

from .ensemble import SERVED_NAMES as MODEL_NAMES
from .classes import label_ids_to_superclasses, multiclass_table
from .images import ImageRejected, decode_image
from .limits import IMAGES_IN_FLIGHT
from .label_studio import TaskError, allowed_url, brush_results, data_url_bytes, fetch, image_reference, parse_config
from .label_studio import sample_id
from .settings import settings
from .render import encode, render_overlay
from .samples import Samples, UnknownSample

samples = Samples()
UI_PAGE = Path(__file__).resolve().parent / "ui" / "index.html"


async def list_images(request: Request) -> JSONResponse:
    return JSONResponse({"ids": samples.ids()})


def ground_truth_overlay_png(image_id: str) -> bytes:
    """The sample with its ground truth (remapped to the 8 superclasses) blended 50/50 over it, as PNG."""
    labels = label_ids_to_superclasses(samples.label_ids(image_id))
    return encode(render_overlay(samples.image(image_id), labels, 0.5), "png")


def sample_routes(error_key: str):
    """The GET handlers for a sample's PNG and its ground-truth overlay; an unknown id is a 404 whose JSON body
    is ``{error_key: message}`` ("error" for this service's routes, "detail" for the reference API's)."""

    def not_found(e: UnknownSample) -> JSONResponse:
        return JSONResponse({error_key: str(e)}, status_code=404)

    async def image(request: Request) -> Response:
        try:
            return FileResponse(samples.image_path(request.path_params["image_id"]), media_type="image/png")
        except UnknownSample as e:
            return not_found(e)

    async def truth(request: Request) -> Response:
        try:
            body = await asyncio.to_thread(ground_truth_overlay_png, request.path_params["image_id"])
        except UnknownSample as e:
            return not_found(e)
        return Response(body, media_type="image/png")

    return image, truth


get_image, get_mask = sample_routes("error")
ref_get_image, ref_get_mask = sample_routes("detail")


async def dashboard(request: Request) -> Response:
    return FileResponse(UI_PAGE, media_type="text/html")


# --- the reference API's routes -----------------------------------------------------------------------------

def _detail(message: str, status: int) -> JSONResponse:
    return JSONResponse({"detail": message}, status_code=status)


def _model_name(value) -> str:
    name = str(value or "").strip().lower()
    if name not in MODEL_NAMES:
        raise ValueError(f"unknown model_name {value!r}; available: {', '.join(MODEL_NAMES)}")
    return name


async def _overlay_of_upload(request: Request, default_model: str | None) -> Response:
    try:
        form = await request.form(max_files=1, max_fields=8)
    except Exception:  # noqa: BLE001 - a body that is not multipart is the caller's mistake
        return _detail("send multipart/form-data with a 'file' field", 400)
    upload = form.get("file")
    if upload is None or isinstance(upload, str):
        return _detail("the form has no 'file' field with an image", 400)
    try:
        model = _model_name(form.get("model_name", default_model))
        pixels = await asyncio.to_thread(decode_image, await upload.read())
    except ImageRejected as e:
        return _detail(str(e), e.status)
    except ValueError as e:
        return _detail(str(e), 400)
    return await _segment(pixels, model)


async def _segment(pixels, model: str) -> Response:
    """The overlay from the running service; its refusals (e.g. 503 while a model worker restarts) keep their
    status and message, in the reference API's error shape."""
    try:
        return await bentoml.get_current_service().segment_pixels(pixels, model)
    except bentoml.exceptions.BentoMLException as e:
        return _detail(str(e), int(e.error_code))


async def predict_from_file(request: Request) -> Response:
    return await _overlay_of_upload(request, default_model=None)


async def predict_unet(request: Request) -> Response:
    return await _overlay_of_upload(request, default_model="unet")


async def predict_from_id(request: Request) -> Response:
    try:
        body = await request.json()
        model = _model_name(body.get("model_name"))
        pixels = await asyncio.to_thread(samples.image, body.get("image_id"))
    except UnknownSample as e:
        return _detail(str(e), 404)
    except (ValueError, AttributeError):
        return _detail(
            'send JSON {"image_id": ..., "model_name": ...}; ' + f"model_name is one of {', '.join(MODEL_NAMES)}", 400
        )
    return await _segment(pixels, model)


async def legend_data(request: Request) -> JSONResponse:
    return JSONResponse({"legend": [{"name": c.name, "color": list(c.color)} for c in multiclass_table()]})


async def available_models(request: Request) -> JSONResponse:
    return JSONResponse({"models": list(MODEL_NAMES)})


# --- Label Studio's ML-backend protocol (segmentation/label_studio.py) ------------------------------------------

def _ls_model(request: Request) -> str:
    return _model_name(request.path_params.get("model", "mask2former"))


async def ls_health(request: Request) -> JSONResponse:
    try:
        model = _ls_model(request)
    except ValueError as e:
        return JSONResponse({"error": str(e)}, status_code=404)
    return JSONResponse({"status": "UP", "model_class": f"segmentation/{model}", "v2": True})


async def ls_setup(request: Request) -> JSONResponse:
    try:
        model = _ls_model(request)
    except ValueError as e:
        return JSONResponse({"error": str(e)}, status_code=404)
    service = bentoml.get_current_service()
    try:
        service.served_metadata(model)
    except bentoml.exceptions.BentoMLException as e:
        return JSONResponse({"error": str(e)}, status_code=int(e.error_code))
    return JSONResponse({"model_version": str(service.stored[model].tag)})


async def _task_pixels(task: dict, config) -> np.ndarray:
    ref = image_reference(task, config)
    if (image_id := sample_id(ref)) is not None:
        try:
            return await asyncio.to_thread(samples.image, image_id)
        except UnknownSample as e:
            raise TaskError(str(e), status=404) from None
    data = data_url_bytes(ref)
    if data is None:
        url = allowed_url(ref)
        if url is None:
            raise TaskError(
                f"the task's image {ref[:80]!r} is not a sample id, a data: URL or an http(s) URL on an allowed host"
            )
        data = await fetch(url, settings().max_upload_bytes)
    return await asyncio.to_thread(decode_image, data)


async def ls_predict(request: Request) -> JSONResponse:
    """``{"tasks": [...], "label_config": "<View>..."}`` -> ``{"results": [{"result": [...], ...} per task]}``.
    A task whose image cannot be read or segmented gets an empty result with its ``error`` and ``status``."""
    service = bentoml.get_current_service()
    try:
        model = _ls_model(request)
        body = await request.json()
        if not isinstance(body, dict):
            raise ValueError("send a JSON object")
        tasks = body.get("tasks")
        if not isinstance(tasks, list) or not tasks:
            raise ValueError('send {"tasks": [...], "label_config": "..."} with at least one task')
        limit = settings().max_batch_images
        if len(tasks) > limit:
            raise ValueError(f"{len(tasks)} tasks in one call; at most {limit} (SEG_MAX_BATCH_IMAGES)")
        config = parse_config(body.get("label_config"), service.served_metadata(model)["classes"])
    except bentoml.exceptions.BentoMLException as e:
        return JSONResponse({"error": str(e)}, status_code=int(e.error_code))
    except TaskError as e:
        return JSONResponse({"error": str(e)}, status_code=e.status)
    except ValueError as e:  # JSON errors are ValueErrors too
        return JSONResponse({"error": str(e)}, status_code=400)
    version = str(service.stored[model].tag)
    in_flight = asyncio.Semaphore(IMAGES_IN_FLIGHT)

    async def one(task) -> dict:
        try:
            async with in_flight:
                pixels = await _task_pixels(task, config)
                labels = (await service.predict(model, pixels))["labels"]
                result = await asyncio.to_thread(brush_results, labels, config)
        except (TaskError, ImageRejected) as e:
            return {"result": [], "model_version": version, "status": e.status, "error": str(e)}
        except bentoml.exceptions.BentoMLException as e:
            return {"result": [], "model_version": version, "status": int(e.error_code), "error": str(e)}
        return {"result": result, "model_version": version}

    results = await asyncio.gather(*(one(task) for task in tasks))
    return JSONResponse({"results": list(results), "model_version": version})


routes_app = Starlette(
    routes=[
        Route("/images", list_images, methods=["GET"]),
        Route("/images/{image_id}", get_image, methods=["GET"]),
        Route("/images/{image_id}/mask", get_mask, methods=["GET"]),
        Route("/ui", dashboard, methods=["GET"]),
        # the reference API's routes
        Route("/list_images/", list_images, methods=["GET"]),
        Route("/list_images/{image_id}", ref_get_image, methods=["GET"]),
        Route("/get_mask/{image_id}", ref_get_mask, methods=["GET"]),
        Route("/legend_data/", legend_data, methods=["GET"]),
        Route("/available_models/", available_models, methods=["GET"]),
        Route("/predict_from_file/", predict_from_file, methods=["POST"]),
        Route("/predict_from_id/", predict_from_id, methods=["POST"]),
        Route("/predict", predict_unet, methods=["POST"]),
        # Label Studio's model URL: /label-studio (mask2former) or /label-studio/<model>
        Route("/label-studio", ls_health, methods=["GET"]),
        Route("/label-studio/health", ls_health, methods=["GET"]),
        Route("/label-studio/setup", ls_setup, methods=["POST"]),
        Route("/label-studio/predict", ls_predict, methods=["POST"]),
        Route("/label-studio/{model}", ls_health, methods=["GET"]),
        Route("/label-studio/{model}/health", ls_health, methods=["GET"]),
        Route("/label-studio/{model}/setup", ls_setup, methods=["POST"]),
        Route("/label-studio/{model}/predict", ls_predict, methods=["POST"]),
    ]
)
