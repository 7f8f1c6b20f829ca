"""One BentoML service per model: it owns its model, its threads and its adaptive batching.

Each runs in its own process(es) behind ``bentoml.depends``. Its ``predict`` takes a list of (H, W, 3) uint8 RGB
images at their original size and returns, per image, the (H, W) uint8 label map and the stage timings of the
batch it rode in. Frameworks are imported inside ``__init__``, so ``bentoml build`` and the gateway never load
them.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Annotated, Any

import aiohttp
import bentoml
import numpy as np
from bentoml.validators import ContentType

from .admission import RETRY_IN, ModelQueue
from .bentoml_workarounds import RUNNER_CONNECTION
from .preprocessing import compact_scores, warm_up
from .settings import settings
from .registry import ARCHITECTURES, MODEL_NAMES, SPECS, pipeline_of
from .runtimes import measured_seconds_per_image
from .store import IMPORT_HINT, load_predictor

log = logging.getLogger(__name__)


def _cgroup_cpu_quota() -> float | None:
    """The CPU quota (``docker run --cpus``) in CPUs, from cgroup v2 or v1; None when there is none."""
    try:  # cgroup v2: "max 100000" or "150000 100000"
        quota, period = open("/sys/fs/cgroup/cpu.max").read().split()
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    for base in ("/sys/fs/cgroup/cpu", "/sys/fs/cgroup/cpu,cpuacct"):  # cgroup v1: -1 means no quota
        try:
            quota = int(open(f"{base}/cpu.cfs_quota_us").read())
            period = int(open(f"{base}/cpu.cfs_period_us").read())
            return None if quota <= 0 else quota / period
        except (OSError, ValueError):
            continue
    return None


def available_cpus() -> int:
    """CPUs this process may use: its affinity mask, capped by a container's CPU quota."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = _cgroup_cpu_quota()
    return max(1, min(n, int(quota))) if quota else n


# Processes per model service by default, when the CPUs allow (ModelSpec.workers). Each worker holds its own copy
# of the model, so one worker per model: a second copy of a large model would not fit the memory budget, and UNet
# gets its cores busy inside one process by splitting a batch over its threads (SPLIT_BATCH): as fast as two
# single-threaded workers, steadier, and one copy of the weights less (README, Workers and threads). Two workers
# also share calls unevenly: the gateway keeps its connections, and each stays with the worker that accepted it.
PREFERRED_WORKERS = {s.name: s.workers for s in ARCHITECTURES}

# Models whose worker splits a batch over its threads as single-threaded forwards (UNetPredictor.use_lanes).
SPLIT_BATCH = {s.name for s in ARCHITECTURES if s.split_batch}


def parallelism(name: str) -> tuple[int, int]:
    """(workers, threads per worker) for model ``name``'s service.

    ``SEG_<NAME>_WORKERS`` / ``SEG_<NAME>_THREADS`` set one model, ``SEG_MODEL_WORKERS`` / ``SEG_NUM_THREADS`` every
    model. Unset, a model gets its preferred number of workers as far as the CPUs allow and the CPUs are split
    between them (available_cpus: affinity and container quota), so the workers' threads never outnumber the CPUs.
    """
    cpus, s = available_cpus(), settings()
    preferred = max(1, min(PREFERRED_WORKERS.get(name, 1), cpus))
    threads = s.threads.get(name) or s.num_threads or max(1, cpus // preferred)
    workers = s.workers.get(name) or s.model_workers or max(1, min(preferred, cpus // threads))
    return workers, threads


# max_batch_size and max_latency_ms per model (ModelSpec). On 2 cores batching hardly raises raw throughput (the forward
# already uses both cores) and large batches lower it; each cap is the best batch size `make bench` found for that
# model (UNet's batch of 2 is one image per thread): batches up to it amortise per-call overhead and keep memory
# down. The latency bound is the longest a call may take, queue included, before it is refused (503), so it is set
# well above a full batch of the `full` presets.
BATCHING = {s.name: dict(max_batch_size=s.max_batch_size, max_latency_ms=s.max_latency_ms) for s in ARCHITECTURES}


def api_options(name: str) -> dict:
    """``@bentoml.api`` options for a model's ``predict``. ``SEG_MAX_BATCH_SIZE=1`` serves without adaptive
    batching (one image per call; benchmarks/benchmark.py compares); another number caps the batch size.
    ``SEG_MAX_LATENCY_MS`` sets every model's latency bound."""
    cap = settings().max_batch_size
    if cap == 1:
        return {}
    return {"batchable": True, **BATCHING[name], "max_latency_ms": DISPATCHER_HEADROOM * latency_bound_ms(name),
            **({"max_batch_size": cap} if cap else {})}


def latency_bound_ms(name: str) -> int:
    """The longest model ``name`` may take to answer a call, queue included, before the gateway refuses the call
    at arrival (segmentation/admission.py): ``SEG_MAX_LATENCY_MS``, else the model's own."""
    return settings().max_latency_ms or BATCHING[name]["max_latency_ms"]


# The gateway refuses at arrival what would finish past the bound; BentoML's dispatcher, which cancels the oldest
# queued call by its own estimate, is left a wider bound so it only catches calls let in on a stale estimate.
DISPATCHER_HEADROOM = 2


class ModelUnavailable(bentoml.exceptions.ServiceUnavailable):
    """A model service cannot answer this call now (its queue is too long, or its worker restarted): a 503 whose
    message says which model and what to do, with ``Retry-After`` (bentoml_workarounds lets both through)."""

    def __init__(self, message: str, retry_after_s: int):
        super().__init__(message)
        self.retry_after_s = retry_after_s


# The store entries served: class attributes of the model services (so `bentoml build` packs them into the
# Bento), and read by the gateway for metadata without loading any framework.
MODEL_REFS = {name: bentoml.models.BentoModel(f"{name}:latest") for name in MODEL_NAMES}


def set_threads(framework: str, threads: int | None = None) -> None:
    """Intra-op threads for ``keras`` (TensorFlow) or ``pytorch`` (default: every available CPU); call before the
    framework runs (TensorFlow's cannot change afterwards)."""
    threads = threads or available_cpus()
    if framework == "keras":
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    else:
        import torch

        torch.set_num_threads(threads)
        try:
            torch.set_num_interop_threads(1)
        except RuntimeError:  # already set: two torch services share a process when run in-process (tests)
            pass


def stored_model(ref: bentoml.models.BentoModel, name: str):
    """The store entry behind ``ref``, or a start-up error that names the model and the import command."""
    try:
        stored = ref.stored
    except bentoml.exceptions.NotFound:
        stored = None
    if stored is None:
        require_models()  # raises, naming what is missing
    return stored


def require_models() -> None:
    """Fail at start-up, before anything loads, naming every model missing from the store and the import command."""
    missing = []
    for name in MODEL_REFS:
        try:
            bentoml.models.get(f"{name}:latest")
        except bentoml.exceptions.NotFound:
            missing.append(name)
    if missing:
        raise bentoml.exceptions.NotFound(
            f"model {', '.join(repr(m) for m in missing)} is not in the BentoML model store "
            f"({os.environ.get('BENTOML_HOME', '~/bentoml')}); import it first: {IMPORT_HINT} "
            f"(or --{missing[0]} PATH_OR_URL for your own weights)"
        )


# What a model service answers: per image, its labels and the batch's stage times. The media type is declared
# because BentoML 1.4.39 otherwise derives it from the output's JSON schema, which pydantic rebuilds for every
# response, on the model process's event loop, in time a waiting batch could have used.
Predictions = Annotated[list[dict[str, Any]], ContentType("application/json")]
Served = Annotated[dict[str, Any], ContentType("application/json")]


def model_service(name: str) -> type:
    """Build the service class for model ``name`` (they differ only in name and their spec's numbers)."""

    class ModelService:
        model_ref = MODEL_REFS[name]
        model_name = name

        def __init__(self) -> None:
            stored = stored_model(MODEL_REFS[name], name)
            self.metadata = dict(stored.info.metadata)
            self.tag = str(stored.tag)
            threads = parallelism(name)[1]
            set_threads(self.metadata["framework"], threads)
            self.predictor = load_predictor(name, stored.path, self.metadata, threads=threads)
            # A model with a pipeline gets images the gateway resized, and hands back its answers at the input
            # size for the gateway to finish (service.py); without one (a Mask2Former whose processor sizes images
            # by their shortest edge, say) the model's own processor does both ends.
            self.finish = pipeline_of(name, self.metadata) is None
            if SPECS[name].task == "multiclass":  # class scores: its labels_at, or compact_scores, runs compiled loops
                warm_up()
            if name in SPLIT_BATCH and threads > 1 and settings().split_batch and self.predictor.runtime == "native":
                self.predictor.use_lanes(threads)  # a compiled forward runs a batch image by image on every thread
            log.info("%s: loaded %s with %d threads, %s %s", name, self.tag, threads, self.predictor.runtime,
                     self.predictor.precision)

        @bentoml.api
        def serving(self) -> Served:
            """What this process runs the forward pass in (a compiled runtime can fall back to native at load)."""
            return {"runtime": self.predictor.runtime, "precision": self.predictor.precision}

        @bentoml.api(**api_options(name))
        def predict(self, images: list[np.ndarray]) -> Predictions:
            result = self.predictor.predict(images, finish=self.finish)
            t0 = time.perf_counter()
            # class scores travel back summarised: the gateway finishes the same labels from a fraction of the bytes
            outputs = result.labels if self.finish else [
                compact_scores(o) if o.ndim == 3 else o for o in result.labels]
            timings = {**result.timings_ms, "batch_size": len(images)}
            timings["postprocess"] = timings.get("postprocess", 0.0) + (time.perf_counter() - t0) * 1e3
            return [{"output": output, "timings_ms": timings} for output in outputs]

        if SPECS[name].task == "multiclass":  # the ensemble's members: class probabilities (segmentation/ensemble.py)

            @bentoml.api(**api_options(name))
            def probabilities(self, images: list[np.ndarray]) -> Predictions:
                result = self.predictor.probabilities(images)
                timings = {**result.timings_ms, "batch_size": len(images)}
                return [{"output": output, "timings_ms": timings} for output in result.labels]

    ModelService.__name__ = ModelService.__qualname__ = f"{name.capitalize()}Model"
    return bentoml.service(
        name=f"{name}_model",
        workers=parallelism(name)[0],
        traffic={"timeout": 120, "max_concurrency": 64},
        runner_connection=RUNNER_CONNECTION,
    )(ModelService)


def in_model_ms(timings: dict[str, float]) -> float:
    """A model service's time for the batch an answer rode in: its preprocess, inference and postprocess stages."""
    return sum(timings.get(k, 0.0) for k in ("preprocess", "inference", "postprocess"))


_QUEUES: dict[str, ModelQueue] = {}


def model_queue(name: str) -> ModelQueue:
    """What the gateway has in flight to model ``name``, with the time per image its import measured for the
    served runtime as the first estimate."""
    if name not in _QUEUES:
        try:
            seconds = measured_seconds_per_image(stored_model(MODEL_REFS[name], name).info.metadata)
        except bentoml.exceptions.NotFound:
            seconds = None
        _QUEUES[name] = ModelQueue(latency_bound_ms(name) / 1e3, parallelism(name)[0], seconds)
    return _QUEUES[name]


async def call_model(
    service: Any, images: list[np.ndarray], name: str, api: str = "predict"
) -> list[dict[str, Any]]:
    """``service.to_async.predict(images)`` (or another ``api``) from the gateway, called a second time if the
    connection failed.

    A call that would finish past the model's latency bound behind the images already in flight is refused at
    once (segmentation/admission.py), and so is one the model's batching queue refuses: both are a
    :class:`ModelUnavailable` saying which model, why and when to retry.

    The gateway keeps connections to each model service alive; one the model's server has just closed can still
    be picked for a call, which then fails before the model sees it (seen in a test flood as "Can not write
    request body", answered 503). A prediction has no side effects, so calling again is safe. A timeout is not
    retried, and a second failure is raised (the caller answers 503)."""
    queue = model_queue(name)
    refusal = queue.admit(len(images))
    if refusal is not None:
        raise ModelUnavailable(
            f"the {name} model is busy: {refusal.ahead} "
            f"{'image is' if refusal.ahead == 1 else 'images are'} queued ahead of this one, about "
            f"{refusal.finish_s:.3g} s of work at {refusal.seconds_per_image:.3g} s an image, past its latency bound "
            f"({queue.bound_s:g} s); {RETRY_IN.format(refusal.retry_after_s)}, or send fewer requests at once "
            "(SEG_MAX_LATENCY_MS raises the bound)",
            retry_after_s=refusal.retry_after_s,
        )
    try:
        for attempt in (1, 2):
            try:
                answers = await getattr(service.to_async, api)(images)
            except bentoml.exceptions.ServiceUnavailable:
                bound_s = -(-latency_bound_ms(name) // 1000)
                raise ModelUnavailable(
                    f"the {name} model is busy: its batching queue holds more than it can finish within twice its "
                    f"latency bound ({bound_s} s), so this call was refused; retry later, or send fewer requests at "
                    "once (SEG_MAX_LATENCY_MS raises the bound)",
                    retry_after_s=bound_s,
                ) from None
            except aiohttp.ClientConnectionError as e:
                if attempt == 2 or isinstance(e, asyncio.TimeoutError):
                    raise
                log.info("%s model service: %r; calling again on a fresh connection", name, e)
                continue
            timings = answers[0].get("timings_ms") if answers and isinstance(answers[0], dict) else None
            if timings:  # the batch this call rode in: its time in the model and its size
                queue.learn(in_model_ms(timings), int(timings.get("batch_size", len(images))))
            return answers
    finally:
        queue.done(len(images))
    raise AssertionError("unreachable")


MODEL_SERVICES = {name: model_service(name) for name in MODEL_NAMES}
