"""The request-body limit, as ASGI middleware: a body over ``SEG_MAX_REQUEST_BYTES`` gets 413 unread.

The other limits on what one request may cost are set in :mod:`segmentation.settings`: uploads
(``SEG_MAX_UPLOAD_BYTES``, ``SEG_MAX_PIXELS``, ``SEG_MIN_SIDE``, checked by :mod:`segmentation.images`) and
traffic (``SEG_MAX_CONCURRENCY`` requests in flight, 429 for the rest at once; ``SEG_TIMEOUT_S`` per request).
"""

from __future__ import annotations

from starlette.responses import JSONResponse

from .settings import settings


# Images of one many-image call (/segment_batch, Label Studio's /predict) decoded and in flight at once: enough to
# fill a model's batch, while 16 decoded 40-megapixel images (120 MB each) never sit in the gateway together.
IMAGES_IN_FLIGHT = 4


class BodySizeLimit:
    """ASGI middleware: a body over ``max_bytes`` (``many_images_bytes`` for ``/segment_batch`` and Label Studio's
    ``/predict``) gets 413 without being read in full.

    A declared Content-Length over the limit is refused before anything is read; a chunked body is counted as it
    arrives, and once over the limit the app sees the client go away and the caller gets the 413.
    """

    def __init__(self, app, max_bytes: int | None = None, many_images_bytes: int | None = None):
        self.app = app
        self.max_bytes = max_bytes or settings().request_limit
        self.many_images_bytes = many_images_bytes or settings().batch_request_limit

    def _refusal(self, size: str, limit: int, variable: str) -> JSONResponse:
        return JSONResponse(
            {"error": f"the request body is {size} bytes; the limit is {limit:,} ({variable})"}, status_code=413
        )

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        if path == "/segment_batch" or (path.startswith("/label-studio/") and path.endswith("/predict")):
            limit, variable = self.many_images_bytes, "SEG_MAX_BATCH_REQUEST_BYTES"
        else:
            limit, variable = self.max_bytes, "SEG_MAX_REQUEST_BYTES"
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return await self._refusal(f"{int(declared):,}", limit, variable)(scope, receive, send)
        received, too_large = 0, False

        async def counted_receive():
            nonlocal received, too_large
            if too_large:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    too_large = True
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message):
            if not too_large:
                await send(message)

        try:
            await self.app(scope, counted_receive, guarded_send)
        except Exception:
            if not too_large:
                raise
        if too_large:
            await self._refusal(f"more than {limit:,}", limit, variable)(scope, receive, send)
