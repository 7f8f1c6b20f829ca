"""OpenVINO fp32 forward of a model's `full` preset (random weights): one image on 2 threads against two
single-threaded streams (two images at once), alone and beside a process that burns one core for 15 ms in every
60 ms (about the gateway's share at 16 clients).

Usage: .venv/bin/python benchmarks/openvino_lanes.py --model mask2former --seconds 12
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing as mp
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import openvino as ov

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from segmentation.registry import MODEL_NAMES, spec  # noqa: E402
from segmentation.runtimes import OpenVINO  # noqa: E402

log = logging.getLogger("openvino_lanes")
PERIOD_MS = 60


def burn(stop, busy_ms: float) -> None:
    while not stop.is_set():
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < busy_ms / 1e3:
            pass
        time.sleep((PERIOD_MS - busy_ms) / 1e3)


def images_per_second(path: str, mode: str, seconds: float) -> float:
    # f32 as served: without a hint OpenVINO picks bf16 on a CPU that has it
    config = {"INFERENCE_NUM_THREADS": 2, "ENABLE_CPU_PINNING": False, "INFERENCE_PRECISION_HINT": "f32"}
    config |= {"PERFORMANCE_HINT": "LATENCY"} if mode == "threads" else {"NUM_STREAMS": 2}
    compiled = ov.Core().compile_model(path, "CPU", config)
    x = np.random.default_rng(0).random(tuple(compiled.inputs[0].shape), dtype=np.float32)
    queue = ov.AsyncInferQueue(compiled, 1 if mode == "threads" else 2)
    per_round = len(queue)
    for _ in range(per_round):  # warm-up
        queue.start_async({0: x})
    queue.wait_all()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(per_round):
            queue.start_async({0: x})
        queue.wait_all()
        n += per_round
    return n / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=MODEL_NAMES, default="mask2former")
    parser.add_argument("--seconds", type=float, default=12.0, help="per run")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with tempfile.TemporaryDirectory() as folder:
        path = str(Path(folder) / "model.xml")
        OpenVINO.convert(spec(args.model).architecture.build_full().make("fp32"), Path(path))  # as the import does
        race(args.model, path, args.seconds)


def race(name: str, path: str, seconds: float) -> None:
    for busy in (0, 15):
        for mode in ("threads", "lanes", "threads", "lanes"):
            stop, burner = mp.Event(), None
            if busy:
                burner = mp.Process(target=burn, args=(stop, busy))
                burner.start()
            rate = images_per_second(path, mode, seconds)
            stop.set()
            if burner is not None:
                burner.join()
            log.info("%s, busy %d ms in %d: %s: %.3f img/s", name, busy, PERIOD_MS, mode, rate)


if __name__ == "__main__":
    main()
