"""Compiled runtimes against the native forward, on the `full` presets (the published models' compute).

    .venv/bin/python benchmarks/runtimes.py             # about 10 minutes on 2 cores
    .venv/bin/python benchmarks/runtimes.py --no-bf16   # as on a CPU without native bfloat16: fp32 paths only

Per model: the forward alone, in this process with a thread per CPU, images per second at batch sizes 1, 2, 4, 8
(best of them, median of 3 calls after a warm-up) for native fp32, native bf16 and OpenVINO f32 / bf16
(segmentation/runtimes.py converts and compiles them as an import does); the conversion time, the compiled
artifact's size and the time to compile it from disk (what a model process adds at start). Random weights make
label agreement meaningless (near-ties everywhere), so agreement and batch invariance come from the trained demo
models' import records (the store `make models` filled, --demo-store): what the import measured and chose.
Writes build/benchmark/runtimes.{json,md}.
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
    import openvino as ov

    from segmentation import runtimes
    from segmentation.scenes import generate_scene
    from segmentation.services import set_threads

    set_threads(spec(name).framework)
    loaded = spec(name).architecture.build_full()
    image, _ = generate_scene(1, 256, 512)
    precisions = ("fp32", "bf16") if bf16 else ("fp32",)
    rows = {}
    for precision in precisions:
        rows[f"native {precision}"] = best_rate(loaded.make(precision), image)
        log.info("%s native %s: %.2f img/s (batch %d)", name, precision, *rows[f"native {precision}"])
    t = time.perf_counter()
    model = runtimes.convert(loaded.make("fp32"))
    conversion = time.perf_counter() - t
    with tempfile.TemporaryDirectory() as folder:
        xml = Path(folder) / runtimes.XML
        ov.save_model(model, str(xml), compress_to_fp16=False)
        size = xml.stat().st_size + xml.with_suffix(".bin").stat().st_size
        for precision in precisions:
            t = time.perf_counter()
            compiled = runtimes.compile_model(xml, precision)
            start = time.perf_counter() - t
            predictor = runtimes.use_compiled(loaded.make("fp32"), compiled, precision)
            rows[f"openvino {precision}"] = best_rate(predictor, image)
            rows[f"openvino {precision} compile_s"] = round(start, 2)
            log.info("%s openvino %s: %.2f img/s (batch %d); compiled from disk in %.1f s", name, precision,
                     *rows[f"openvino {precision}"], start)
    return {"rates": rows, "conversion_s": round(conversion, 1), "artifact_mb": round(size / 1e6, 1)}


def write(results: dict, bf16: bool, suffix: str) -> None:
    lines = [
        "| model | native fp32 img/s | native bf16 | OpenVINO f32 | OpenVINO bf16 | chosen at import (demo) | "
        "chosen / native fp32 | agreement, batch-invariant (demo import) | conversion s | artifact MB | "
        "compile from disk s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results["models"].items():
        rates = r["rates"]
        record = results["demo"].get(name) or {}
        chosen = f"{record.get('name', '?')} {record.get('precision', '')}".strip()
        key = f"{record.get('name')} {record.get('precision')}" if record.get("name") else None
        if not bf16 and record.get("name") == "openvino":
            key, chosen = "openvino fp32", "openvino fp32 (no bf16 here)"
        elif not bf16 and record.get("name") == "native":
            key, chosen = "native fp32", "native fp32 (no bf16 here)"
        speedup = f"{rates[key][0] / rates['native fp32'][0]:.2f}x" if key in rates else "-"
        cand = next((c for c in record.get("candidates", []) if key == f"{c['runtime']} {c['precision']}"), None)
        agreement = f"{cand['agreement']:.4%}, {'yes' if cand['batch_invariant'] else 'NO'}" if cand else "-"

        def cell(k):
            return f"{rates[k][0]:.2f} (batch {rates[k][1]})" if k in rates else "-"

        compile_s = rates.get(f"{key.split(' ')[0]} {key.split(' ')[1]} compile_s", "-") if key else "-"
        lines.append(f"| {name} | {cell('native fp32')} | {cell('native bf16')} | {cell('openvino fp32')} | "
                     f"{cell('openvino bf16')} | {chosen} | {speedup} | {agreement} | {r['conversion_s']} | "
                     f"{r['artifact_mb']} | {compile_s} |")
    table = "\n".join(lines) + "\n"
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"runtimes{suffix}.md").write_text(table)
    (OUT / f"runtimes{suffix}.json").write_text(json.dumps(results, indent=1))
    log.info("\n%s", table)


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--no-bf16", action="store_true", help="fp32 paths only, as on a CPU without native bfloat16")
    ap.add_argument("--demo-store", type=Path, default=Path.home() / "bentoml")
    ap.add_argument("--only", nargs="+", choices=MODEL_NAMES, default=list(MODEL_NAMES))
    args = ap.parse_args()
    from segmentation.precision import cpu_has_bf16

    bf16 = cpu_has_bf16() and not args.no_bf16
    results = {"models": {name: measure(name, bf16) for name in args.only}, "demo": demo_records(args.demo_store),
               "bf16": bf16}
    write(results, bf16, "" if bf16 else "-no-bf16")
    return 0


if __name__ == "__main__":
    sys.exit(main())
