"""GET routes beside the POST APIs, as a Starlette app mounted at ``/``.

BentoML hands a request to a mount at ``/`` only when one of this app's own routes matches, so ``/metrics``,
``/readyz``, the Swagger UI and the POST APIs keep working.
"""

from __future__ import annotations

import asyncio

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route

from .classes import label_ids_to_superclasses
from .render import encode, render_overlay
from .samples import Samples, UnknownSample

samples = Samples()


def _not_found(e: UnknownSample) -> JSONResponse:
    return JSONResponse({"error": str(e)}, status_code=404)


async def list_images(request: Request) -> JSONResponse:
    return JSONResponse({"ids": samples.ids()})


async def get_image(request: Request) -> Response:
    try:
        return FileResponse(samples.image_path(request.path_params["image_id"]), media_type="image/png")
    except UnknownSample as e:
        return _not_found(e)


def ground_truth_overlay_png(image_id: str) -> bytes:
    """The sample with its ground truth (remapped to the 8 superclasses) blended 50/50 over it, as PNG."""
    labels = label_ids_to_superclasses(samples.label_ids(image_id))
    return encode(render_overlay(samples.image(image_id), labels, 0.5), "png")


async def get_mask(request: Request) -> Response:
    try:
        body = await asyncio.to_thread(ground_truth_overlay_png, request.path_params["image_id"])
    except UnknownSample as e:
        return _not_found(e)
    return Response(body, media_type="image/png")


routes_app = Starlette(
    routes=[
        Route("/images", list_images, methods=["GET"]),
        Route("/images/{image_id}", get_image, methods=["GET"]),
        Route("/images/{image_id}/mask", get_mask, methods=["GET"]),
    ]
)
