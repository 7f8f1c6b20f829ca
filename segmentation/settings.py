"""Every ``SEG_*`` environment variable, read and validated in one place.

    from segmentation.settings import settings
    settings().max_pixels

``settings()`` reads the environment once (again only if a ``SEG_*`` variable changed, as tests do) into a frozen
:class:`Settings`. A bad value raises :class:`SettingsError` naming the variable, what it holds and what is
accepted; ``service.py`` calls it at import, so a misconfigured server stops at start instead of answering 500
later.

| variable | meaning | default |
|---|---|---|
| ``SEG_MAX_UPLOAD_BYTES`` | largest image file taken | 20 MiB |
| ``SEG_MAX_REQUEST_BYTES`` | largest request body taken (413 before it is read) | upload limit + 64 KiB |
| ``SEG_MAX_BATCH_IMAGES`` | images one ``/segment_batch`` call or Label Studio ``/predict`` may carry | 16 |
| ``SEG_MAX_BATCH_REQUEST_BYTES`` | largest body of those many-image calls | 64 MiB |
| ``SEG_IMAGE_URL_HOSTS`` | hosts whose image URLs Label Studio tasks may name, comma-separated (http/https) | none |
| ``SEG_ENSEMBLE_WEIGHTS`` | ``dilatednet=0.4,mask2former=0.6``: the ensemble's blend, not the fitted | fitted |
| ``SEG_MAX_PIXELS`` | largest image, width x height, read from its header | 40,000,000 |
| ``SEG_MIN_SIDE`` | smallest side of an image | 8 |
| ``SEG_MAX_CONCURRENCY`` | requests in flight at the gateway; the rest get 429 at once | 32 |
| ``SEG_TIMEOUT_S`` | seconds one request may take | 120 |
| ``SEG_MAX_DOWNLOAD_BYTES`` | largest artifact ``import_models.py`` downloads | 4 GiB |
| ``SEG_MAX_BATCH_SIZE`` | cap on every model's batch (1: no adaptive batching) | each model's own |
| ``SEG_MAX_LATENCY_MS`` | the gateway refuses (503) a call its model would not answer within this | each model's own |
| ``SEG_SPLIT_BATCH`` | ``0``: UNet runs a batch as one forward instead of one per thread | 1 |
| ``SEG_PRECISION`` | ``fp32`` or ``bf16`` for every model | what each import recorded |
| ``SEG_RUNTIME`` | ``native``: every forward in its framework, not the compiled runtime chosen at import | ``auto`` |
| ``SEG_NUM_THREADS`` / ``SEG_<MODEL>_THREADS`` | threads per model worker | the CPUs, split between workers |
| ``SEG_MODEL_WORKERS`` / ``SEG_<MODEL>_WORKERS`` | processes per model | 1 |
"""

from __future__ import annotations

import os
from functools import lru_cache
from typing import Literal, Mapping

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError

from . import MODEL_NAMES

PREFIX = "SEG_"
MiB = 1024 * 1024


class SettingsError(ValueError):
    """A ``SEG_*`` variable holds a value the service cannot run with; the message names it."""


class Settings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    max_upload_bytes: PositiveInt = 20 * MiB
    max_request_bytes: PositiveInt | None = None  # None: derived from the upload limit (see request_limit)
    max_pixels: PositiveInt = 40_000_000
    max_batch_images: PositiveInt = 16
    max_batch_request_bytes: PositiveInt = 64 * MiB
    image_url_hosts: str = ""
    ensemble_weights: str = ""  # checked by segmentation.ensemble.parse_weights when the service starts
    min_side: PositiveInt = 8
    max_concurrency: PositiveInt = 32
    timeout_s: float = Field(120.0, gt=0)
    max_download_bytes: PositiveInt = 4 * 1024 * MiB
    max_batch_size: PositiveInt | None = None
    max_latency_ms: PositiveInt | None = None
    split_batch: bool = True
    precision: Literal["fp32", "bf16"] | None = None
    runtime: Literal["auto", "native"] = "auto"
    num_threads: PositiveInt | None = None
    model_workers: PositiveInt | None = None
    threads: dict[str, PositiveInt] = {}  # SEG_<MODEL>_THREADS, by model name
    workers: dict[str, PositiveInt] = {}  # SEG_<MODEL>_WORKERS, by model name

    @property
    def request_limit(self) -> int:
        """Bytes a request body may have: the set limit, or the upload limit plus room for the form's fields."""
        return self.max_request_bytes or self.max_upload_bytes + 64 * 1024


    @property
    def batch_request_limit(self) -> int:
        """Bytes the body of a many-image call may have (never less than one request's)."""
        return max(self.max_batch_request_bytes, self.request_limit)

    @property
    def url_hosts(self) -> frozenset[str]:
        """The allow-list of image hosts, lower-case; empty: no URL is fetched."""
        return frozenset(h.strip().lower() for h in self.image_url_hosts.split(",") if h.strip())


_PER_MODEL = ("threads", "workers")


def _variable(loc: tuple) -> str:
    """The environment variable behind a field's location in a validation error."""
    if loc and loc[0] in _PER_MODEL and len(loc) > 1:
        return f"{PREFIX}{str(loc[1]).upper()}_{str(loc[0]).upper()}"
    return PREFIX + str(loc[0]).upper() if loc else PREFIX + "*"


def from_environ(environ: Mapping[str, str]) -> Settings:
    """A :class:`Settings` from ``environ``; empty variables count as unset. Raises :class:`SettingsError`."""
    values: dict = {}
    for name in Settings.model_fields:
        if name in _PER_MODEL:
            per_model = {m: environ.get(f"{PREFIX}{m.upper()}_{name.upper()}", "").strip() for m in MODEL_NAMES}
            values[name] = {m: v for m, v in per_model.items() if v}
        elif (raw := environ.get(PREFIX + name.upper(), "").strip()) != "":
            values[name] = raw
    try:
        return Settings(**values)
    except ValidationError as e:
        problems = []
        for err in e.errors(include_url=False):
            var = _variable(err["loc"])
            got = environ.get(var, "")
            problems.append(f"{var}={got!r}: {err['msg'].lower()}")
        raise SettingsError("bad setting: " + "; ".join(problems) + " (unset a variable for its default)") from None


@lru_cache(maxsize=4)
def _cached(items: tuple[tuple[str, str], ...]) -> Settings:
    return from_environ(dict(items))


def settings() -> Settings:
    """The settings of this process, from its ``SEG_*`` environment variables."""
    return _cached(tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith(PREFIX))))
