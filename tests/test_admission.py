"""Admission at arrival (segmentation/admission.py): which calls the gateway lets through to a model, and what it
tells the ones it refuses. No model or server needed; the HTTP behaviour is in test_robustness.py."""

from __future__ import annotations

import pytest

from segmentation import runtimes
from segmentation.admission import ModelQueue


def test_calls_that_would_finish_within_the_bound_are_taken_and_the_next_is_refused():
    queue = ModelQueue(bound_s=10.0, seconds_per_image=2.0)
    assert all(queue.admit(1) is None for _ in range(5))  # the fifth finishes at 10 s: on the bound
    refusal = queue.admit(1)
    assert refusal is not None and queue.images == 5  # a refused call takes no place in the queue
    assert (refusal.ahead, refusal.finish_s, refusal.retry_after_s) == (5, 12.0, 2)
    queue.done(1)
    assert queue.admit(1) is None  # one answered: room for one more


def test_a_call_with_nothing_ahead_is_taken_however_long_it_takes():
    queue = ModelQueue(bound_s=1.0, seconds_per_image=5.0)
    assert queue.admit(16) is None  # a batch of 16, 80 s of work: refusing it would refuse it forever
    assert queue.admit(1) is not None


def test_without_an_estimate_every_call_is_taken():
    queue = ModelQueue(bound_s=0.001)
    assert all(queue.admit(1) is None for _ in range(20))
    assert queue.images == 20


def test_workers_share_the_queue():
    one, two = ModelQueue(10.0, 1, 2.0), ModelQueue(10.0, 2, 2.0)
    assert sum(one.admit(1) is None for _ in range(20)) == 5
    assert sum(two.admit(1) is None for _ in range(20)) == 10


def test_the_time_per_image_follows_the_answers():
    queue = ModelQueue(bound_s=10.0, seconds_per_image=0.01)  # the import measured a faster CPU
    queue.learn(batch_ms=8000.0, batch_size=4)  # 2 s an image here
    first = queue.seconds_per_image
    assert 0.01 < first < 2.0
    for _ in range(20):
        queue.learn(batch_ms=8000.0, batch_size=4)
    assert queue.seconds_per_image == pytest.approx(2.0, rel=0.01)
    queue.learn(batch_ms=0.0, batch_size=0)  # an answer without timings changes nothing
    assert queue.seconds_per_image == pytest.approx(2.0, rel=0.01)


def test_the_retry_after_is_when_the_work_ahead_would_fit():
    queue = ModelQueue(bound_s=30.0, seconds_per_image=4.2)
    while queue.admit(1) is None:
        pass
    refusal = queue.admit(1)
    # 7 ahead + this one = 33.6 s of work, 3.6 s past the bound: retry in 4 s, never 0
    assert (refusal.ahead, refusal.retry_after_s) == (7, 4)
    assert ModelQueue(1.0, 1, 1.0, images=1).admit(1).retry_after_s == 1


def test_the_first_estimate_is_the_import_measurement_of_the_served_runtime(monkeypatch):
    metadata = {"precision": "fp32", "runtime": {"name": "openvino", "precision": "fp32", "candidates": [
        {"runtime": "native", "precision": "fp32", "ms_per_image": 60.0},
        {"runtime": "openvino", "precision": "fp32", "ms_per_image": 40.0},
    ]}}
    assert runtimes.measured_seconds_per_image(metadata) == pytest.approx(0.04)
    monkeypatch.setenv("SEG_RUNTIME", "native")
    assert runtimes.measured_seconds_per_image(metadata) == pytest.approx(0.06)
    assert runtimes.measured_seconds_per_image({"precision": "fp32"}) is None  # imported before the race
