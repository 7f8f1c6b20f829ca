"""Serving benchmark on the `full` presets with random weights (the published models' compute).

    .venv/bin/python benchmarks/benchmark.py                  # about 15 minutes on 2 cores
    .venv/bin/python benchmarks/benchmark.py --quick          # fewer requests, for a look

Writes build/benchmark/results.json, results.md and results.png. In one run, per model:
- the limit: raw in-process forward throughput at batch sizes 1, 2, 4, 8;
- served throughput and p50/p99 latency through `bentoml serve` at concurrency 1, 4 and 16, with adaptive
  batching on and off (SEG_MAX_BATCH_SIZE=1);
- one 2048x1024 photo at concurrency 1 (mask, PNG overlay, JPEG overlay): end-to-end latency minus the forward
  time, i.e. what serving adds, with the server's stage breakdown;
- resident memory of every server process, and the time from start to /readyz.
Ratios within one run carry the conclusions; absolute times on a shared machine move from run to run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from segmentation.readiness import wait_until_ready  # noqa: E402

OUT = ROOT / "build" / "benchmark"
MODELS = ("dilatednet", "mask2former", "unet")
log = logging.getLogger("benchmark")


# --- the store of full-size models with random weights ------------------------------------------------------------

def ensure_full_store(home: Path) -> None:
    os.environ["BENTOML_HOME"] = str(home)
    import bentoml

    from segmentation.store import build_metadata, save

    for name in MODELS:
        try:
            bentoml.models.get(f"{name}:latest")
            continue
        except bentoml.exceptions.NotFound:
            pass
        log.info("building the full %s with random weights", name)
        processor = None
        if name == "dilatednet":
            from segmentation.models.dilatednet import PRESETS, build_model

            model, size = build_model("full"), PRESETS["full"]["input_size"]
            params = model.count_params()
        elif name == "mask2former":
            from segmentation.models.mask2former import PRESETS, build_model, build_processor

            size = PRESETS["full"]["input_size"]
            model, processor = build_model("full"), build_processor(size)
            params = sum(p.numel() for p in model.parameters())
        else:
            from segmentation.models.unet import INPUT_SIZE, PRESETS, UNet

            model, size = UNet(PRESETS["full"]).eval(), INPUT_SIZE
            params = sum(p.numel() for p in model.parameters())
        meta = build_metadata(name, preset="full", input_size=size, source="random weights (benchmark)", source_sha256="",
                              demo=False, foreground="vehicle" if name == "unet" else None, parameters=int(params))
        save(name, model, meta, processor)


# --- the limit: raw forward throughput -----------------------------------------------------------------------------

def raw_throughput(home: Path, batch_sizes=(1, 2, 4, 8)) -> dict:
    """Images per second of `forward` alone, in this process, per model and batch size (median of 2 after a warm-up)."""
    import bentoml

    from segmentation.scenes import generate_scene
    from segmentation.services import NUM_THREADS
    from segmentation.store import load_predictor

    image, _ = generate_scene(1, 256, 512)
    out = {}
    for name in MODELS:
        stored = bentoml.models.get(f"{name}:latest")
        meta = dict(stored.info.metadata)
        predictor = load_predictor(name, stored.path, meta)
        out[name] = {}
        for bs in batch_sizes:
            batch = predictor.preprocess([image] * bs)
            predictor.forward(batch)  # warm-up (and graph tracing)
            times = []
            for _ in range(2):
                t = time.perf_counter()
                predictor.forward(batch)
                times.append(time.perf_counter() - t)
            out[name][bs] = round(bs / statistics.median(times), 3)
            log.info("raw %s batch %d: %.2f img/s (%d threads)", name, bs, out[name][bs], NUM_THREADS)
        del predictor
    return out


# --- served ----------------------------------------------------------------------------------------------------

class Server:
    def __init__(self, home: Path, port: int, env: dict):
        self.url = f"http://127.0.0.1:{port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bentoml", "serve", "service:Segmentation", "--host", "127.0.0.1", "--port", str(port)],
            cwd=ROOT, env={**os.environ, **env, "BENTOML_HOME": str(home)}, start_new_session=True,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        self.ready_s = round(wait_until_ready(self.url, 600, alive=lambda: self.proc.poll() is None), 1)

    def rss_mb(self) -> dict[str, float]:
        out = {}
        root = psutil.Process(self.proc.pid)
        for p in [root, *root.children(recursive=True)]:
            try:
                cmd = p.cmdline()
                role = cmd[cmd.index("--service-name") + 1] if "--service-name" in cmd else "arbiter"
                out[role] = round(p.memory_info().rss / 2**20, 1)
            except (psutil.NoSuchProcess, ValueError):
                continue
        return out

    def stop(self) -> None:
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


async def load(url: str, model: str, image: Path, concurrency: int, n: int) -> dict:
    import aiohttp

    body = image.read_bytes()
    latencies, errors = [], 0
    sem = asyncio.Semaphore(concurrency)

    async def one(session):
        nonlocal errors
        async with sem:
            form = aiohttp.FormData()
            form.add_field("image", body, filename=image.name, content_type="image/png")
            form.add_field("model", model)
            form.add_field("output", "mask")
            t = time.perf_counter()
            async with session.post(f"{url}/segment", data=form) as r:
                await r.read()
                if r.status != 200:
                    errors += 1
            latencies.append(time.perf_counter() - t)

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=900)) as session:
        await one(session)  # warm
        latencies.clear()
        t0 = time.perf_counter()
        await asyncio.gather(*(one(session) for _ in range(n)))
        took = time.perf_counter() - t0
    lat = np.array(latencies) * 1e3
    return {"throughput": round(n / took, 3), "p50_ms": round(float(np.percentile(lat, 50)), 1),
            "p99_ms": round(float(np.percentile(lat, 99)), 1), "errors": errors, "requests": n}


def photo_overhead(url: str, photo: Path, runs: int = 3) -> dict:
    import bentoml

    out = {}
    with bentoml.SyncHTTPClient(url, timeout=900) as client:
        for model in MODELS:
            client.segment(image=photo, model=model, output="mask")  # warm
            stages = client.analyze(image=photo, model=model)["timings_ms"]
            row = {"stages_ms": stages}
            for output, fmt in (("mask", "png"), ("overlay", "png"), ("overlay", "jpeg")):
                times = []
                for _ in range(runs):
                    t = time.perf_counter()
                    client.segment(image=photo, model=model, output=output, format=fmt)
                    times.append(time.perf_counter() - t)
                e2e = 1e3 * statistics.median(times)
                row[f"{output}_{fmt}"] = {"e2e_ms": round(e2e, 1), "overhead_ms": round(e2e - stages["inference"], 1)}
            out[model] = row
            log.info("photo %s: %s", model, json.dumps(row))
    return out


def photo_path() -> Path:
    real = ROOT.parent / "shared" / "cityscapes-sample" / "images"
    if real.is_dir():
        return sorted(real.glob("*.png"))[0]
    from PIL import Image

    from segmentation.scenes import generate_scene

    path = OUT / "scene_2048x1024.png"
    Image.fromarray(generate_scene(7, 1024, 2048)[0]).save(path)
    return path


# --- report ----------------------------------------------------------------------------------------------------

def write_report(results: dict) -> None:
    (OUT / "results.json").write_text(json.dumps(results, indent=2))
    lines = [f"Machine: {results['machine']}", "",
             "| model | raw best (img/s) | served c=16, batching on (img/s) | ratio | batching off (img/s) | p50 / p99 c=16 on (ms) |",
             "|---|---|---|---|---|---|"]
    for m in MODELS:
        best = max(results["raw"][m].values())
        on, off = results["served"]["on"][m]["16"], results["served"]["off"][m]["16"]
        lines.append(f"| {m} | {best} | {on['throughput']} | {on['throughput'] / best:.2f} | {off['throughput']} | {on['p50_ms']} / {on['p99_ms']} |")
    lines += ["", "| model | mask overhead (ms) | PNG overlay overhead (ms) | JPEG overlay overhead (ms) | decode / pre / post (ms) |",
              "|---|---|---|---|---|"]
    for m in MODELS:
        r = results["photo"][m]
        s = r["stages_ms"]
        lines.append(f"| {m} | {r['mask_png']['overhead_ms']} | {r['overlay_png']['overhead_ms']} | {r['overlay_jpeg']['overhead_ms']} "
                     f"| {s['decode']} / {s['preprocess']} / {s['postprocess']} |")
    lines += ["", f"Resident memory (MB): {json.dumps(results['rss_mb'])}; total {sum(results['rss_mb'].values()):.0f} MB.",
              f"Start to /readyz: {results['ready_s']} s."]
    (OUT / "results.md").write_text("\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, m in zip(axes, MODELS):
        conc = [1, 4, 16]
        ax.plot(conc, [results["served"]["on"][m][str(c)]["throughput"] for c in conc], "o-", label="served, batching on")
        ax.plot(conc, [results["served"]["off"][m][str(c)]["throughput"] for c in conc], "s--", label="served, batching off")
        ax.axhline(max(results["raw"][m].values()), color="gray", ls=":", label="raw forward, best batch")
        ax.set_title(m)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel("images / s")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(OUT / "results.png", dpi=110)


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", type=Path, default=ROOT / "build" / "bench-store")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--port", type=int, default=3400)
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    from segmentation.services import set_threads

    for framework in ("keras", "pytorch"):  # as each model service does, before either framework runs anything
        set_threads(framework)
    ensure_full_store(args.store)
    results = {"machine": f"{platform.processor() or platform.machine()}, {psutil.cpu_count()} CPUs, "
                          f"{psutil.virtual_memory().total / 2**30:.0f} GiB, Python {platform.python_version()}"}
    results["raw"] = raw_throughput(args.store)
    sample = ROOT / "data" / "images" / "scene_900.png"
    results["served"] = {}
    for i, (mode, env) in enumerate((("on", {}), ("off", {"SEG_MAX_BATCH_SIZE": "1"}))):
        server = Server(args.store, args.port + i, env)  # a port of its own: the last one may still be closing
        try:
            if mode == "on":
                results["ready_s"] = server.ready_s
            results["served"][mode] = {}
            for m in MODELS:
                results["served"][mode][m] = {}
                for c in (1, 4, 16):
                    n = c * (1 if args.quick else 2) + (2 if c == 1 else 0)
                    results["served"][mode][m][str(c)] = r = asyncio.run(load(server.url, m, sample, c, n))
                    log.info("served %s batching %s c=%d: %s", m, mode, c, r)
            if mode == "on":
                results["photo"] = photo_overhead(server.url, photo_path(), runs=2 if args.quick else 3)
                results["rss_mb"] = server.rss_mb()
        finally:
            server.stop()
    write_report(results)
    log.info("wrote %s", OUT)
    log.info("\n%s", (OUT / "results.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
