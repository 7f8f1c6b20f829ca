"""Waiting for a server (``bentoml serve`` or a container) to answer ``/readyz``: used by the tests and benchmarks."""

from __future__ import annotations

import time
from collections.abc import Callable

import requests


def wait_until_ready(url: str, timeout_s: float = 180, alive: Callable[[], bool] = lambda: True) -> float:
    """Poll ``url/readyz`` until it answers 200; returns the seconds waited. Raises ``RuntimeError`` when
    ``alive()`` turns false (the process died) or the time runs out."""
    t0 = time.monotonic()
    while True:
        if not alive():
            raise RuntimeError(f"the server behind {url} stopped before it was ready")
        try:
            if requests.get(f"{url}/readyz", timeout=2).status_code == 200:
                return time.monotonic() - t0
        except requests.RequestException:
            pass
        if time.monotonic() - t0 > timeout_s:
            raise RuntimeError(f"{url} was not ready within {timeout_s:.0f} s")
        time.sleep(0.5)
