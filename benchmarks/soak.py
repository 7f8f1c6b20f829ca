"""Soak test: thousands of mixed requests on loopback; zero unexpected errors, bounded memory, stable answers.

    .venv/bin/python benchmarks/soak.py --requests 3000 --concurrency 8        # starts its own server
    .venv/bin/python benchmarks/soak.py --url http://127.0.0.1:3000 ...        # or soaks a running one

Every (sample, model, output) combination is first answered once to make the reference; every later answer must
decode to exactly the same pixels. A warm-up of ``--warmup`` requests at the soak's own concurrency comes first
(batches of every size allocate their buffers then); resident memory (RSS) of every server process is read after
it and at the end, and growth over 10 % fails. Bounded in count and time; writes a JSON report.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import itertools
import json
import logging
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import numpy as np
import psutil
from PIL import Image
from tqdm.auto import tqdm

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from segmentation.readiness import wait_until_ready  # noqa: E402

MODELS = ("dilatednet", "mask2former", "unet")
OUTPUTS = ("overlay", "color", "mask")
log = logging.getLogger("soak")


def server_rss(pid: int) -> dict[str, int]:
    """RSS in bytes of the server process and each of its workers, keyed by role."""
    out = {}
    root = psutil.Process(pid)
    for p in [root, *root.children(recursive=True)]:
        try:
            cmd = p.cmdline()
            role = cmd[cmd.index("--service-name") + 1] if "--service-name" in cmd else "arbiter"
            out[f"{role}:{p.pid}"] = p.memory_info().rss
        except (psutil.NoSuchProcess, ValueError):
            continue
    return out


async def call(session, url, sample: Path, body: bytes, model: str, output: str) -> tuple[int, bytes]:
    form = aiohttp.FormData()
    form.add_field("image", body, filename=sample.name, content_type="image/png")
    form.add_field("model", model)
    form.add_field("output", output)
    async with session.post(f"{url}/segment", data=form) as r:
        return r.status, await r.read()


def pixels(body: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(body)))


async def soak(url: str, n: int, warmup: int, concurrency: int, deadline_s: float, pid: int | None) -> dict:
    samples = sorted((ROOT / "data" / "images").glob("*.png"))
    bodies = {s: s.read_bytes() for s in samples}
    combos = list(itertools.product(samples, MODELS, OUTPUTS))
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        reference = {}
        for combo in tqdm(combos, desc="reference answers"):
            status, body = await call(session, url, combo[0], bodies[combo[0]], *combo[1:])
            assert status == 200, (combo, status, body[:200])
            reference[combo] = pixels(body)
        rng = random.Random(0)
        plan = [rng.choice(combos) for _ in range(warmup + n)]
        errors, mismatches, latencies = [], 0, []
        sem = asyncio.Semaphore(concurrency)
        t_end = time.monotonic() + deadline_s
        bar = tqdm(total=warmup + n, desc="warm-up and soak", unit="req")

        async def one(combo):
            nonlocal mismatches
            if time.monotonic() > t_end:
                return
            async with sem:
                t = time.perf_counter()
                try:
                    status, body = await call(session, url, combo[0], bodies[combo[0]], *combo[1:])
                except Exception as e:  # noqa: BLE001 - every failure is counted and reported
                    errors.append(repr(e))
                else:
                    latencies.append(time.perf_counter() - t)
                    if status != 200:
                        errors.append(f"HTTP {status}: {body[:200]!r}")
                    elif not np.array_equal(pixels(body), reference[combo]):
                        mismatches += 1
                bar.update()

        await asyncio.gather(*(one(c) for c in plan[:warmup]))
        rss_start = server_rss(pid) if pid else {}
        warm_errors, warm_mismatches, latencies = len(errors), mismatches, []
        t0 = time.perf_counter()
        await asyncio.gather(*(one(c) for c in plan[warmup:]))
        bar.close()
        took = time.perf_counter() - t0
        rss_end = server_rss(pid) if pid else {}
    total_start, total_end = sum(rss_start.values()), sum(rss_end.values())
    lat = np.array(latencies) * 1e3
    return {
        "warmup_requests": warmup,
        "warmup_errors": warm_errors,
        "warmup_mismatches": warm_mismatches,
        "requests": len(latencies) + len([e for e in errors[warm_errors:] if not e.startswith("HTTP")]),
        "errors": len(errors),
        "error_samples": errors[:5],
        "mismatches": mismatches,
        "seconds": round(took, 1),
        "throughput_rps": round(len(latencies) / took, 2),
        "latency_ms": {"p50": round(float(np.percentile(lat, 50)), 1), "p99": round(float(np.percentile(lat, 99)), 1)},
        "rss_mb_after_warmup": round(total_start / 2**20, 1),
        "rss_mb_end": round(total_end / 2**20, 1),
        "rss_growth_pct": round(100 * (total_end - total_start) / total_start, 2) if total_start else None,
        "rss_mb_by_process_after_warmup": {k: round(v / 2**20, 1) for k, v in rss_start.items()},
        "rss_mb_by_process_end": {k: round(v / 2**20, 1) for k, v in rss_end.items()},
    }


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", help="soak a running server (memory is then not measured unless --pid is given)")
    ap.add_argument("--pid", type=int, help="the running server's process id, for memory figures")
    ap.add_argument("--requests", type=int, default=3000)
    ap.add_argument("--warmup", type=int, default=600)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--max-seconds", type=float, default=900)
    ap.add_argument("--port", type=int, default=3300)
    ap.add_argument("--report", type=Path, default=ROOT / "build" / "soak.json")
    args = ap.parse_args()
    proc = None
    url, pid = args.url, args.pid
    if not url:
        proc = subprocess.Popen([sys.executable, "-m", "bentoml", "serve", "service:Segmentation", "--host", "127.0.0.1",
                                 "--port", str(args.port)], cwd=ROOT, start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        url, pid = f"http://127.0.0.1:{args.port}", proc.pid
        try:
            wait_until_ready(url, 180, alive=lambda: proc.poll() is None)
        except RuntimeError as e:
            sys.exit(str(e))
    try:
        report = asyncio.run(soak(url, args.requests, args.warmup, args.concurrency, args.max_seconds, pid))
    finally:
        if proc:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:  # a slow shutdown must not hide the report
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text(json.dumps(report, indent=2))
    log.info("soak: %s", json.dumps({k: v for k, v in report.items() if not k.startswith("rss_mb_by_process")}))
    ok = report["errors"] == 0 and report["mismatches"] == 0 and (report["rss_growth_pct"] or 0) < 10
    log.info("soak %s (report: %s)", "passed" if ok else "FAILED", args.report)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
