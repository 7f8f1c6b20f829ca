"""Serving overhead for one photo per model at concurrency 1, against a running server.

    .venv/bin/python benchmarks/photo_latency.py --url http://127.0.0.1:3000 PHOTO.png [--runs 5] [--ensemble]

For each model and output (mask; overlay as PNG and as JPEG): the median of end-to-end time minus the same
request's forward time, and the stages from its Server-Timing header (benchmark.photo_overhead). With
``--ensemble``: the end-to-end time of the photo's mask through each ensemble member and through the ensemble,
and the ensemble's excess over the slower member (benchmark.ensemble_latency).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from benchmark import ensemble_latency, photo_overhead

log = logging.getLogger("photo_latency")


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("photo", type=Path)
    ap.add_argument("--url", default="http://127.0.0.1:3000")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--ensemble", action="store_true", help="time the ensemble against its members instead")
    args = ap.parse_args()
    if args.ensemble:
        ensemble_latency(args.url, args.photo, args.runs)
    else:
        log.info(json.dumps(photo_overhead(args.url, args.photo, args.runs), indent=2))


if __name__ == "__main__":
    main()
