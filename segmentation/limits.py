"""Limits on what one request may cost, configured in one place (environment variables, read at start-up).

- request bodies: ``SEG_MAX_REQUEST_BYTES`` (default: the upload limit plus 64 KiB of form overhead) -> 413;
- uploads: ``SEG_MAX_UPLOAD_BYTES``, ``SEG_MAX_PIXELS``, ``SEG_MIN_SIDE`` (see :mod:`segmentation.images`);
- traffic: ``SEG_MAX_CONCURRENCY`` requests in flight at the gateway (default 32) -> 429 for the rest at once;
  ``SEG_TIMEOUT_S`` seconds per request (default 120).
"""

from __future__ import annotations

import logging
import os

from starlette.responses import JSONResponse

from .images import LIMITS

MAX_REQUEST_BYTES = int(os.environ.get("SEG_MAX_REQUEST_BYTES") or LIMITS.max_bytes + 64 * 1024)
MAX_CONCURRENCY = int(os.environ.get("SEG_MAX_CONCURRENCY") or 32)
TIMEOUT_S = float(os.environ.get("SEG_TIMEOUT_S") or 120)


class BodySizeLimit:
    """ASGI middleware: a body over ``max_bytes`` gets 413 without being read in full.

    A declared Content-Length over the limit is refused before anything is read; a chunked body is counted as it
    arrives, and once over the limit the app sees the client go away and the caller gets the 413.
    """

    def __init__(self, app, max_bytes: int = MAX_REQUEST_BYTES):
        self.app = app
        self.max_bytes = max_bytes

    def _refusal(self, size: str) -> JSONResponse:
        return JSONResponse(
            {"error": f"the request body is {size} bytes; the limit is {self.max_bytes:,} (SEG_MAX_REQUEST_BYTES)"},
            status_code=413,
        )

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._refusal(f"{int(declared):,}")(scope, receive, send)
        received, too_large = 0, False

        async def counted_receive():
            nonlocal received, too_large
            if too_large:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
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
            await self._refusal(f"more than {self.max_bytes:,}")(scope, receive, send)


def strict_multipart() -> None:
    """Multipart bodies as this service takes them, in place of BentoML 1.4.39's parser:

    - file fields take uploaded files only. BentoML treats a plain string in a file field as a URL and downloads
      it from the server (no size cap; private addresses unguarded where uvloop is missing, which answers 500
      here). This service never fetches what a caller names: such a field is a 400;
    - a malformed body (no boundary, broken parts) is a 400 saying so; BentoML turns Starlette's 400 into a 500;
    - a client that goes away mid-upload is logged as such (400), not as a server error;
    - an upload stays in memory while it is parsed (it is read whole right after). Starlette spools a file part
      over 1 MiB to a temporary file on disk, one thread hop per chunk: 2-3 ms more for a 2 MB photo.
    """
    from _bentoml_impl import serde
    from bentoml.exceptions import BadInput
    from starlette.exceptions import HTTPException
    from starlette.formparsers import MultiPartException, MultiPartParser
    from starlette.requests import ClientDisconnect

    class UploadsOnlyMultipartSerde(serde.MultipartSerde):
        @staticmethod
        async def ensure_file(obj):
            if isinstance(obj, serde.UploadFile):
                return obj
            raise BadInput("file fields take an uploaded file (multipart with a filename), not text or a URL")

        async def parse_request(self, request, cls):
            try:
                return await super().parse_request(request, cls)
            except (HTTPException, MultiPartException) as e:
                raise BadInput(f"malformed multipart/form-data body: {getattr(e, 'detail', None) or e}") from None
            except ClientDisconnect:
                raise BadInput("the client went away before the upload was complete") from None

    serde.ALL_SERDE[UploadsOnlyMultipartSerde.media_type] = UploadsOnlyMultipartSerde
    MultiPartParser.spool_max_size = MAX_REQUEST_BYTES


class _ClientErrorsOnOneLine(logging.Filter):
    """BentoML logs a full ERROR traceback for every request a client got wrong (4xx). Those are the caller's
    mistakes, already answered with a message: keep them as one INFO line, so real server errors stand out."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None and _is_client_error(exc):
            record.msg = f"{record.getMessage()}: {type(exc).__name__}: {exc}".replace("\n", " ")
            record.args, record.exc_info, record.exc_text = (), None, None
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


def _is_client_error(exc: BaseException) -> bool:
    from bentoml.exceptions import BentoMLException
    from pydantic import ValidationError

    if isinstance(exc, ValidationError):
        return True
    return isinstance(exc, BentoMLException) and int(exc.error_code) < 500


def log_client_errors_briefly() -> None:
    logging.getLogger("bentoml._internal.server.http_app").addFilter(_ClientErrorsOnOneLine())
