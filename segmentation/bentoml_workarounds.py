"""Every change this project makes to BentoML's own behaviour, written for BentoML 1.4.39 and applied by one call.

    from segmentation import bentoml_workarounds
    bentoml_workarounds.apply()          # service.py, at import: in the gateway and in every model process

Each function below names the upstream behaviour it corrects. They reach into BentoML's private modules, which
change between releases without notice, so :func:`apply` refuses any other BentoML version: upgrading is a
deliberate act (re-check each workaround against the new release, run the tests, then move ``WRITTEN_FOR``).
This is the only module of the project that imports ``_bentoml_impl`` or ``bentoml._internal``.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import logging
from pathlib import Path

WRITTEN_FOR = "1.4.39"

# Upstream recycles the caller's connection pool to a dependency every 100 requests / 300 s while calls are in
# flight, which drops calls (ServerDisconnectedError); given to every model service's ``runner_connection``.
# ``max_age`` must be a float: an int fails BentoML's config validation.
RUNNER_CONNECTION = {"max_requests": 10_000_000, "max_age": 86400.0}


class BentoMLVersionError(RuntimeError):
    """The installed BentoML is not the release these workarounds were written for."""


def check_version(installed: str | None = None) -> None:
    installed = installed or importlib.metadata.version("bentoml")
    if installed != WRITTEN_FOR:
        raise BentoMLVersionError(
            f"BentoML {installed} is installed, but segmentation/bentoml_workarounds.py was written for BentoML "
            f"{WRITTEN_FOR} and patches its internals. Install bentoml=={WRITTEN_FOR} (requirements.txt), or check "
            f"each workaround against {installed}, run the tests and update WRITTEN_FOR."
        )


_applied = False


def apply(spool_max_size: int) -> None:
    """Check the BentoML version, then apply every workaround (once per process).

    ``spool_max_size``: the request-body limit, up to which an upload is parsed in memory."""
    global _applied
    check_version()
    if _applied:
        return
    answer_errors_at_once()
    say_why_a_model_is_unavailable()
    stop_the_gateway_first()
    readiness_probe_answers_while_dependencies_load()
    dispatch_when_idle()
    strict_multipart(spool_max_size)
    log_client_errors_briefly()
    _applied = True


def answer_errors_at_once() -> None:
    """Upstream's ``TimeoutMiddleware`` waits only for the app's first ``send``: when the app raises before sending
    anything (an error in an error handler, a failed readiness probe), it waits out the whole traffic timeout and
    then returns with no response at all, so the client hangs for ``timeout`` seconds and gets a 500. This one
    waits for whichever comes first, the response starting or the app finishing, so an exception reaches the
    server's error handler at once; the timeout still answers 504 when nothing was sent in time."""
    from bentoml._internal.server.http import traffic
    from starlette.responses import JSONResponse

    class TimeoutMiddleware(traffic.TimeoutMiddleware):
        async def __call__(self, scope, receive, send) -> None:
            if scope["type"] not in ("http", "websocket"):
                return await self.app(scope, receive, send)
            started = asyncio.get_running_loop().create_future()

            async def _send(message) -> None:
                if not started.done():
                    started.set_result(None)
                await send(message)

            app = asyncio.ensure_future(self.app(scope, receive, _send))
            done, _ = await asyncio.wait({app, started}, timeout=self.timeout, return_when=asyncio.FIRST_COMPLETED)
            if not done:
                app.cancel()
                error = f"Not able to process the request in {self.timeout} seconds"
                await JSONResponse({"error": error}, status_code=504)(scope, receive, send)
                return
            started.cancel()
            await app  # the rest of the response, or the app's exception

    traffic.TimeoutMiddleware = TimeoutMiddleware


def say_why_a_model_is_unavailable() -> None:
    """Upstream answers every 5xx an API raises with "An unexpected error has occurred, please check the server
    log." A :class:`segmentation.services.ModelUnavailable` is raised on purpose and its message is for the client
    (which model is busy or restarting, and what to do): here it is answered as a 503 with that message and a
    ``Retry-After`` header, logged on one line. Every other 5xx keeps upstream's answer and traceback."""
    from _bentoml_impl.server.app import ServiceAppFactory
    from starlette.responses import JSONResponse

    from .services import ModelUnavailable

    api_endpoint = ServiceAppFactory.api_endpoint

    async def answered(self, name: str, request):
        try:
            return await api_endpoint(self, name, request)
        except ModelUnavailable as e:
            logging.getLogger("segmentation").warning("%s %s: 503: %s", request.method, request.url.path, e)
            return JSONResponse({"error": str(e)}, status_code=503, headers={"Retry-After": str(e.retry_after_s)})

    ServiceAppFactory.api_endpoint = answered


def stop_the_gateway_first() -> None:
    """On SIGTERM, upstream's ``bentoml serve`` first deletes the model services' Unix sockets (its arbiter's exit
    stack runs before anything is stopped), then its arbiter (circus) signals every process at once: requests the
    gateway still has in flight cannot reach their model any more and fail with 503. Here the gateway (BentoML's
    watcher ``service``) stops first: its server stops accepting and finishes what is in flight, which still
    reaches the model services; then the model services stop; the sockets are removed last. This runs in the
    ``bentoml serve`` process, which imports service.py to build its watchers."""
    from bentoml._internal.utils.circus import Arbiter
    from circus.arbiter import Arbiter as CircusArbiter
    from tornado import gen

    @gen.coroutine
    def _stop_watchers(self, close_output_streams=False, watcher_iter_func=None):
        watchers = list((watcher_iter_func or self.iter_watchers)(reverse=False))
        for stage in ([w for w in watchers if w.name == "service"], [w for w in watchers if w.name != "service"]):
            yield gen.multi([w._stop(close_output_streams) for w in stage])

    def start(self, cb=None) -> None:
        self.exit_stack.__enter__()
        try:
            future = CircusArbiter.start(self, cb)  # runs the arbiter's loop until every watcher has stopped
        finally:
            self.exit_stack.__exit__(None, None, None)
        if exc := future.exception():
            raise exc

    CircusArbiter._stop_watchers = _stop_watchers
    Arbiter.start = start
    Arbiter.stop = CircusArbiter.stop


# How long /readyz waits for each model service's own /readyz. A model service that is still loading has its
# socket bound (the arbiter holds it) but nobody accepting, so a probe would otherwise wait out its whole timeout.
PROBE_TIMEOUT_S = 1.0


def readiness_probe_answers_while_dependencies_load() -> None:
    """Upstream's ``/readyz`` asks each dependency's ``/readyz`` with a 5 s timeout and catches only one kind of
    timeout: a model service still loading makes the probe raise, and ``/readyz`` answers 500 (after the traffic
    timeout, before :func:`answer_errors_at_once`) or takes 5 s. Here a dependency that does not answer 200 within
    ``PROBE_TIMEOUT_S`` is not ready, and ``/readyz`` answers 503 at once; the response is released either way."""
    import aiohttp
    from _bentoml_impl.client.proxy2 import AsyncClient

    async def is_ready(self, timeout: float | None = None) -> bool:
        client = await self._session_manager.get_session()
        wait = aiohttp.ClientTimeout(total=min(timeout or PROBE_TIMEOUT_S, PROBE_TIMEOUT_S))
        try:
            async with client.get(self._readyz_endpoint, timeout=wait) as resp:
                return resp.status == 200
        except (aiohttp.ClientError, asyncio.TimeoutError):
            return False

    AsyncClient.is_ready = is_ready


def dispatch_when_idle() -> None:
    """Adaptive batching without the learned hold-back: a batch leaves as soon as the model is free.

    Upstream's dispatcher, while the model is idle, holds a request back for the average queue wait it has seen,
    hoping for company. After a burst that average is large, and every later lone request waits it out, which
    feeds on itself. On a CPU, where the forward pass uses every core and batching adds no throughput, holding
    back buys nothing: requests that arrive while a batch runs still queue and leave together as the next batch
    (up to max_batch_size), so batches form exactly when there is load. Keeping the learned wait at zero gives that.
    """
    from bentoml._internal.marshal import dispatcher

    learn = dispatcher.Optimizer.trigger_refresh

    def trigger_refresh(self) -> None:
        learn(self)  # keep learning the batch cost model (o_a, o_b) used for the latency bound
        self.wait = 0

    dispatcher.Optimizer.trigger_refresh = trigger_refresh


def strict_multipart(spool_max_size: int) -> None:
    """Multipart bodies as this service takes them, in place of upstream's parser:

    - file fields take uploaded files only. Upstream treats a plain string in a file field as a URL and downloads
      it from the server (no size cap; private addresses unguarded where uvloop is missing). This service never
      fetches what a caller names: such a field is a 400;
    - a malformed body (no boundary, broken parts) is a 400 saying so; upstream turns Starlette's 400 into a 500;
    - a client that goes away mid-upload is logged as such (400), not as a server error;
    - an upload stays in memory while it is parsed, up to ``spool_max_size`` (it is read whole right after):
      Starlette spools a file part over 1 MiB to a temporary file, one thread hop per chunk.
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
    MultiPartParser.spool_max_size = spool_max_size


class _ClientErrorsOnOneLine(logging.Filter):
    """Upstream logs a full ERROR traceback for every request a client got wrong (4xx). Those are the caller's
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


def upload_name(path: Path) -> str:
    """The file name a client gave an upload. BentoML 1.4.39 keeps it only as the suffix of the temporary file it
    writes (``tempfile``'s "tmp" and eight random characters come first)."""
    name = Path(path).name
    return name[11:] if name.startswith("tmp") and len(name) > 11 else name


def async_client_per_caller(url: str, **kwargs):
    """An ``AsyncHTTPClient`` for one concurrent caller. BentoML 1.4.39's client closes every file it opened for
    uploads whenever any of its calls ends, so two calls in flight on one client fail ("seek of closed file")."""
    import bentoml

    return bentoml.AsyncHTTPClient(url, **kwargs)
