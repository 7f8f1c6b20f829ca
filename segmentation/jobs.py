"""A job over a folder of images, through one or more running servers (BentoML's ``AsyncHTTPClient``).

    python -m segmentation.jobs http://localhost:3000 --model dilatednet --input data/images --output out \\
        --truth data/masks [--truth-kind label_ids] [--workers 4] [--overlays]

Give several URLs (replicas, or servers behind no balancer) and the job spreads its workers over them. For each
image it writes ``masks/<name>.png`` (class ids), ``overlays/<name>.png`` if asked, and a record; at the end
``report.json`` and ``report.csv``: per image the classes found, the time taken and, against ``--truth``, IoU per
class and its mean; over all images IoU per class and mean IoU from the summed confusion matrix. Scores leave out
pixels whose truth is void, as Cityscapes does (and as ``/evaluate`` does: the same function).

The job resumes: an image whose outputs exist is not sent again, and the report covers every recorded image.
Answers 429 and 503 (busy, or a model worker restarting) and dropped connections are retried: after the time a
busy model's answer names ("retry in N s"), else with exponential back-off; any other error is that image's,
recorded in the report, and the job goes on.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import csv
import io
import json
import logging
import random
import re
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
from PIL import Image
from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, wait_random_exponential
from tqdm import tqdm

from . import admission
from .bentoml_workarounds import async_client_per_caller
from .classes import CLASS_NAMES, TRUTH_KINDS, truth_to_superclasses
from .metrics import reported, truth_confusion

log = logging.getLogger("segmentation.jobs")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
RETRIED_STATUSES = (429, 503)
# A busy model's 503 says when its queue would have room (admission.RETRY_IN). BentoML's client
# raises with the answer's text but not its headers, so the Retry-After header itself is out of reach here.
RETRY_IN = re.compile(re.escape(admission.RETRY_IN).replace(r"\{\}", r"(\d+)"))
_BACKOFF = wait_random_exponential(multiplier=0.5, max=10)


@dataclass(frozen=True)
class Job:
    urls: list[str]
    model: str
    input: Path
    output: Path
    truth: Path | None = None
    truth_kind: str = "label_ids"
    workers: int = 4
    overlays: bool = False
    attempts: int = 6
    timeout_s: float = 300.0

    def record_path(self, image: Path) -> Path:
        return self.output / "records" / f"{image.stem}.json"

    def mask_path(self, image: Path) -> Path:
        return self.output / "masks" / f"{image.stem}.png"

    def overlay_path(self, image: Path) -> Path:
        return self.output / "overlays" / f"{image.stem}.png"

    def done(self, image: Path) -> bool:
        return (
            self.record_path(image).is_file()
            and self.mask_path(image).is_file()
            and (not self.overlays or self.overlay_path(image).is_file())
        )


def _write(path: Path, data: bytes) -> None:
    """All or nothing: an interrupted job leaves no half-written file to be taken for a finished one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    try:
        partial.write_bytes(data)
        partial.replace(path)
    finally:
        partial.unlink(missing_ok=True)


def _wait(state) -> float:
    """Seconds before the next attempt: as long as a busy model asked, plus up to a second so that refused
    clients do not all come back at once; else randomised exponential back-off."""
    told = RETRY_IN.search(str(state.outcome.exception()))
    return int(told.group(1)) + random.uniform(0, 1) if told else _BACKOFF(state)


def _retried(e: BaseException) -> bool:
    status = getattr(e, "error_code", None)
    return (status is not None and int(status) in RETRIED_STATUSES) or isinstance(e, httpx.TransportError)


def images_in(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise FileNotFoundError(f"--input {folder} is not a folder")
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def truth_for(job: Job, image: Path) -> np.ndarray | None:
    if job.truth is None:
        return None
    path = job.truth / f"{image.stem}.png"
    if not path.is_file():
        return None
    with Image.open(path) as img:
        return truth_to_superclasses(np.asarray(img), job.truth_kind)


class Scorer:
    """The model's scoring as ``/evaluate`` does it, from its entry in ``/models``."""

    def __init__(self, model: dict):
        self.binary = model["task"] == "binary"
        self.num_classes = len(model["classes"])
        self.names = list(model["classes"])
        self.foreground = CLASS_NAMES.index(model["foreground"]) if self.binary else None

    def confusion(self, truth: np.ndarray, labels: np.ndarray) -> np.ndarray:
        return truth_confusion(truth, labels, self.num_classes, self.foreground)

    def summary(self, cm: np.ndarray) -> dict:
        s = reported(cm, self.binary)
        return {"iou": dict(zip(self.names, s["iou"])), **{k: s[k] for k in ("mean_iou", "pixel_accuracy")}}


async def process(job: Job, client, image: Path, scorer: Scorer, palette: np.ndarray | None) -> dict:
    """One image: segment (retrying while the server is busy), write its mask, overlay and record."""
    t0 = time.perf_counter()
    async for attempt in AsyncRetrying(
        retry=retry_if_exception(_retried),
        wait=_wait,
        stop=stop_after_attempt(job.attempts),
        reraise=True,
    ):
        with attempt:
            answer = await client.segment_json(image=image, model=job.model, encoding="png")
    elapsed_ms = (time.perf_counter() - t0) * 1e3
    png = base64.b64decode(answer["mask_png"])
    labels = np.asarray(Image.open(io.BytesIO(png)))
    _write(job.mask_path(image), png)
    if job.overlays:
        from .images import decode_image
        from .render import encode, render_binary_overlay, render_overlay

        pixels = decode_image(image.read_bytes())  # as the server read it (EXIF orientation applied)
        if scorer.binary:
            picture = render_binary_overlay(pixels, labels)
        else:
            picture = render_overlay(pixels, labels, 0.5, palette)
        _write(job.overlay_path(image), encode(picture, "png"))
    record = {
        "image": image.name,
        "width": answer["width"],
        "height": answer["height"],
        "tag": answer["tag"],
        "ms": round(elapsed_ms, 1),
        "classes": {c["name"]: round(c["pixels"] / labels.size, 6) for c in answer["classes"]},
    }
    truth = truth_for(job, image)
    if truth is not None:
        cm = scorer.confusion(truth, labels)
        record.update(scorer.summary(cm), confusion=cm.tolist())
    _write(job.record_path(image), json.dumps(record).encode())
    return record


async def run(job: Job) -> dict:
    """The whole job; returns the report (also written to ``report.json`` and ``report.csv``)."""
    # SIGTERM (kill, a container stopping) ends the job as Ctrl+C does: between whole files, resumable
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, asyncio.current_task().cancel)
    images = images_in(job.input)
    todo = [p for p in images if not job.done(p)]
    log.info("%d images in %s, %d to do (%d done before)", len(images), job.input, len(todo), len(images) - len(todo))
    failed: dict[str, str] = {}
    async with contextlib.AsyncExitStack() as stack:
        clients = [  # worker w calls server w % len(urls)
            await stack.enter_async_context(
                async_client_per_caller(job.urls[w % len(job.urls)], timeout=job.timeout_s)
            )
            for w in range(job.workers)
        ]
        models = {m["name"]: m for m in await clients[0].models()}
        if job.model not in models:
            raise ValueError(f"the server has no model {job.model!r}; it has {', '.join(models)}")
        scorer = Scorer(models[job.model])
        palette = None
        if job.overlays and not scorer.binary:
            legend = await clients[0].legend(model=job.model)
            palette = np.asarray([c["color"] for c in legend["classes"]], dtype=np.uint8)
        queue: asyncio.Queue[Path] = asyncio.Queue()
        for p in todo:
            queue.put_nowait(p)
        bar = tqdm(total=len(todo), unit="image", desc=f"{job.model} via {len(job.urls)} server(s)")
        t0 = time.perf_counter()

        async def worker(client) -> None:
            while not queue.empty():
                image = queue.get_nowait()
                try:
                    await process(job, client, image, scorer, palette)
                except Exception as e:  # noqa: BLE001 - one image's failure is recorded; the job goes on
                    failed[image.name] = f"{type(e).__name__}: {e}"
                    log.warning("%s: %s", image.name, failed[image.name], exc_info=True)
                bar.update()

        await asyncio.gather(*(worker(client) for client in clients))
        elapsed = time.perf_counter() - t0
        bar.close()
    return write_report(job, images, scorer, failed, len(todo), elapsed)


def write_report(job: Job, images: list[Path], scorer: Scorer, failed: dict, sent: int, elapsed: float) -> dict:
    records = [json.loads(job.record_path(p).read_text()) for p in images if job.record_path(p).is_file()]
    scored = [r for r in records if "confusion" in r]
    total = np.sum([np.asarray(r["confusion"]) for r in scored], axis=0) if scored else None
    done_now = sent - len(failed)
    report = {
        "model": job.model,
        "urls": job.urls,
        "images": len(images),
        "recorded": len(records),
        "sent_this_run": sent,
        "failed": failed,
        "seconds_this_run": round(elapsed, 2),
        "images_per_second": round(done_now / elapsed, 3) if elapsed > 0 and done_now else None,
        **({"truth": str(job.truth), "truth_kind": job.truth_kind, "scored_images": len(scored),
            **scorer.summary(total)} if total is not None else {}),
        "per_image": [{k: v for k, v in r.items() if k != "confusion"} for r in records],
    }
    job.output.mkdir(parents=True, exist_ok=True)
    _write(job.output / "report.json", json.dumps(report, indent=2).encode())
    columns = ["image", "width", "height", "ms", "mean_iou", "pixel_accuracy", *scorer.names]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, columns, extrasaction="ignore")
    writer.writeheader()
    for r in records:
        writer.writerow({**r, **{name: r["classes"].get(name, 0.0) for name in scorer.names}})
    _write(job.output / "report.csv", buf.getvalue().encode())
    return report


def parse_args(argv: list[str] | None = None) -> Job:
    parser = argparse.ArgumentParser(prog="python -m segmentation.jobs", description=__doc__.split("\n\n")[0])
    parser.add_argument("urls", nargs="+", metavar="URL", help="one or more servers, e.g. http://localhost:3000")
    parser.add_argument("--model", required=True)
    parser.add_argument("--input", type=Path, required=True, help="a folder of images")
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--truth", type=Path, help="ground-truth masks named like the images (<name>.png)")
    parser.add_argument("--truth-kind", choices=list(TRUTH_KINDS), default="label_ids")
    parser.add_argument("--workers", type=int, default=4, help="requests in flight, over all servers")
    parser.add_argument("--overlays", action="store_true", help="also write overlays/<name>.png")
    parser.add_argument("--attempts", type=int, default=6, help="tries per image while servers answer 429/503")
    a = parser.parse_args(argv)
    if a.workers < 1 or a.attempts < 1:
        parser.error("--workers and --attempts must be at least 1")
    if a.truth is not None and not a.truth.is_dir():
        parser.error(f"--truth {a.truth} is not a folder")
    return Job([u.rstrip("/") for u in a.urls], a.model, a.input, a.output, a.truth, a.truth_kind, a.workers,
               a.overlays, a.attempts)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request would bury the progress bar
    job = parse_args(argv)
    try:
        report = asyncio.run(run(job))
    except (FileNotFoundError, ValueError) as e:
        log.error("%s", e)
        return 2
    except (KeyboardInterrupt, asyncio.CancelledError) as e:
        log.warning("interrupted: run the same command again to go on from here")
        return 130 if isinstance(e, KeyboardInterrupt) else 143
    log.info(
        "%d of %d images recorded, %d failed, %s images/s; mean IoU %s; report in %s",
        report["recorded"], report["images"], len(report["failed"]), report["images_per_second"],
        report.get("mean_iou"), job.output / "report.json",
    )
    return 1 if report["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
