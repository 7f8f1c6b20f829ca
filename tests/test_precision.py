"""Choosing the forward pass's number format: measured agreement, batch invariance, the CPU, the override."""

import numpy as np
import pytest

from segmentation import precision as P
from segmentation.models.base import Prediction

IMAGES = [np.zeros((40, 60, 3), np.uint8) + i for i in range(4)]


class FakePredictor:
    """Labels a function of the image (and, for the flawed variants, of the precision or the batch)."""

    def __init__(self, precision, flip_fraction=0.0, batch_dependent=False):
        self.precision, self.flip, self.batch_dependent = precision, flip_fraction, batch_dependent

    def predict(self, images):
        out = []
        for img in images:
            labels = np.full(img.shape[:2], int(img[0, 0, 0]), np.uint8)
            if self.precision == "bf16":
                labels.reshape(-1)[: int(self.flip * labels.size)] += 1
                if self.batch_dependent and len(images) > 1:
                    labels[0, 0] += 1
            out.append(labels)
        return Prediction(out)


def test_agreement_counts_pixels_over_all_maps():
    a = [np.zeros((10, 10), np.uint8), np.zeros((5, 2), np.uint8)]
    b = [a[0].copy(), a[1].copy()]
    b[0][0, :3] = 1
    assert P.label_agreement(a, b) == pytest.approx(107 / 110)
    with pytest.raises(ValueError):
        P.label_agreement(a, b[:1])


@pytest.mark.parametrize(
    "flip, batch_dependent, chosen",
    [(0.0, False, "bf16"), (0.004, False, "bf16"), (0.006, False, "fp32"), (0.0, True, "fp32")],
)
def test_bf16_is_chosen_only_where_it_keeps_the_answers(flip, batch_dependent, chosen):
    precision, agreement, invariant = P.choose_precision(lambda p: FakePredictor(p, flip, batch_dependent), IMAGES)
    assert precision == chosen
    assert agreement == pytest.approx(1 - int(flip * 2400) / 2400)
    assert invariant is not batch_dependent


def test_serving_precision_follows_the_record_the_override_and_the_cpu(monkeypatch):
    monkeypatch.delenv("SEG_PRECISION", raising=False)
    monkeypatch.setattr(P, "cpu_has_bf16", lambda: True)
    assert P.serving_precision("bf16") == "bf16"
    assert P.serving_precision(None) == "fp32"  # entries imported before precision was recorded
    monkeypatch.setenv("SEG_PRECISION", "fp32")
    assert P.serving_precision("bf16") == "fp32"
    monkeypatch.setenv("SEG_PRECISION", "bf16")
    monkeypatch.setattr(P, "cpu_has_bf16", lambda: False)
    assert P.serving_precision("fp32") == "fp32"  # emulated bf16 would be slower: never on such a CPU
    monkeypatch.setenv("SEG_PRECISION", "fp16")
    with pytest.raises(ValueError, match="SEG_PRECISION=.fp16.: input should be .fp32. or .bf16."):
        P.serving_precision("bf16")
