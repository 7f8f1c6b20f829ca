"""Serving benchmark on the `full` presets with random weights (the published models' compute).

    .venv/bin/python benchmarks/benchmark.py                  # about 25 minutes on 2 cores
    .venv/bin/python benchmarks/benchmark.py --quick          # fewer requests, for a look

Writes build/benchmark/results.json, results.md and results.png. In one run, per model:
- the limit: raw in-process forward throughput at batch sizes 1, 2, 4, 8, in fp32 and (on a CPU with native bf16)
  in bf16, and again in the served precision just before each model's served run (limit_beside_serving; the
  served rate is held against it);
- bf16 against fp32 on the trained demo models (the store `make models` filled, --demo-store): label agreement on
  the samples in data/, the photos in ../shared/cityscapes-sample and held-out generated scenes, and whether a
  batched answer equals the lone one;
- served throughput and p50/p99 latency through `bentoml serve` at concurrency 1, 4 and 16, with adaptive
  batching on and off (SEG_MAX_BATCH_SIZE=1), and with batching on pinned to 1 core (taskset) against 2;
- one 2048x1024 photo at concurrency 1 (mask, PNG overlay, JPEG overlay): end-to-end latency minus that request's
  forward time (its Server-Timing header), i.e. what serving adds, with the server's stage breakdown; on the full
  presets and again on the trained demo models, whose class borders are a photo's, not everywhere;
- resident memory of every server process, and the time from start to /readyz.
Random weights make bf16-vs-fp32 agreement meaningless (near-ties everywhere), so each full model is served in
the precision its trained demo counterpart earned at import. Ratios within one run carry the conclusions;
absolute times on a shared machine move from run to run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import multiprocessing
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
from segmentation.registry import MODEL_NAMES  # noqa: E402

OUT = ROOT / "build" / "benchmark"
SAMPLE = ROOT / "data" / "images" / "scene_900.png"  # what the served runs send: a 512x256 scene
PHOTO_RUNS = 9  # per photo and output; the median, since this host's speed moves from one request to the next
MODELS = MODEL_NAMES
log = logging.getLogger("benchmark")


# --- the store of full-size models with random weights ------------------------------------------------------------

def demo_model(demo_home: Path, name: str):
    """A model of the demo store (``make models``), read beside this process's own store; None if absent."""
    import bentoml
    from bentoml._internal.models.model import ModelStore

    try:
        return ModelStore(demo_home / "models").get(f"{name}:latest")
    except (bentoml.exceptions.NotFound, FileNotFoundError):
        return None


def demo_precisions(demo_home: Path) -> dict[str, str]:
    """The precision each trained demo model earned at import (fp32 where there is no demo model)."""
    return {name: (m.info.metadata.get("precision", "fp32") if (m := demo_model(demo_home, name)) else "fp32")
            for name in MODELS}


def demo_runtimes(demo_home: Path) -> dict[str, dict]:
    """The runtime and precision to serve each `full` model in, as an import of full-size weights would choose: of
    the candidates the trained demo model's import found to keep the answers (agreement means nothing on random
    weights), the fastest on the `full` model in build/benchmark/runtimes.json (benchmarks/runtimes.py, run first by
    `make bench`); without that file, the demo's own choice."""
    from segmentation.runtimes import Candidate

    path = OUT / "runtimes.json"
    speeds = json.loads(path.read_text())["models"] if path.exists() else {}
    out = {}
    for name in MODELS:
        record = (m.info.metadata.get("runtime") or {}) if (m := demo_model(demo_home, name)) else {}
        choice = {"name": record.get("name", "native"), "precision": record.get("precision", "fp32"),
                  "reason": "the trained demo model's choice: " + record.get("reason", "none recorded")}
        rates = speeds.get(name, {}).get("rates", {})
        kept = [c for c in record.get("candidates", []) if Candidate(**c).acceptable
                and f"{c['runtime']} {c['precision']}" in rates]
        if kept:
            best = max(kept, key=lambda c: rates[f"{c['runtime']} {c['precision']}"][0])
            choice = {"name": best["runtime"], "precision": best["precision"],
                      "reason": "kept the answers on the demo model, fastest on the full one (benchmarks/runtimes.py)"}
        log.info("%s full preset served in %s %s (%s)", name, choice["name"], choice["precision"], choice["reason"])
        out[name] = choice
    return out


def ensure_full_store(home: Path, precisions: dict[str, str], chosen: dict[str, dict]) -> None:
    os.environ["BENTOML_HOME"] = str(home)
    import tempfile

    import bentoml

    from segmentation import runtimes
    from segmentation.registry import spec
    from segmentation.store import build_metadata, save

    for name in MODELS:
        full = spec(name).architecture.build_full()
        meta = build_metadata(
            name,
            preset=full.preset,
            input_size=full.input_size,
            source="random weights (benchmark)",
            source_sha256="",
            demo=False,
            foreground=full.foreground,
            parameters=full.parameters,
            precision=precisions[name],
            pipeline=full.pipeline,  # as an import records it: where the gateway resizes and finishes
        )
        meta["runtime"] = dict(chosen[name])
        try:
            stored = bentoml.models.get(f"{name}:latest").info.metadata
            if all(stored.get(k) == meta.get(k) for k in ("precision", "pipeline")) and all(
                    (stored.get("runtime") or {}).get(k) == chosen[name][k] for k in ("name", "precision")):
                continue
            bentoml.models.delete(f"{name}:latest")  # built before the precision, runtime or pipeline now recorded
        except bentoml.exceptions.NotFound:
            pass
        log.info("storing the full %s with random weights", name)
        with tempfile.TemporaryDirectory() as folder:
            if chosen[name]["name"] in runtimes.BACKENDS:  # converted as an import converts
                backend = runtimes.BACKENDS[chosen[name]["name"]]
                backend.convert(full.make("fp32"), Path(folder) / backend.artifact)
                meta["runtime"]["artifact"] = backend.artifact
            save(name, full.model, meta, full.processor, Path(folder))
    from segmentation.ensemble import MEMBERS, availability
    from segmentation.store import ensemble_metadata, save_ensemble

    served = {m: str(bentoml.models.get(f"{m}:latest").tag) for m in MEMBERS}
    if availability(served)[0] is None:  # random weights: nothing to fit; the ensemble is here to be timed
        save_ensemble(ensemble_metadata(served, {m: 1 / len(MEMBERS) for m in MEMBERS}, {}, demo=False))


# --- the limit: raw forward throughput -----------------------------------------------------------------------------


def raw_throughput(home: Path, batch_sizes=(1, 2, 4, 8)) -> dict:
    """Images per second of `forward` alone, in this process, per model, precision and batch size (median of 2
    after a warm-up), with a thread per CPU. A model served by several workers (services.parallelism) is also
    measured with one worker's threads, in its served precision: ``per_worker``."""
    import bentoml

    from segmentation.precision import PRECISIONS, cpu_has_bf16, serving_precision
    from segmentation.scenes import generate_scene
    from segmentation.services import available_cpus, parallelism, set_threads
    from segmentation.store import load_predictor

    image, _ = generate_scene(1, 256, 512)
    precisions = PRECISIONS if cpu_has_bf16() else ("fp32",)  # emulated bf16 is slow and says nothing
    out = {}

    def measure(predictor, threads: int) -> dict[int, float]:
        rates = {}
        for bs in batch_sizes:
            batch = predictor.preprocess([image] * bs)
            predictor.forward(batch)  # warm-up (and graph tracing)
            times = []
            for _ in range(2):
                t = time.perf_counter()
                predictor.forward(batch)
                times.append(time.perf_counter() - t)
            rates[bs] = round(bs / statistics.median(times), 3)
            log.info(
                "raw %s %s batch %d: %.2f img/s (%d threads)",
                predictor.name,
                predictor.precision,
                bs,
                rates[bs],
                threads,
            )
        return rates

    for name in MODELS:
        stored = bentoml.models.get(f"{name}:latest")
        meta = dict(stored.info.metadata)
        out[name] = {}
        for precision in precisions:
            predictor = load_predictor(name, stored.path, meta, precision, native=True)
            out[name][precision] = measure(predictor, available_cpus())
            del predictor
        out[name]["served_precision"] = serving_precision(meta["precision"])  # fp32 where bf16 would be emulated
        served = load_predictor(name, stored.path, meta)
        if served.runtime != "native":  # the compiled runtime its demo counterpart's import chose
            out[name]["served"] = f"{served.runtime} {served.precision}"
            out[name][out[name]["served"]] = measure(served, available_cpus())
        del served
        workers, threads = parallelism(name)
        if workers > 1 and meta["framework"] != "keras":  # TensorFlow's thread count is fixed once it has run
            set_threads(meta["framework"], threads)
            out[name]["per_worker"] = {
                "workers": workers,
                "threads": threads,
                "rates": measure(load_predictor(name, stored.path, meta), threads),
            }
            set_threads(meta["framework"])
    return out


def raw_limit(raw: dict, name: str) -> float:
    """The limit: the best batch's forward throughput in the precision the model is served in; for a model served
    by several workers, the larger of that and workers x one worker's best (as if the workers never contended for
    memory bandwidth, so an upper bound)."""
    limit = max(raw[name][raw[name].get("served", raw[name]["served_precision"])].values())
    if "per_worker" in raw[name]:
        w = raw[name]["per_worker"]
        limit = max(limit, round(w["workers"] * max(w["rates"].values()), 3))
    return limit


# Long enough for dozens of a full Mask2Former's forwards at every batch size: over the 2 s it was, a small batch
# timed a handful of images, and the limit (the best batch) was the luckiest handful.
LIMIT_SECONDS = 12.0


def _forward_rates(store: str, name: str, threads: int, batch_sizes: tuple, barrier, queue) -> None:
    """In a fresh process: ``name``'s forward in its served precision with ``threads`` threads; per batch size, a
    warm-up call, then (starting in step with the other processes at ``barrier``) calls for three times as long as
    the warm-up took, at least ``LIMIT_SECONDS``: images done / time taken."""
    os.environ["BENTOML_HOME"] = store
    import bentoml

    from segmentation.scenes import generate_scene
    from segmentation.services import set_threads
    from segmentation.store import load_predictor

    stored = bentoml.models.get(f"{name}:latest")
    meta = dict(stored.info.metadata)
    set_threads(meta["framework"], threads)
    predictor = load_predictor(name, stored.path, meta, threads=threads)  # a compiled one too: its served threads
    image, _ = generate_scene(1, 256, 512)
    rates = {}
    for bs in batch_sizes:
        batch = predictor.preprocess([image] * bs)
        t = time.perf_counter()
        predictor.forward(batch)
        duration = max(LIMIT_SECONDS, 3 * (time.perf_counter() - t))
        barrier.wait()
        done, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < duration:
            predictor.forward(batch)
            done += bs
        rates[bs] = done / (time.perf_counter() - t0)
    queue.put(rates)


def limit_beside_serving(store: Path, name: str, batch_sizes=(1, 2, 4, 8)) -> dict[str, dict[int, float]]:
    """The limit, measured in the minutes before the model's served run (this machine's speed drifts by tens of
    percent over a benchmark): the forward alone in fresh processes in the served precision, per batch size,
    (a) one process with a thread per CPU; (b) for a model served by several workers, that many processes with
    the served threads each, all at once (their images/s summed); (c) for a model whose worker splits its batches
    over its threads (services.SPLIT_BATCH), one single-threaded process per CPU, all at once."""
    from segmentation.services import SPLIT_BATCH, available_cpus, parallelism

    cpus = available_cpus()
    configs = {f"1 process x {cpus} threads": (1, cpus)}
    workers, threads = parallelism(name)
    if workers > 1:
        configs[f"{workers} processes x {threads} threads"] = (workers, threads)
    if name in SPLIT_BATCH and cpus > 1:
        configs[f"{cpus} processes x 1 thread"] = (cpus, 1)
    ctx = multiprocessing.get_context("spawn")
    out = {}
    for label, (n, t) in configs.items():
        barrier, queue = ctx.Barrier(n), ctx.Queue()
        procs = [
            ctx.Process(target=_forward_rates, args=(str(store), name, t, batch_sizes, barrier, queue))
            for _ in range(n)
        ]
        for p in procs:
            p.start()
        try:
            rates = [queue.get(timeout=1800) for _ in procs]
        finally:
            for p in procs:
                p.join(60)
                if p.is_alive():
                    p.kill()
        out[label] = {bs: round(sum(r[bs] for r in rates), 3) for bs in batch_sizes}
        log.info("limit beside serving, %s, %s: %s", name, label, out[label])
    return out


def best_limit(beside: dict[str, dict[int, float]]) -> float:
    """The best configuration and batch of :func:`limit_beside_serving`'s rates."""
    return max(max(rates.values()) for rates in beside.values())


def served_limit(results: dict, name: str) -> float:
    """The limit the served throughput is held against: the best configuration and batch measured beside the served
    run, else (older results) the one from the start of the run."""
    beside = results.get("limit_beside", {}).get(name)
    if beside:
        return best_limit(beside)
    return raw_limit(results["raw"], name)


def bf16_agreement(demo_home: Path) -> dict:
    """bf16 against fp32 on the trained demo models: label agreement per image set, and batch invariance."""
    from PIL import Image

    from segmentation.precision import label_agreement
    from segmentation.samples import Samples
    from segmentation.scenes import generate_scene
    from segmentation.store import load_predictor

    samples = Samples()
    photos = sorted((ROOT.parent / "shared" / "cityscapes-sample" / "images").glob("*.png"))
    sets = {
        "data samples": [samples.image(i) for i in samples.ids()],
        "cityscapes photos": [np.asarray(Image.open(p).convert("RGB")) for p in photos],
        "held-out scenes": [generate_scene(300_000 + k, 256, 512)[0] for k in range(8)],
    }
    out = {}
    for name in MODELS:
        stored = demo_model(demo_home, name)
        if stored is None:
            log.warning("no demo %s in %s: run `make models` first; agreement not measured", name, demo_home)
            continue
        meta = dict(stored.info.metadata)
        fp32, bf16 = (load_predictor(name, stored.path, meta, p) for p in ("fp32", "bf16"))
        row = {"recorded_precision": meta.get("precision", "fp32")}
        for key, images in sets.items():
            if images:
                a = [fp32.predict([i]).labels[0] for i in images]
                b = [bf16.predict([i]).labels[0] for i in images]
                row[key] = round(label_agreement(a, b), 5)
        alone = [bf16.predict([i]).labels[0] for i in sets["data samples"]]
        row["bf16_batch_invariant"] = all(
            np.array_equal(x, y) for x, y in zip(alone, bf16.predict(sets["data samples"]).labels)
        )
        out[name] = row
        log.info("agreement %s: %s", name, row)
    return out


# --- served ----------------------------------------------------------------------------------------------------


class Server:
    def __init__(self, home: Path, port: int, env: dict, cpus: str | None = None):
        self.url = f"http://127.0.0.1:{port}"
        pin = ["taskset", "-c", cpus] if cpus else []  # every process of the server on these CPUs
        self.proc = subprocess.Popen(
            [*pin, sys.executable, "-m", "bentoml", "serve", "service:Segmentation", "--host", "127.0.0.1",
             "--port", str(port)],
            cwd=ROOT,
            env={**os.environ, **env, "BENTOML_HOME": str(home)},
            start_new_session=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.ready_s = round(wait_until_ready(self.url, 600, alive=lambda: self.proc.poll() is None), 1)

    def _by_role(self, measure) -> dict[str, float]:
        """``measure(process)`` summed over the server's processes by role (a service's workers together)."""
        out = {}
        root = psutil.Process(self.proc.pid)
        for p in [root, *root.children(recursive=True)]:
            try:
                cmd = p.cmdline()
                role = cmd[cmd.index("--service-name") + 1] if "--service-name" in cmd else "arbiter"
                out[role] = out.get(role, 0.0) + measure(p)
            except (psutil.NoSuchProcess, ValueError):
                continue
        return out

    def rss_mb(self) -> dict[str, float]:
        """Resident memory of the server's processes by role, summed over a service's workers."""
        return {role: round(mb, 1) for role, mb in self._by_role(lambda p: p.memory_info().rss / 2**20).items()}

    def cpu_seconds(self) -> dict[str, float]:
        """CPU time (user + system) each server role has used so far."""
        return self._by_role(lambda p: sum(p.cpu_times()[:2]))

    def stop(self) -> None:
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


async def load(url: str, model: str, image: Path, concurrency: int, n: int) -> dict:
    """``n`` requests for ``model``'s mask, ``concurrency`` clients at a time. A client whose request is refused
    because the model is busy (503 with ``Retry-After``) waits as told and sends it again, as a well-behaved client
    does; its latency counts from the first attempt. Throughput and latency count answered requests only; refusals
    and failed requests are reported by status."""
    import aiohttp

    body = image.read_bytes()
    latencies, refused, failed = [], {}, {}
    sem = asyncio.Semaphore(concurrency)

    async def one(session):
        async with sem:
            t, dropped = time.perf_counter(), 0
            while True:
                form = aiohttp.FormData()
                form.add_field("image", body, filename=image.name, content_type="image/png")
                form.add_field("model", model)
                form.add_field("output", "mask")
                try:
                    async with session.post(f"{url}/segment", data=form) as r:
                        await r.read()
                except (aiohttp.ClientOSError, aiohttp.ServerDisconnectedError):
                    # a kept-alive connection the server closed while this client waited: again, on a fresh one
                    dropped += 1
                    if dropped == 3:
                        failed["connection"] = failed.get("connection", 0) + 1
                        return
                    continue
                if r.status == 503 and r.headers.get("Retry-After"):
                    refused[r.status] = refused.get(r.status, 0) + 1
                    await asyncio.sleep(float(r.headers["Retry-After"]))
                    continue
                break
            if r.status == 200:
                latencies.append(time.perf_counter() - t)
            else:
                failed[r.status] = failed.get(r.status, 0) + 1

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=900)) as session:
        await one(session)  # warm
        latencies.clear()
        refused.clear()
        failed.clear()
        t0 = time.perf_counter()
        await asyncio.gather(*(one(session) for _ in range(n)))
        took = time.perf_counter() - t0
    lat = np.array(latencies or [np.nan]) * 1e3
    return {
        "throughput": round(len(latencies) / took, 3),
        "p50_ms": round(float(np.percentile(lat, 50)), 1),
        "p99_ms": round(float(np.percentile(lat, 99)), 1),
        "errors": sum(failed.values()),
        "errors_by_status": {str(k): v for k, v in sorted(failed.items(), key=lambda kv: str(kv[0]))},
        "refused_then_retried": sum(refused.values()),
        "requests": n,
    }


def server_timing(header: str) -> dict[str, float]:
    """``decode;dur=35.1, inference;dur=810.4`` -> {"decode": 35.1, "inference": 810.4}."""
    stages = {}
    for part in filter(None, (p.strip() for p in header.split(","))):
        name, _, dur = part.partition(";dur=")
        stages[name] = float(dur)
    return stages


def photo_overhead(url: str, photo: Path, runs: int = 5) -> dict:
    """Per request: end-to-end time minus that request's own forward time (its Server-Timing header), median of
    ``runs``; so the forward's run-to-run variation does not leak into the overhead. Stages from the same header."""
    import httpx

    body = photo.read_bytes()
    out = {}
    with httpx.Client(base_url=url, timeout=900) as client:
        for model in MODELS:
            row = {}
            for output, fmt in (("mask", "png"), ("overlay", "png"), ("overlay", "jpeg")):
                overheads, stages = [], []
                for i in range(runs + 1):
                    t = time.perf_counter()
                    r = client.post(
                        "/segment",
                        files={"image": (photo.name, body, "image/png")},
                        data={"model": model, "output": output, "format": fmt},
                    )
                    e2e = (time.perf_counter() - t) * 1e3
                    r.raise_for_status()
                    if i:  # the first call warms this path
                        stages.append(server_timing(r.headers["server-timing"]))
                        overheads.append(e2e - stages[-1]["inference"])
                median = {k: round(statistics.median(s[k] for s in stages), 1) for k in stages[0]}
                row[f"{output}_{fmt}"] = {"overhead_ms": round(statistics.median(overheads), 1), "stages_ms": median}
            out[model] = row
            log.info("photo %s: %s", model, json.dumps(row))
    return out


def ensemble_latency(url: str, photo: Path, runs: int = 9) -> dict:
    """End-to-end time of one photo's mask (median of ``runs``, after one warm-up each) through each member and
    through the ensemble, requests alternating between them, at concurrency 1; and the ensemble's excess over
    the slower member."""
    import httpx

    from segmentation.ensemble import MEMBERS, NAME

    body = photo.read_bytes()
    times: dict[str, list[float]] = {m: [] for m in (*MEMBERS, NAME)}
    with httpx.Client(base_url=url, timeout=900) as client:
        for i in range(runs + 1):
            for model in times:
                t = time.perf_counter()
                r = client.post("/segment", files={"image": (photo.name, body, "image/png")},
                                data={"model": model, "output": "mask"})
                r.raise_for_status()
                if i:
                    times[model].append((time.perf_counter() - t) * 1e3)
    out = {m: round(statistics.median(t), 1) for m, t in times.items()}
    out["excess_over_slower_member_ms"] = round(out[NAME] - max(out[m] for m in MEMBERS), 1)
    log.info("ensemble latency, %s: %s", photo.name, json.dumps(out))
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
    raw, served = results["raw"], results["served"]
    lines = [
        f"Machine: {results['machine']}",
        "",
        "Forward pass alone, in process (images/s, best batch of 1/2/4/8), full presets:",
        "",
        "| model | native fp32 | native bf16 | bf16 / fp32 | compiled runtime | compiled / fp32 | served in |",
        "|---|---|---|---|---|---|---|",
    ]
    for m in MODELS:
        f32 = max(raw[m]["fp32"].values())
        b16 = max(raw[m]["bf16"].values()) if "bf16" in raw[m] else None
        bf16_cells = f"{b16} | {b16 / f32:.2f}x" if b16 else "not measured: no native bf16 on this CPU |"
        compiled = raw[m].get("served")
        best = max(raw[m][compiled].values()) if compiled else None
        compiled_cells = f"{best} ({compiled}) | {best / f32:.2f}x" if compiled else "- (native chosen) | -"
        served_in = compiled or f"native {raw[m]['served_precision']}"
        lines.append(f"| {m} | {f32} | {bf16_cells} | {compiled_cells} | {served_in} |")
    for m in MODELS:
        if "per_worker" in raw[m]:
            w = raw[m]["per_worker"]
            lines += [
                "",
                f"{m} is served by {w['workers']} workers of {w['threads']} thread(s): one such worker alone, "
                f"best batch: {max(w['rates'].values())} img/s.",
            ]
    if results.get("limit_beside"):
        lines += [
            "",
            "The limit, measured again just before each model's served run (forward alone in fresh processes, "
            "served precision, images/s per batch size; several processes run at once and are summed):",
            "",
            "| model | configuration | batch 1 | 2 | 4 | 8 |",
            "|---|---|---|---|---|---|",
        ]
        for m, configs in results["limit_beside"].items():
            for label, rates in configs.items():
                lines.append(
                    f"| {m} | {label} | "
                    + " | ".join(str(rates.get(bs, rates.get(str(bs), "-"))) for bs in (1, 2, 4, 8))
                    + " |"
                )
    if results.get("agreement") == {}:
        lines += ["", "bf16 against fp32 labels: not measured (no native bf16 on this CPU: every model serves fp32)."]
    elif results.get("agreement"):
        sets = [
            k
            for k in next(iter(results["agreement"].values()))
            if k not in ("recorded_precision", "bf16_batch_invariant")
        ]
        lines += [
            "",
            "bf16 labels equal to fp32 labels (fraction of pixels), trained demo models:",
            "",
            "| model | " + " | ".join(sets) + " | batch-invariant in bf16 | recorded at import |",
            "|---|" + "---|" * (len(sets) + 2),
        ]
        for m, row in results["agreement"].items():
            lines.append(
                f"| {m} | "
                + " | ".join(str(row.get(k, "-")) for k in sets)
                + f" | {row['bf16_batch_invariant']} | {row['recorded_precision']} |"
            )
    lines += [
        "",
        "Served through `bentoml serve`, 512x256 PNG, output=mask (images/s answered; latency in ms of the answered "
        "requests, from the first attempt; busy: 503 refusals the client retried after Retry-After; failed: requests "
        "that ended without an answer, by status; both over every run of the model):",
        "",
        "| model | raw limit | c=16 batching on | ratio | p50 / p99 c=16 | p99 / p50 | batching off c=16 | busy "
        "| failed |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for m in MODELS:
        limit = served_limit(results, m)
        on, off = served["on"][m]["16"], served["off"][m]["16"]
        refused: dict[str, int] = {}
        for r in (r for runs in served.values() for r in runs[m].values()):
            by_status = r.get("errors_by_status") or ({"non-200": r["errors"]} if r.get("errors") else {})  # older runs
            for status, count in by_status.items():
                refused[status] = refused.get(status, 0) + count
        refusals = ", ".join(f"{s}: {c}" for s, c in sorted(refused.items())) or "0"
        busy = sum(r.get("refused_then_retried", 0) for runs in served.values() for r in runs[m].values())
        lines.append(
            f"| {m} | {limit} | {on['throughput']} | {on['throughput'] / limit:.2f} | {on['p50_ms']} / {on['p99_ms']} "
            f"| {on['p99_ms'] / on['p50_ms']:.2f} | {off['throughput']} | {busy} | {refusals} |"
        )
    lines += [
        "",
        "CPU per request at c=16, batching on (ms of CPU; the load generator runs on the same cores):",
        "",
        "| model | model process | gateway | load generator | wall per request x cores |",
        "|---|---|---|---|---|",
    ]
    for m in MODELS:
        r = served["on"][m]["16"]
        cpu = r.get("cpu_ms_per_request", {})
        budget = 1e3 / r["throughput"] * psutil.cpu_count()
        lines.append(f"| {m} | {cpu.get('model')} | {cpu.get('gateway')} | {cpu.get('client')} | {budget:.1f} |")
    if "1core" in served:
        lines += [
            "",
            "Throughput vs cores (batching on, c=16, all server processes pinned with taskset):",
            "",
            "| model | 1 core | 2 cores | scaling |",
            "|---|---|---|---|",
        ]
        for m in MODELS:
            one, two = served["1core"][m]["16"]["throughput"], served["on"][m]["16"]["throughput"]
            lines.append(f"| {m} | {one} | {two} | {two / one:.2f}x |")
    photo_tables = [("photo", "full presets, random weights")]
    if "photo_trained" in results:
        photo_tables.append(("photo_trained", "trained demo models (--demo-store)"))
    for key, which in photo_tables:
        lines += [
            "",
            f"One 2048x1024 photo (PNG upload), concurrency 1, {which}: serving overhead = end-to-end minus the "
            f"same request's forward (ms, median of {results.get('photo_runs', 5)}):",
            "",
            "| model | mask | PNG overlay | JPEG overlay | mask: decode / pre / post / queue / render "
            "(Server-Timing) |",
            "|---|---|---|---|---|",
        ]
        for m in MODELS:
            r = results[key][m]
            st = r["mask_png"]["stages_ms"]
            lines.append(
                f"| {m} | {r['mask_png']['overhead_ms']} | {r['overlay_png']['overhead_ms']} "
                f"| {r['overlay_jpeg']['overhead_ms']} "
                f"| {st['decode']} / {st['preprocess']} / {st['postprocess']} / {st.get('queue', '-')} "
                f"/ {st['render']} |"
            )
    lines += [
        "",
        f"Resident memory (MB): {json.dumps(results['rss_mb'])}; total {sum(results['rss_mb'].values()):.0f} MB.",
        f"Start to /readyz: {results['ready_s']} s.",
    ]
    (OUT / "results.md").write_text("\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    conc = [1, 4, 16]
    for ax, m in zip(axes, MODELS):
        for mode, style, label in (
            ("on", "o-", "batching on, 2 cores"),
            ("off", "s--", "batching off, 2 cores"),
            ("1core", "^:", "batching on, 1 core"),
        ):
            if mode in served:
                ax.plot(conc, [served[mode][m][str(c)]["throughput"] for c in conc], style, label=label)
        served_in = raw[m].get("served", raw[m]["served_precision"])
        ax.axhline(served_limit(results, m), color="gray", ls=":", label=f"raw forward ({served_in}, best)")
        ax.set_title(f"{m} (full preset)")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel("images / s")
        ax.set_ylim(bottom=0)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(OUT / "results.png", dpi=110)


def load_with_cpu(server: Server, model: str, concurrency: int, n: int) -> dict:
    """:func:`load` of the sample image, with where the cores went per request: the model's process, the gateway
    and this load generator (``cpu_ms_per_request``)."""
    before, client_before = server.cpu_seconds(), sum(psutil.Process().cpu_times()[:2])
    r = asyncio.run(load(server.url, model, SAMPLE, concurrency, n))
    after, client_after = server.cpu_seconds(), sum(psutil.Process().cpu_times()[:2])
    used = {role: after[role] - before.get(role, 0.0) for role in after}
    r["cpu_ms_per_request"] = {
        "model": round(1e3 * used.get(f"{model}_model", 0.0) / (n + 1), 1),
        "gateway": round(1e3 * used.get("segmentation", 0.0) / (n + 1), 1),
        "client": round(1e3 * (client_after - client_before) / (n + 1), 1),
    }
    return r


# A served run at 16 clients lasts about this long at the limit's rate, so that it spans about as many seconds as
# the limit it is held against: three requests a client were a few seconds of UNet's.
SERVED_SECONDS = 30.0


def requests_for(clients: int, quick: bool, rate: float | None) -> int:
    """How many requests a served run at ``clients`` sends: three a client (one when ``quick``), two more alone;
    at 16 clients, enough for ``SERVED_SECONDS`` at ``rate`` images/s."""
    n = clients * (1 if quick else 3) + (2 if clients == 1 else 0)
    if clients == 16 and rate and not quick:
        n = max(n, math.ceil(SERVED_SECONDS * rate))
    return n


def serve_and_load(
    store: Path, port: int, env: dict, quick: bool, cpus: str | None = None, limits: dict | None = None
) -> tuple["Server", dict]:
    """Start a server and load it per model at 1, 4 and 16 clients; ``limits`` empty: first measure each model's
    limit beside it (limit_beside_serving, while the server idles) into that dict; given: size the 16-client runs
    by them (:func:`requests_for`)."""
    server = Server(store, port, env, cpus)
    out = {}
    measure = limits is not None and not limits
    try:
        for m in MODELS:
            if measure:
                limits[m] = limit_beside_serving(store, m, (1, 2) if quick else (1, 2, 4, 8))
            rate = best_limit(limits[m]) if limits and m in limits else None
            out[m] = {}
            for c in (1, 4, 16):
                n = requests_for(c, quick, rate)
                out[m][str(c)] = r = load_with_cpu(server, m, c, n)
                log.info("served %s c=%d (%s): %s", m, c, json.dumps({**env, "cpus": cpus or "all"}), r)
    except BaseException:
        server.stop()
        raise
    return server, out


def add_demo_store_argument(ap: argparse.ArgumentParser) -> None:
    """``--demo-store``: where `make models` put the trained demo models, as BentoML itself finds its home."""
    ap.add_argument(
        "--demo-store",
        type=Path,
        default=Path(os.environ.get("BENTOML_HOME") or Path.home() / "bentoml"),
        help="the BentoML home holding the trained demo models (default: $BENTOML_HOME or ~/bentoml)",
    )


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", type=Path, default=ROOT / "build" / "bench-store")
    add_demo_store_argument(ap)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--port", type=int, default=3400)
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    from segmentation.services import set_threads

    for framework in ("keras", "pytorch"):  # as each model service does, before either framework runs anything
        set_threads(framework)
    precisions = demo_precisions(args.demo_store)
    log.info("serving the full presets in the precisions the demo models earned: %s", precisions)
    ensure_full_store(args.store, precisions, demo_runtimes(args.demo_store))
    results = {
        "machine": f"{platform.processor() or platform.machine()}, {psutil.cpu_count()} CPUs, "
        f"{psutil.virtual_memory().total / 2**30:.0f} GiB, Python {platform.python_version()}",
        "photo_runs": 2 if args.quick else PHOTO_RUNS,
    }
    photo_runs = results["photo_runs"]
    results["raw"] = raw_throughput(args.store)
    from segmentation.precision import cpu_has_bf16

    # without native bf16 every model is served in fp32, and a "bf16" predictor would be fp32 again (1.0 everywhere)
    results["agreement"] = bf16_agreement(args.demo_store) if cpu_has_bf16() else {}
    results["served"] = {}
    runs = (("on", {}, None), ("off", {"SEG_MAX_BATCH_SIZE": "1"}, None), ("1core", {}, "0"))
    for i, (mode, env, cpus) in enumerate(runs):
        limits = results.setdefault("limit_beside", {})  # measured in the first run, then sizing the others
        server, results["served"][mode] = serve_and_load(args.store, args.port + i, env, args.quick, cpus, limits)
        try:  # a port of its own per server: the last one may still be closing
            if mode == "on":
                results["ready_s"] = server.ready_s
                results["photo"] = photo_overhead(server.url, photo_path(), runs=photo_runs)
                results["ensemble_latency"] = ensemble_latency(server.url, photo_path(), runs=3 if args.quick else 9)
                results["rss_mb"] = server.rss_mb()
        finally:
            server.stop()
    if (args.demo_store / "models").is_dir():
        # Random weights put every pixel on a class border, so the full models' post-processing takes its slow
        # path; trained weights show what a user's photo costs beyond the forward.
        server = Server(args.demo_store, args.port + len(runs), {})
        try:
            results["photo_trained"] = photo_overhead(server.url, photo_path(), runs=photo_runs)
        finally:
            server.stop()
    write_report(results)
    log.info("wrote %s", OUT)
    log.info("\n%s", (OUT / "results.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
