"""One photo's mask through each ensemble member and through the ensemble, at concurrency 1, against a running
server; prints the medians and the ensemble's excess over the slower member.

    .venv/bin/python benchmarks/ensemble_latency.py --url http://127.0.0.1:3000 PHOTO.png [--runs 9]
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from benchmark import ensemble_latency


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("photo", type=Path)
    ap.add_argument("--url", default="http://127.0.0.1:3000")
    ap.add_argument("--runs", type=int, default=9)
    args = ap.parse_args()
    ensemble_latency(args.url, args.photo, args.runs)


if __name__ == "__main__":
    main()
