"""The number format of the forward pass: fp32, or bfloat16 where the CPU computes it natively and it keeps the answers.

On a CPU with AVX512_BF16 (or AMX) oneDNN runs convolutions and matrix products in bfloat16 at about twice the
fp32 rate; the label maps barely move. "Barely" is measured, per model, when it is imported: both formats run on
held-out images and bf16 is recorded as the model's precision only if at least ``AGREEMENT_FLOOR`` of the pixels
get the same label and an image's labels do not depend on its batch (the stored metadata keeps both). At serving
time a model runs in its recorded precision unless ``SEG_PRECISION=fp32|bf16`` says otherwise, and falls back to
fp32 on a CPU without native bf16, where it would be emulated and slower.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from functools import lru_cache

import numpy as np

from .settings import settings

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "bf16")
AGREEMENT_FLOOR = 0.995
_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@lru_cache(maxsize=1)
def cpu_has_bf16() -> bool:
    """True when the CPU has bfloat16 arithmetic (AVX512_BF16 or AMX-BF16), from /proc/cpuinfo."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return any(flag in flags for flag in _BF16_FLAGS)


def serving_precision(recorded: str | None) -> str:
    """The precision to serve a model in: ``SEG_PRECISION`` if set, else what its import recorded (fp32 if none);
    bf16 only on a CPU that has it."""
    wanted = settings().precision or recorded or "fp32"
    if wanted not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {wanted!r}")
    if wanted == "bf16" and not cpu_has_bf16():
        log.warning("this CPU has no native bfloat16 (AVX512_BF16/AMX); serving in fp32")
        return "fp32"
    return wanted


def label_agreement(a: Sequence[np.ndarray], b: Sequence[np.ndarray]) -> float:
    """Fraction of pixels, over all maps, where two lists of label maps agree."""
    if len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b)):
        raise ValueError("label maps to compare must come in equal numbers and shapes")
    same = sum(int(np.count_nonzero(x == y)) for x, y in zip(a, b))
    return same / max(1, sum(x.size for x in a))


def choose_precision(make_predictor: Callable[[str], object], images: Sequence[np.ndarray]) -> tuple[str, float, bool]:
    """Run a model in fp32 and bf16 on ``images`` and return (precision to record, agreement, bf16 batch-invariant).

    bf16 is chosen only if its labels agree with fp32's on at least ``AGREEMENT_FLOOR`` of the pixels *and* an
    image gets the same labels in a batch as alone (a batched answer must never differ from a lone one; bf16
    matrix kernels may block differently by batch size). ``make_predictor(precision)`` builds the predictor."""
    fp32, bf16 = make_predictor("fp32"), make_predictor("bf16")
    alone = {
        p: [predictor.predict([image]).labels[0] for image in images]
        for p, predictor in (("fp32", fp32), ("bf16", bf16))
    }
    batched = bf16.predict(list(images)).labels  # all images in one batch
    invariant = all(np.array_equal(a, b) for a, b in zip(alone["bf16"], batched))
    agreement = label_agreement(alone["fp32"], alone["bf16"])
    return ("bf16" if agreement >= AGREEMENT_FLOOR and invariant else "fp32"), agreement, invariant
