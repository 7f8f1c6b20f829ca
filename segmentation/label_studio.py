"""Label Studio's ML-backend protocol: pre-annotations as ``BrushLabels`` in Label Studio's own RLE.

A Label Studio project points its model URL at ``http://<host>:3000/label-studio`` (or
``.../label-studio/<model>``); Label Studio then calls ``/health``, ``/setup`` and ``/predict`` below it. The routes
live in :mod:`segmentation.web`; this module reads the project's labelling config, finds each task's image and
turns a mask into results.

A task names its image by URL. This service never fetches arbitrary URLs: it takes a sample of ``data/images``
(its id, ``data/images/<id>.png``, or this service's ``/images/<id>``), a base64 ``data:`` URL, or an http(s) URL
whose host is in ``SEG_IMAGE_URL_HOSTS`` (empty by default), with the same size and pixel limits as uploads.
"""

from __future__ import annotations

import base64
import binascii
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from urllib.parse import urlparse

import aiohttp
import numpy as np

from .encodings import label_studio_rle
from .samples import ID_PATTERN
from .settings import settings

MAX_CONFIG_CHARS = 1_000_000
_DATA_URL = re.compile(r"^data:(?P<type>[\w.+-]+/[\w.+-]+)?(?:;[\w-]+=[^;,]*)*;base64,(?P<data>.*)$", re.S)
_SAMPLE_PATHS = (re.compile(r"^(?:/?data/images/)(?P<id>[^/]+)\.png$"), re.compile(r"^/images/(?P<id>[^/]+)$"))


class TaskError(ValueError):
    """A task or config this service cannot answer; ``status`` is the HTTP status it stands for."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class BrushConfig:
    """What a labelling config asks for: the ``BrushLabels`` control, its image and its label values, with the
    served class id each stands for."""

    from_name: str
    to_name: str
    data_key: str  # the task's data field holding the image URL ("image" for value="$image")
    labels: dict[int, str]  # served class id -> the config's label value


def parse_config(label_config: str, class_names: list[str]) -> BrushConfig:
    """The first ``<BrushLabels>`` of a Label Studio config, its labels matched to ``class_names`` by value
    (case-insensitive) or by a ``predicted_values`` list on the ``<Label>``."""
    if not isinstance(label_config, str) or not label_config.strip():
        raise TaskError("send the project's label_config (its labelling XML) with the request")
    if len(label_config) > MAX_CONFIG_CHARS:
        raise TaskError(f"the label_config has {len(label_config):,} characters; the limit is {MAX_CONFIG_CHARS:,}")
    if "<!DOCTYPE" in label_config or "<!ENTITY" in label_config:
        raise TaskError("the label_config may not declare a DOCTYPE or entities")
    try:
        root = ET.fromstring(label_config)
    except ET.ParseError as e:
        raise TaskError(f"the label_config is not valid XML: {e}") from None
    brush = next(root.iter("BrushLabels"), None)
    if brush is None or not brush.get("name") or not brush.get("toName"):
        raise TaskError("the label_config has no <BrushLabels name=... toName=...>: this service pre-annotates masks")
    to_name = brush.get("toName").split(",")[0]
    image = next((el for el in root.iter("Image") if el.get("name") == to_name), None)
    if image is None or not (image.get("value") or "").startswith("$"):
        raise TaskError(f"the label_config has no <Image name={to_name!r} value=\"$...\"> for its BrushLabels")
    by_name = {name.lower(): i for i, name in enumerate(class_names)}
    labels: dict[int, str] = {}
    for label in brush.iter("Label"):
        value = label.get("value") or ""
        names = [value] + [v for v in (label.get("predicted_values") or "").split(",") if v]
        for name in names:
            class_id = by_name.get(name.strip().lower())
            if class_id is not None:
                labels.setdefault(class_id, value)
    if not labels:
        raise TaskError(
            "none of the BrushLabels' labels names a class this model predicts; use these values (or list them in "
            f"a label's predicted_values): {', '.join(class_names)}"
        )
    return BrushConfig(brush.get("name"), to_name, image.get("value")[1:], labels)


def image_reference(task: dict, config: BrushConfig) -> str:
    if not isinstance(task, dict) or not isinstance(task.get("data"), dict):
        raise TaskError('a task is {"id": ..., "data": {...}}')
    ref = task["data"].get(config.data_key)
    if not isinstance(ref, str) or not ref:
        raise TaskError(f"the task's data has no {config.data_key!r} with the image's URL")
    return ref


def sample_id(ref: str) -> str | None:
    """The sample a reference names (an id, ``data/images/<id>.png`` or ``/images/<id>``), or None."""
    if ID_PATTERN.match(ref):
        return ref
    path = urlparse(ref).path if ref.startswith(("http://", "https://")) else ref
    for pattern in _SAMPLE_PATHS:
        if (m := pattern.match(path)) and ID_PATTERN.match(m["id"]):
            return m["id"]
    return None


def data_url_bytes(ref: str) -> bytes | None:
    """The bytes of a base64 ``data:`` URL, or None for another kind of reference."""
    if not ref.startswith("data:"):
        return None
    m = _DATA_URL.match(ref)
    if m is None:
        raise TaskError("a data: URL must be base64 (data:image/png;base64,...)")
    if len(m["data"]) > settings().max_upload_bytes * 4 // 3 + 4:
        raise TaskError(f"the data: URL's image is over {settings().max_upload_bytes:,} bytes", status=413)
    try:
        return base64.b64decode(m["data"], validate=True)
    except (binascii.Error, ValueError):
        raise TaskError("the data: URL is not valid base64") from None


def allowed_url(ref: str) -> str | None:
    """``ref`` when it is an http(s) URL on an allowed host; None when it is not a URL; TaskError otherwise."""
    parsed = urlparse(ref)
    if parsed.scheme not in ("http", "https"):
        return None
    host = (parsed.hostname or "").lower()
    if host not in settings().url_hosts:
        raise TaskError(
            f"this service does not fetch images from {host or ref!r}; send a data: URL or a sample id, or add the "
            "host to SEG_IMAGE_URL_HOSTS",
            status=403,
        )
    return ref


async def fetch(url: str, max_bytes: int, timeout_s: float = 30.0) -> bytes:
    """An allowed URL's bytes, at most ``max_bytes``, without following redirects (they could leave the host)."""
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as session:
            async with session.get(url, allow_redirects=False) as response:
                if response.status != 200:
                    raise TaskError(f"fetching {url} answered {response.status}", status=502)
                if (response.content_length or 0) > max_bytes:
                    raise TaskError(f"{url} is {response.content_length:,} bytes; the limit is {max_bytes:,}", 413)
                body = bytearray()
                async for chunk in response.content.iter_chunked(1 << 16):
                    body += chunk
                    if len(body) > max_bytes:
                        raise TaskError(f"{url} is over {max_bytes:,} bytes", status=413)
                return bytes(body)
    except (aiohttp.ClientError, TimeoutError) as e:
        raise TaskError(f"could not fetch {url}: {e!r}", status=502) from None


def brush_results(labels: np.ndarray, config: BrushConfig) -> list[dict]:
    """One ``brushlabels`` result per configured class present in ``labels`` (H, W)."""
    height, width = labels.shape
    present = np.flatnonzero(np.bincount(labels.reshape(-1), minlength=max(config.labels) + 1))
    return [
        {
            "id": f"class-{class_id}",
            "from_name": config.from_name,
            "to_name": config.to_name,
            "type": "brushlabels",
            "original_width": int(width),
            "original_height": int(height),
            "image_rotation": 0,
            "value": {
                "format": "rle",
                "rle": label_studio_rle((labels == class_id).astype(np.uint8) * 255),
                "brushlabels": [value],
            },
        }
        for class_id, value in sorted(config.labels.items())
        if class_id in present
    ]
