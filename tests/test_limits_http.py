"""Every row of the README's error table, over HTTP, on every route that takes an image, answered at once.

A refusal that waits for the traffic timeout holds one of the gateway's concurrency slots all that while, so a
few kilobytes of bad uploads would lock every user out: each 4xx here must come back within two seconds, with a
JSON body that names the problem."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import struct
import time
import zlib

import numpy as np
import pytest
import requests
from PIL import Image

from conftest import ROOT

log = logging.getLogger(__name__)
SAMPLE = ROOT / "data" / "images" / "scene_900.png"
PROMPT = 2.0  # seconds a refusal may take

# route -> (file field, other form fields)
IMAGE_ROUTES = {
    "/segment": ("image", {"model": "unet", "output": "mask"}),
    "/analyze": ("image", {"model": "unet"}),
    "/predict_from_file/": ("file", {"model_name": "unet"}),
    "/predict": ("file", {}),
}


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_claiming(width: int, height: int) -> bytes:
    """A valid PNG header saying ``width`` x ``height`` RGB, followed by a few bytes of pixel data: small on the
    wire, enormous if anyone decoded it before checking the header."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 1024)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def real_7000() -> bytes:
    return _png(Image.new("L", (7000, 7000)))


def _text(r: requests.Response) -> str:
    """The error message(s) of a JSON error body, as one string (the body must be JSON)."""
    body = r.json()
    items = body if isinstance(body, list) else [body]
    return " ".join(str(i.get("error") or i.get("detail")) for i in items)


def post(url: str, route: str, body: bytes | object, filename: str = "x.png") -> tuple[requests.Response, float]:
    field, data = IMAGE_ROUTES[route]
    t0 = time.perf_counter()
    r = requests.post(url + route, files={field: (filename, body, "image/png")}, data=data, timeout=30)
    return r, time.perf_counter() - t0


def _refusals(real_7000: bytes) -> dict:
    """case -> (upload, status, words the message must contain)"""
    jpeg = io.BytesIO()
    Image.open(SAMPLE).convert("RGB").save(jpeg, format="JPEG")
    return {
        "pixels from the header 7000x7000": (png_claiming(7000, 7000), 413, "7000x7000"),
        "pixels from the header 30000x30000": (png_claiming(30_000, 30_000), 413, "pixels"),
        "a real 7000x7000 PNG": (real_7000, 413, "49,000,000 pixels"),
        "empty": (b"", 400, "empty"),
        "corrupt": (b"\x89PNG\r\n\x1a\n" + b"\x00" * 300, 400, "not a decodable image"),
        "truncated": (jpeg.getvalue()[: len(jpeg.getvalue()) // 2], 400, "truncated"),
        "unknown format": (b"%PDF-1.7\n" + b"0" * 500, 400, "not a decodable image"),
        "too small": (_png(Image.new("RGB", (4, 4))), 400, "at least"),
        "floating point": (_tiff_f32(), 400, "mode F"),
    }


def _tiff_f32() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.zeros((16, 16), np.float32)).save(buf, format="TIFF")
    return buf.getvalue()


@pytest.mark.parametrize("route", list(IMAGE_ROUTES))
def test_every_bad_upload_is_refused_at_once_with_its_reason(server, route, real_7000):
    slow = []
    for case, (body, status, words) in _refusals(real_7000).items():
        r, took = post(server, route, body)
        log.info("%s %s: %d in %.3f s", route, case, r.status_code, took)
        assert r.status_code == status, (case, r.status_code, r.text)
        assert words in _text(r), (case, r.text)
        if took >= PROMPT:
            slow.append((case, round(took, 2)))
    assert not slow, slow


@pytest.mark.parametrize("route", list(IMAGE_ROUTES))
def test_a_body_over_the_request_limit_is_413_at_once_declared_or_chunked(server, route):
    field, data = IMAGE_ROUTES[route]
    big = b"\x89PNG" + b"\x00" * (21 * 1024 * 1024)
    t0 = time.perf_counter()
    r = requests.post(server + route, files={field: ("big.png", big, "image/png")}, data=data, timeout=30)
    assert r.status_code == 413 and "limit" in _text(r) and time.perf_counter() - t0 < PROMPT

    def chunks():  # no Content-Length: the body is counted as it arrives
        yield (f'--x\r\nContent-Disposition: form-data; name="{field}"; filename="big.png"\r\n'
               'Content-Type: image/png\r\n\r\n').encode()
        for _ in range(24):
            yield b"\x00" * (1024 * 1024)
        yield b"\r\n--x--\r\n"

    t0 = time.perf_counter()
    r = requests.post(server + route, data=chunks(), headers={"content-type": "multipart/form-data; boundary=x"},
                      timeout=30)
    assert r.status_code == 413 and "limit" in _text(r) and time.perf_counter() - t0 < PROMPT


@pytest.mark.parametrize("route", list(IMAGE_ROUTES))
def test_a_chunked_over_limit_image_is_413_at_once(server, route):
    field, data = IMAGE_ROUTES[route]
    parts = [(f'--x\r\nContent-Disposition: form-data; name="{field}"; filename="x.png"\r\n'
              'Content-Type: image/png\r\n\r\n').encode(), png_claiming(10_000, 10_000), b"\r\n"]
    parts += [f'--x\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode() for k, v in data.items()]
    parts.append(b"--x--\r\n")
    t0 = time.perf_counter()
    r = requests.post(server + route, data=iter(parts), headers={"content-type": "multipart/form-data; boundary=x"},
                      timeout=30)
    assert r.status_code == 413 and "10000x10000" in _text(r), r.text
    assert time.perf_counter() - t0 < PROMPT


@pytest.mark.parametrize("route,fields,words", [
    ("/segment", {"model": "yolo"}, "mask2former"),
    ("/segment", {"output": "svg"}, "overlay"),
    ("/segment", {"alpha": "2"}, "less than or equal to 1"),
    ("/segment", {"format": "gif"}, "jpeg"),
    ("/analyze", {"model": "yolo"}, "mask2former"),
    ("/predict_from_file/", {"model_name": "yolo"}, "available"),
])
def test_bad_parameters_are_400_at_once_listing_what_is_valid(server, route, fields, words):
    field, _ = IMAGE_ROUTES[route]
    t0 = time.perf_counter()
    r = requests.post(server + route, files={field: ("x.png", SAMPLE.read_bytes(), "image/png")}, data=fields,
                      timeout=30)
    assert r.status_code == 400 and words in json.dumps(r.json()), r.text
    assert time.perf_counter() - t0 < PROMPT


def test_a_burst_of_over_limit_uploads_locks_nobody_out(server):
    """40 bombs at once (more than the 32 slots), then a normal request: served, not 429."""
    import aiohttp

    bomb = png_claiming(7000, 7000)

    async def one(session, route):
        field, data = IMAGE_ROUTES[route]
        form = aiohttp.FormData()
        form.add_field(field, bomb, filename="x.png", content_type="image/png")
        for k, v in data.items():
            form.add_field(k, v)
        async with session.post(server + route, data=form) as r:
            await r.read()
            return r.status

    async def burst():
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as s:
            routes = [list(IMAGE_ROUTES)[i % len(IMAGE_ROUTES)] for i in range(40)]
            return await asyncio.gather(*(one(s, r) for r in routes))

    t0 = time.perf_counter()
    codes = asyncio.run(burst())
    took = time.perf_counter() - t0
    r = requests.post(f"{server}/segment", files={"image": SAMPLE.open("rb")}, data={"model": "unet"}, timeout=60)
    log.info("40 over-limit uploads in %.2f s: %s; then a normal request: %d", took, sorted(set(codes)), r.status_code)
    assert set(codes) <= {413, 429} and codes.count(413) >= 32, codes
    assert took < 10
    assert r.status_code == 200


def _poll_readyz(url: str, proc, deadline_s: float = 180) -> list[tuple[object, float]]:
    """/readyz, from the moment /livez answers (the gateway is up) until it says 200: [(status, seconds), ...]."""
    answers: list[tuple[object, float]] = []
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            live = requests.get(f"{url}/livez", timeout=30).status_code == 200
        except requests.RequestException:
            live = False
        if not live:
            time.sleep(0.1)
            continue
        t0 = time.perf_counter()
        r = requests.get(f"{url}/readyz", timeout=30)
        answers.append((r.status_code, round(time.perf_counter() - t0, 3)))
        if r.status_code == 200:
            break
        time.sleep(0.2)
    return answers


def test_readyz_is_503_at_once_while_a_model_loads(demo_store, tmp_path):
    """While a model service is loading (at start-up, and when a killed worker is being replaced), /readyz says
    503 promptly, never a 500 or a wait; then 200."""
    import psutil

    from conftest import start_server, stop_server

    logfile = tmp_path / "serve.log"
    proc, url = start_server("service:Segmentation", demo_store, logfile)
    try:
        at_start = _poll_readyz(url, proc)
        if not at_start and proc.poll() is not None and "Address already in use" in logfile.read_text():
            # BentoML's arbiter picks its control ports at random and may lose a race for one
            proc, url = start_server("service:Segmentation", demo_store, logfile)
            at_start = _poll_readyz(url, proc)
        assert at_start and at_start[-1][0] == 200, (at_start[-5:], logfile.read_text()[-3000:])
        workers = psutil.Process(proc.pid).children(recursive=True)
        worker = next(p for p in workers if "mask2former_model" in p.cmdline())
        worker.kill()  # the arbiter starts a fresh one, which loads its model again
        worker.wait(10)
        after_kill = _poll_readyz(url, proc)
    finally:
        stop_server(proc, grace_s=60)
    log.info("readyz during start-up: %s; after a model worker was killed: %s", at_start, after_kill)
    assert after_kill and after_kill[-1][0] == 200, (after_kill[-5:], logfile.read_text()[-3000:])
    loading = at_start[:-1] + after_kill[:-1]
    assert after_kill[:-1], "the replaced worker was ready at the first probe: nothing checked while it loaded"
    assert all(status == 503 and took < PROMPT for status, took in loading), loading
