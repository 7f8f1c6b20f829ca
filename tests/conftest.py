"""Shared fixtures.

The model store is a fresh ``BENTOML_HOME`` per test session, filled once by ``import_models.py --demo`` (about
4 minutes on 2 cores) the first time a test asks for it. ``SEG_TEST_BENTOML_HOME=/some/dir`` reuses a store
that already holds the three demo models, to iterate faster.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CITYSCAPES = ROOT.parent / "shared" / "cityscapes-sample"

_reuse = os.environ.get("SEG_TEST_BENTOML_HOME")
STORE_HOME = Path(_reuse) if _reuse else Path(tempfile.mkdtemp(prefix="seg-test-bentoml-"))
os.environ["BENTOML_HOME"] = str(STORE_HOME)  # before bentoml is imported anywhere
os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def stored_tags(name: str) -> list[str]:
    import bentoml

    try:
        return sorted(str(m.tag) for m in bentoml.models.list(name))
    except bentoml.exceptions.NotFound:
        return []


@pytest.fixture(scope="session")
def demo_store() -> Path:
    """A model store holding the three demo models and their ensemble (imported once per session)."""
    import import_models

    from segmentation import MODEL_NAMES

    if not all(stored_tags(n) for n in MODEL_NAMES):
        assert import_models.main(["--demo"]) == 0  # the ensemble too
    elif not stored_tags("ensemble"):
        assert import_models.main(["--ensemble"]) == 0
    return STORE_HOME


@pytest.fixture(scope="session")
def cityscapes() -> Path:
    if not (CITYSCAPES / "images").is_dir():
        pytest.skip("../shared/cityscapes-sample is not present")
    return CITYSCAPES


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(target: str, home: Path, log: Path, cwd: Path = ROOT, env: dict | None = None):
    """Start ``bentoml serve TARGET`` on a free loopback port, in a session of its own: (Popen, URL)."""
    port = _free_port()
    env = {**os.environ, **(env or {}), "BENTOML_HOME": str(home)}
    with log.open("wb") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "bentoml", "serve", target, "--host", "127.0.0.1", "--port", str(port)],
            cwd=cwd, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True,
        )
    return proc, f"http://127.0.0.1:{port}"


def stop_server(proc: subprocess.Popen, grace_s: float = 30) -> None:
    """SIGTERM to the server's whole process group, SIGKILL after ``grace_s``; nothing if it already exited."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@contextlib.contextmanager
def bentoml_serve(target: str, home: Path, log: Path, cwd: Path = ROOT, timeout: float = 180, env: dict | None = None,
                  handle: list | None = None):
    """Run ``bentoml serve TARGET`` on a free loopback port; yield its URL once /readyz answers 200.
    ``handle``, if given, receives the Popen object (to find the server's worker processes)."""
    from segmentation.readiness import wait_until_ready

    proc, url = start_server(target, home, log, cwd, env)
    if handle is not None:
        handle.append(proc)
    try:
        try:
            wait_until_ready(url, timeout, alive=lambda: proc.poll() is None)
        except RuntimeError as e:
            raise RuntimeError(
                f"bentoml serve {target}: {e} (exit code {proc.poll()}):\n{log.read_text()[-4000:]}"
            ) from None
        yield url
    finally:
        stop_server(proc)


@pytest.fixture(scope="session")
def server(demo_store, tmp_path_factory):
    """One `bentoml serve service:Segmentation` for the whole session, on the demo models."""
    with bentoml_serve("service:Segmentation", demo_store, tmp_path_factory.mktemp("serve") / "serve.log") as url:
        yield url


def served_mask(server: str, path: Path, model: str):
    """``POST /segment output=mask`` for the image file at ``path``: the (H, W) uint8 class ids."""
    import io

    import numpy as np
    import requests
    from PIL import Image

    r = requests.post(
        f"{server}/segment", files={"image": (path.name, path.read_bytes())}, data={"model": model, "output": "mask"},
        timeout=120,
    )
    assert r.status_code == 200, r.text
    return np.asarray(Image.open(io.BytesIO(r.content)))


def described(models: list[dict]) -> list[dict]:
    """``/models`` without each model's ``queue``: what the gateway has in flight and has learned so far differs
    between two servers that answered the same requests."""
    assert all("queue" in m for m in models if m["name"] != "ensemble")
    return [{k: v for k, v in m.items() if k != "queue"} for m in models]
