"""The folder job against one server and against two (replicas), each server pinned to one core.

    .venv/bin/python benchmarks/job_scaling.py --images ../shared/cityscapes-sample/images [--model mask2former]
        [--copies 2] [--workers 8] [--home ~/bentoml]

Starts ``bentoml serve`` on CPU 0 (and a second on CPU 1), each with one thread per model, runs
``python -m segmentation.jobs`` over the folder (each image ``--copies`` times, under other names) with the same
workers, and prints the images/s of each run and the ratio. Also measures the answer sizes of one photo as COCO
RLE, polygons and PNG (segment_json) against the PNG mask of /segment.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import requests

from benchmark import ROOT, Server

log = logging.getLogger("job_scaling")


def run_job(urls: list[str], model: str, images: Path, out: Path, workers: int) -> dict:
    subprocess.run(
        [sys.executable, "-m", "segmentation.jobs", *urls, "--model", model, "--input", str(images),
         "--output", str(out), "--workers", str(workers)],
        cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    return json.loads((out / "report.json").read_text())


def answer_sizes(url: str, photo: Path, model: str) -> dict[str, int]:
    files = {"image": (photo.name, photo.read_bytes())}
    sizes = {"png_mask": len(requests.post(f"{url}/segment", files=files, data={"model": model, "output": "mask"},
                                           timeout=120).content)}
    for encoding in ("rle", "polygons", "png"):
        r = requests.post(f"{url}/segment_json", files=files, data={"model": model, "encoding": encoding}, timeout=120)
        sizes[f"json_{encoding}"] = len(r.content)
    return sizes


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=Path, required=True)
    ap.add_argument("--model", default="mask2former")
    ap.add_argument("--copies", type=int, default=2)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--home", type=Path, default=Path.home() / "bentoml")
    args = ap.parse_args()
    photos = sorted(args.images.glob("*.png"))
    env = {"SEG_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "images"
        folder.mkdir()
        for k in range(args.copies):
            for p in photos:
                shutil.copy(p, folder / f"{p.stem}_{k}.png")
        first = Server(args.home, 3301, env, cpus="0")
        second = None
        try:
            sizes = {m: answer_sizes(first.url, photos[0], m) for m in ("dilatednet", "mask2former", "unet")}
            log.info("answer sizes for %s (bytes): %s", photos[0].name, json.dumps(sizes))
            run_job([first.url], args.model, folder, Path(tmp) / "warm", args.workers)  # warm the models
            one = run_job([first.url], args.model, folder, Path(tmp) / "one", args.workers)
            second = Server(args.home, 3302, env, cpus="1")
            run_job([second.url], args.model, folder, Path(tmp) / "warm2", args.workers)
            two = run_job([first.url, second.url], args.model, folder, Path(tmp) / "two", args.workers)
        finally:
            first.stop()
            if second:
                second.stop()
    a, b = one["images_per_second"], two["images_per_second"]
    log.info(
        "%s, %d images, %d workers: one server (1 core) %.3f images/s; two servers (1 core each) %.3f images/s: "
        "%.2fx", args.model, one["images"], args.workers, a, b, b / a,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
