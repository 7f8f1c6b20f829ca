"""Served throughput against the limit at 16 clients, one model, in alternating runs of server settings.

Each run measures the limit first (the forward alone in fresh processes, `benchmark.limit_beside_serving`), then
starts `bentoml serve` on the benchmark's store with the run's `SEG_*` settings and sends `--requests` mask
requests, 16 at a time (`benchmark.load`). It logs images/s served, the limit, their ratio, latency and the CPU
each role used per request. This machine's speed drifts by tens of percent within minutes, so compare settings
over several alternating runs, never one.

Usage (after `benchmarks/benchmark.py` has built build/bench-store):
    .venv/bin/python benchmarks/served_ratio.py --model unet --requests 400 --runs 2 \
        --setting "" --setting SEG_MAX_BATCH_SIZE=1
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import benchmark  # noqa: E402

log = logging.getLogger("served_ratio")


def parse_setting(text: str) -> dict[str, str]:
    """``"SEG_A=1,SEG_B=2"`` -> {"SEG_A": "1", "SEG_B": "2"}; ``""`` -> the defaults."""
    pairs = [p for p in text.split(",") if p.strip()]
    bad = [p for p in pairs if "=" not in p or not p.split("=", 1)[0].startswith("SEG_")]
    if bad:
        raise SystemExit(f"--setting takes SEG_NAME=value pairs separated by commas, not {', '.join(bad)}")
    return dict(p.strip().split("=", 1) for p in pairs)


def one_run(store: Path, model: str, env: dict[str, str], requests: int, port: int) -> dict:
    limit = benchmark.best_limit(benchmark.limit_beside_serving(store, model, (1, 2)))
    server = benchmark.Server(store, port, env)
    try:
        served = benchmark.load_with_cpu(server, model, 16, requests)
    finally:
        server.stop()
    return {"setting": env or "defaults", "served": served["throughput"], "limit": limit,
            "ratio": round(served["throughput"] / limit, 3), "p50_ms": served["p50_ms"], "p99_ms": served["p99_ms"],
            "errors": served["errors"], "refused_then_retried": served["refused_then_retried"],
            "cpu_ms_per_request": served["cpu_ms_per_request"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=benchmark.MODELS, required=True)
    parser.add_argument("--requests", type=int, default=96, help="per run, 16 at a time")
    parser.add_argument("--runs", type=int, default=2, help="rounds; each round runs every setting once, in turn")
    parser.add_argument("--setting", action="append", default=None,
                        help='SEG_* variables for one arm, e.g. "SEG_MAX_BATCH_SIZE=1"; "" for the defaults')
    parser.add_argument("--store", type=Path, default=ROOT / "build" / "bench-store")
    parser.add_argument("--port", type=int, default=3500)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if not (args.store / "models").is_dir():
        raise SystemExit(f"no model store at {args.store}: run benchmarks/benchmark.py first (it builds it)")
    arms = [parse_setting(s) for s in (args.setting or [""])]
    rows = []
    for r in range(args.runs):
        for i, env in enumerate(arms):
            rows.append(one_run(args.store, args.model, env, args.requests, args.port + r * len(arms) + i))
            log.info("%s %s", args.model, json.dumps(rows[-1]))
    for env in arms:
        mine = [row for row in rows if row["setting"] == (env or "defaults")]
        log.info("%s %s: served %s img/s, ratio %s", args.model, env or "defaults",
                 " / ".join(str(row["served"]) for row in mine), " / ".join(str(row["ratio"]) for row in mine))
    return 0


if __name__ == "__main__":
    sys.exit(main())
