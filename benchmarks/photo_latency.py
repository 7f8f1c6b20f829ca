"""End-to-end latency of one photo per model at concurrency 1, with the server's own stage breakdown.

    .venv/bin/python benchmarks/photo_latency.py --url http://127.0.0.1:3000 PHOTO.png [--runs 5]

For each model: the median wall time of `segment` (mask; overlay as PNG and as JPEG) through the Python client,
and `analyze`'s decode / preprocess / inference / postprocess times for the same photo.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path

import bentoml

log = logging.getLogger("photo_latency")
MODELS = ("dilatednet", "mask2former", "unet")


def median_ms(fn, runs: int) -> float:
    fn()  # warm
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return round(1e3 * statistics.median(times), 1)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("photo", type=Path)
    ap.add_argument("--url", default="http://127.0.0.1:3000")
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    report = {}
    with bentoml.SyncHTTPClient(args.url, timeout=300) as client:
        for model in MODELS:
            row = {
                f"segment_{output}_{fmt}_ms": median_ms(
                    lambda o=output, f=fmt: client.segment(image=args.photo, model=model, output=o, format=f), args.runs)
                for output, fmt in (("mask", "png"), ("overlay", "png"), ("overlay", "jpeg"))
            }
            row["analyze_stages_ms"] = client.analyze(image=args.photo, model=model)["timings_ms"]
            report[model] = row
            log.info("%s: %s", model, json.dumps(row))
    log.info(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
