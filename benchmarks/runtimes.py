"""Compiled runtimes against the native forward, on the `full` presets (the published models' compute).

    .venv/bin/python benchmarks/runtimes.py             # about 10 minutes on 2 cores
    .venv/bin/python benchmarks/runtimes.py --no-bf16   # as on a CPU without native bfloat16: fp32 paths only

Per model: the forward alone, in this process with a thread per CPU, images per second at batch sizes 1, 2, 4, 8
(best of them, median of 3 calls after a warm-up) for native fp32 and bf16, OpenVINO fp32 and bf16, and ONNX
Runtime fp32 (segmentation/runtimes.py converts and loads them as an import does); the conversion time, the
artifact's size and the time to load it from disk (what a model process adds at start). Random weights make
label agreement meaningless (near-ties everywhere), so agreement and batch invariance come from the trained demo
models' import records (the store `make models` filled, --demo-store): what the import measured and chose.
Writes build/benchmark/runtimes.{json,md} (runtimes-no-bf16.{json,md} with ``--no-bf16``).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmark import add_demo_store_argument  # noqa: E402
from segmentation.registry import MODEL_NAMES, spec  # noqa: E402

OUT = ROOT / "build" / "benchmark"
log = logging.getLogger("runtimes")


def best_rate(predictor, image, batch_sizes=(1, 2, 4, 8)) -> tuple[float, int]:
    """(images per second, batch size) of the best batch size for ``predictor.forward``."""
    rates = {}
    for bs in batch_sizes:
        batch = predictor.preprocess([image] * bs)
        predictor.forward(batch)
        times = []
        for _ in range(3):
            t = time.perf_counter()
            predictor.forward(batch)
            times.append(time.perf_counter() - t)
        rates[bs] = bs / statistics.median(times)
    best = max(rates, key=rates.get)
    return round(rates[best], 3), best


def demo_records(demo_home: Path) -> dict[str, dict]:
    from bentoml._internal.models.model import ModelStore

    out = {}
    for name in MODEL_NAMES:
        try:
            out[name] = dict(ModelStore(demo_home / "models").get(f"{name}:latest").info.metadata).get("runtime", {})
        except Exception:  # noqa: BLE001 - no demo store: the table goes without the import's figures
            out[name] = {}
    return out


def measure(name: str, bf16: bool) -> dict:
    from segmentation import runtimes
    from segmentation.scenes import generate_scene
    from segmentation.services import set_threads

    set_threads(spec(name).framework)
    loaded = spec(name).architecture.build_full()
    image, _ = generate_scene(1, 256, 512)
    rows, conversion, size, failures = {}, {}, {}, {}
    for precision in ("fp32", "bf16") if bf16 else ("fp32",):
        rows[f"native {precision}"] = best_rate(loaded.make(precision), image)
        log.info("%s native %s: %.2f img/s (batch %d)", name, precision, *rows[f"native {precision}"])
    with tempfile.TemporaryDirectory() as folder:
        for backend in runtimes.BACKENDS.values():
            path = Path(folder) / backend.artifact
            try:
                t = time.perf_counter()
                backend.convert(loaded.make("fp32"), path)
                conversion[backend.name] = round(time.perf_counter() - t, 1)
                size[backend.name] = round(sum(f.stat().st_size for f in path.parent.iterdir()) / 1e6, 1)
                for precision in (p for p in backend.precisions() if bf16 or p == "fp32"):
                    t = time.perf_counter()
                    run = backend.load(path, precision, None)
                    start = time.perf_counter() - t
                    key = f"{backend.name} {precision}"
                    rows[key] = best_rate(runtimes.use_compiled(loaded.make("fp32"), run, precision, backend.name),
                                          image)
                    rows[f"{key} load_s"] = round(start, 2)
                    log.info("%s %s: %.2f img/s (batch %d); loaded from disk in %.1f s", name, key, *rows[key], start)
            except Exception as e:  # noqa: BLE001 - the table says which backend could not take the model
                failures[backend.name] = f"{type(e).__name__}: {' '.join(str(e).split())[:160]}"
                log.info("%s %s: %s", name, backend.name, failures[backend.name])
    return {"rates": rows, "conversion_s": conversion, "artifact_mb": size, "failures": failures}


def write(results: dict, bf16: bool, suffix: str) -> None:
    columns = ["native fp32", "native bf16", "openvino fp32", "openvino bf16", "onnxruntime fp32"]
    if not bf16:
        columns = [c for c in columns if c.endswith("fp32")]
    lines = [
        "| model | " + " | ".join(columns) + " | chosen at import (demo) | agreement with native fp32, batch-invariant "
        "(demo import) | conversion s | artifact MB | load at start s |",
        "|---|" + "---|" * (len(columns) + 5),
    ]
    for name, r in results["models"].items():
        rates, record = r["rates"], results["demo"].get(name) or {}
        chosen = f"{record['name']} {record['precision']}" if record.get("name") else "?"

        def cell(key):
            if key in rates:
                ratio = rates[key][0] / rates["native fp32"][0]
                return f"{rates[key][0]:.2f} (batch {rates[key][1]}, {ratio:.2f}x fp32)"
            backend = key.split(" ")[0]
            return f"failed: {r['failures'][backend]}" if backend in r["failures"] else "-"

        cand = next((c for c in record.get("candidates", []) if chosen == f"{c['runtime']} {c['precision']}"), None)
        agreement = f"{cand['agreement']:.4%}, {'yes' if cand['batch_invariant'] else 'NO'}" if cand else "-"
        conversion = ", ".join(f"{b} {s}" for b, s in r["conversion_s"].items())
        size = ", ".join(f"{b} {s}" for b, s in r["artifact_mb"].items())
        load = ", ".join(f"{k.removesuffix(' load_s')} {v}" for k, v in rates.items() if k.endswith("load_s"))
        lines.append(f"| {name} | " + " | ".join(cell(c) for c in columns)
                     + f" | {chosen} | {agreement} | {conversion} | {size} | {load} |")
    table = "\n".join(lines) + "\n"
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"runtimes{suffix}.md").write_text(table)
    (OUT / f"runtimes{suffix}.json").write_text(json.dumps(results, indent=1))
    log.info("\n%s", table)


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--no-bf16", action="store_true", help="fp32 paths only, as on a CPU without native bfloat16")
    add_demo_store_argument(ap)
    ap.add_argument("--only", nargs="+", choices=MODEL_NAMES, default=list(MODEL_NAMES))
    args = ap.parse_args()
    from segmentation.precision import cpu_has_bf16

    bf16 = cpu_has_bf16() and not args.no_bf16
    results = {"models": {name: measure(name, bf16) for name in args.only}, "demo": demo_records(args.demo_store),
               "bf16": bf16}
    # runtimes.json is this CPU as it is, which benchmarks/benchmark.py reads; -no-bf16 only when asked for
    write(results, bf16, "-no-bf16" if args.no_bf16 else "")
    return 0


if __name__ == "__main__":
    sys.exit(main())
