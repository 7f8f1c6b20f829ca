"""Soak test: thousands of mixed requests on loopback; zero unexpected errors, memory that levels off, stable answers.

    .venv/bin/python benchmarks/soak.py --requests 20000 --concurrency 8      # starts its own server
    .venv/bin/python benchmarks/soak.py --url http://127.0.0.1:3000 ...        # or soaks a running one

The mix: every model, output and format on the samples in data/, plus bad uploads (corrupt, truncated, over the
pixel limit), which must get their 4xx. The server it starts admits fewer requests at once than the soak sends
(``--admit``, its ``SEG_MAX_CONCURRENCY``), so some calls are refused with 429: expected, counted, not errors.
Every (sample, model, output, format) combination is first answered once to make the reference; every later
answer must be exactly the same bytes' pixels. After a warm-up of ``--warmup`` requests (batches of every size
allocate their buffers then), resident memory (RSS) of every server process is read ``--points`` times over the
soak and printed as a curve; a process whose RSS in the second half rises ``--max-growth`` % or more above its
peak in the first half fails it. Bounded in count and time; writes a JSON report.
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
from segmentation import MODEL_NAMES  # noqa: E402
from segmentation.readiness import wait_until_ready  # noqa: E402

MODELS = MODEL_NAMES
RENDERINGS = (("overlay", "png"), ("overlay", "jpeg"), ("overlay", "webp"), ("color", "png"), ("mask", "png"))
log = logging.getLogger("soak")


def server_rss(pid: int) -> dict[str, int]:
    """RSS in bytes of the server process and each of its workers, keyed by role."""
    out = {}
    try:
        root = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return out
    for p in [root, *root.children(recursive=True)]:
        try:
            cmd = p.cmdline()
            role = cmd[cmd.index("--service-name") + 1] if "--service-name" in cmd else "arbiter"
            out[f"{role}:{p.pid}"] = p.memory_info().rss
        except (psutil.NoSuchProcess, ValueError):
            continue
    return out


async def call(session, url, name: str, body: bytes, model: str, output: str, fmt: str) -> tuple[int, bytes]:
    form = aiohttp.FormData()
    form.add_field("image", body, filename=name, content_type="image/png")
    form.add_field("model", model)
    form.add_field("output", output)
    form.add_field("format", fmt)
    async with session.post(f"{url}/segment", data=form) as r:
        return r.status, await r.read()


def bad_uploads() -> dict[str, tuple[bytes, int]]:
    """name -> (body, the status it must get)"""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    bomb = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 9000, 9000, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 512)) + chunk(b"IEND", b""))
    good = next((ROOT / "data" / "images").glob("*.png")).read_bytes()
    return {
        "bomb.png": (bomb, 413),
        "truncated.png": (good[: len(good) // 2], 400),
        "corrupt.png": (b"\x89PNG" + b"x" * 99, 400),
    }


def pixels(body: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(body)))


async def soak(
    url: str, n: int, warmup: int, concurrency: int, deadline_s: float, pid: int | None, points: int
) -> dict:
    samples = sorted((ROOT / "data" / "images").glob("*.png"))
    bodies = {s.name: s.read_bytes() for s in samples}
    combos = [(s.name, m, o, f) for s, m, (o, f) in itertools.product(samples, MODELS, RENDERINGS)]
    bad = bad_uploads()
    bodies.update({name: body for name, (body, _) in bad.items()})
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        reference = {}
        for combo in tqdm(combos, desc="reference answers"):
            status, body = await call(session, url, combo[0], bodies[combo[0]], *combo[1:])
            assert status == 200, (combo, status, body[:200])
            reference[combo] = pixels(body)
        rng = random.Random(0)
        bad_combos = [(name, "unet", "mask", "png") for name in bad]
        plan = [rng.choice(bad_combos) if rng.random() < 0.05 else rng.choice(combos) for _ in range(warmup + n)]
        counts = {"served": 0, "refused_429": 0, "bad_input_answered": 0}
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
                    if combo[0] in bad:
                        expected = bad[combo[0]][1]
                        if status == expected:
                            counts["bad_input_answered"] += 1
                        elif status != 429:
                            errors.append(f"{combo[0]}: HTTP {status}, expected {expected}: {body[:200]!r}")
                    if status == 429:
                        counts["refused_429"] += 1
                        await asyncio.sleep(0.05)  # a client backs off before its next call
                    elif combo[0] not in bad:
                        latencies.append(time.perf_counter() - t)
                        if status != 200:
                            errors.append(f"HTTP {status}: {body[:200]!r}")
                        elif not np.array_equal(pixels(body), reference[combo]):
                            mismatches += 1
                        else:
                            counts["served"] += 1
                bar.update()

        await asyncio.gather(*(one(c) for c in plan[:warmup]))
        warm = {"errors": len(errors), "mismatches": mismatches, **counts}
        counts.update(served=0, refused_429=0, bad_input_answered=0)
        latencies = []
        curve = [(0, server_rss(pid))] if pid else []
        t0 = time.perf_counter()
        soaked = plan[warmup:]
        step = max(1, len(soaked) // max(1, points))
        for i in range(0, len(soaked), step):
            await asyncio.gather(*(one(c) for c in soaked[i : i + step]))
            if pid:
                curve.append((min(i + step, len(soaked)), server_rss(pid)))
        bar.close()
        took = time.perf_counter() - t0
    lat = np.array(latencies or [0.0]) * 1e3
    roles = sorted({role for _, rss in curve for role in rss})
    mb = {role: [round(rss.get(role, 0) / 2**20, 1) for _, rss in curve] for role in roles}
    growth = {role: second_half_growth(v) for role, v in mb.items()}
    return {
        "warmup_requests": warmup,
        "warmup": warm,
        "requests": len(soaked),
        **counts,
        "errors": len(errors) - warm["errors"],
        "error_samples": errors[warm["errors"] :][:5],
        "mismatches": mismatches - warm["mismatches"],
        "seconds": round(took, 1),
        "throughput_rps": round(len(soaked) / took, 2),
        "latency_ms": {"p50": round(float(np.percentile(lat, 50)), 1), "p99": round(float(np.percentile(lat, 99)), 1)},
        "rss_curve_requests": [k for k, _ in curve],
        "rss_mb_curve": mb,
        "rss_growth_second_half_pct": growth,
        "rss_mb_total": [round(sum(rss.values()) / 2**20, 1) for _, rss in curve],
    }


def second_half_growth(values: list[float]) -> float:
    """How far (%) the second half of a curve rises above the highest point of its first half: ~0 for a process
    that levels off, however its allocator breathes between points; a leak's growth for one that does not."""
    first, second = values[: len(values) // 2 + 1], values[len(values) // 2 + 1 :]
    if not second or not max(first):
        return 0.0
    return round(100 * (max(second) - max(first)) / max(first), 2)


def print_curve(report: dict) -> None:
    """The RSS curve, one row per process role, one column per measuring point."""
    log.info("RSS (MB) after N soak requests:")
    log.info("%-22s %s", "requests", " ".join(f"{k:>8}" for k in report["rss_curve_requests"]))
    for role, values in report["rss_mb_curve"].items():
        log.info(
            "%-22s %s  (second half %+.2f %%)",
            role.split(":")[0],
            " ".join(f"{v:8.1f}" for v in values),
            report["rss_growth_second_half_pct"].get(role, 0.0),
        )
    log.info("%-22s %s", "total", " ".join(f"{v:8.1f}" for v in report["rss_mb_total"]))


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", help="soak a running server (memory is then not measured unless --pid is given)")
    ap.add_argument("--pid", type=int, help="the running server's process id, for memory figures")
    ap.add_argument("--requests", type=int, default=20000)
    ap.add_argument("--warmup", type=int, default=1000)
    ap.add_argument("--concurrency", type=int, default=9)
    ap.add_argument("--admit", type=int, default=8, help="SEG_MAX_CONCURRENCY of the server it starts")
    ap.add_argument("--points", type=int, default=10, help="RSS measurements over the soak")
    ap.add_argument("--max-growth", type=float, default=2.0, help="RSS growth (%%) over the second half that fails")
    ap.add_argument("--max-seconds", type=float, default=3600)
    ap.add_argument("--port", type=int, default=3300)
    ap.add_argument("--report", type=Path, default=ROOT / "build" / "soak.json")
    args = ap.parse_args()
    proc = None
    url, pid = args.url, args.pid
    if not url:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "bentoml",
                "serve",
                "service:Segmentation",
                "--host",
                "127.0.0.1",
                "--port",
                str(args.port),
            ],
            cwd=ROOT,
            start_new_session=True,
            env={**os.environ, "SEG_MAX_CONCURRENCY": str(args.admit)},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        url, pid = f"http://127.0.0.1:{args.port}", proc.pid
        try:
            wait_until_ready(url, 180, alive=lambda: proc.poll() is None)
        except RuntimeError as e:
            sys.exit(str(e))
    try:
        report = asyncio.run(
            soak(url, args.requests, args.warmup, args.concurrency, args.max_seconds, pid, args.points)
        )
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
    log.info("soak: %s", json.dumps({k: v for k, v in report.items() if not k.startswith("rss_")}))
    if report["rss_mb_curve"]:
        print_curve(report)
    grown = {k: v for k, v in report["rss_growth_second_half_pct"].items() if v >= args.max_growth}
    ok = report["errors"] == 0 and report["mismatches"] == 0 and not grown
    log.info("soak %s (report: %s)", "passed" if ok else "FAILED", args.report)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
