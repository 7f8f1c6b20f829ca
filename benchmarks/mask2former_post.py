"""Mask2Former's post-processing here against transformers' own, on the stored model and real photos.

    .venv/bin/python benchmarks/mask2former_post.py [--photos ../shared/cityscapes-sample/images] [--runs 5]

For each photo: one forward pass of the stored `mask2former` model (the trained demo model after `make models`),
then the median time of `semantic_maps` (what the service runs) and of the image processor's
`post_process_semantic_segmentation` on the same outputs, at the photo's size, and the share of pixels whose labels
agree. The `full` preset with random weights (the serving benchmark's) is no test of this step: it predicts one
class everywhere, so no pixel lies on a class border.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import bentoml
import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from segmentation.models.mask2former import semantic_maps  # noqa: E402
from segmentation.store import load_predictor  # noqa: E402

log = logging.getLogger("mask2former_post")


def median_ms(fn, runs: int):
    result = fn()  # warm-up, and the answer
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3, result


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--photos", type=Path, default=ROOT.parent / "shared" / "cityscapes-sample" / "images")
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    photos = sorted(args.photos.glob("*.png"))
    if not photos:
        log.error("no .png photos in %s", args.photos)
        return 2
    stored = bentoml.models.get("mask2former:latest")
    predictor = load_predictor("mask2former", Path(stored.path), stored.info.metadata)
    log.info("%s (%s), %d photos, %d threads", stored.tag, stored.info.metadata.get("preset"), len(photos),
             torch.get_num_threads())
    ours_all, theirs_all = [], []
    for path in photos:
        image = np.asarray(Image.open(path).convert("RGB"))
        size = image.shape[:2]
        class_logits, mask_logits = predictor.forward(predictor.preprocess([image]))
        outputs = SimpleNamespace(class_queries_logits=class_logits, masks_queries_logits=mask_logits)
        ours_ms, ours = median_ms(lambda: semantic_maps(class_logits, mask_logits, [size]), args.runs)
        theirs_ms, theirs = median_ms(
            lambda: predictor.processor.post_process_semantic_segmentation(outputs, target_sizes=[size]), args.runs)
        agree = float((ours[0] == theirs[0].numpy()).mean())
        log.info("%-22s %dx%d  ours %6.1f ms  transformers %6.1f ms  labels agree %.6f  classes %d", path.name,
                 size[1], size[0], ours_ms, theirs_ms, agree, len(np.unique(ours[0])))
        ours_all.append(ours_ms)
        theirs_all.append(theirs_ms)
    log.info("median over %d photos: ours %.1f ms, transformers %.1f ms", len(photos), statistics.median(ours_all),
             statistics.median(theirs_all))
    return 0


if __name__ == "__main__":
    sys.exit(main())
