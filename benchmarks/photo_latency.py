"""Serving overhead for one photo per model at concurrency 1, against a running server.

    .venv/bin/python benchmarks/photo_latency.py --url http://127.0.0.1:3000 PHOTO.png [--runs 5]

For each model and output (mask; overlay as PNG and as JPEG): the median of end-to-end time minus the same
request's forward time, and the stages from its Server-Timing header (benchmark.photo_overhead).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from benchmark import photo_overhead

log = logging.getLogger("photo_latency")


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("photo", type=Path)
    ap.add_argument("--url", default="http://127.0.0.1:3000")
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    log.info(json.dumps(photo_overhead(args.url, args.photo, args.runs), indent=2))


if __name__ == "__main__":
    main()
