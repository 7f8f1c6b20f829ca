"""The folder job (``python -m segmentation.jobs``) against the running server: outputs, scores, resuming."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import requests
from PIL import Image

from conftest import ROOT

JOB = [sys.executable, "-m", "segmentation.jobs"]


def run_job(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([*JOB, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_a_job_over_the_samples_scores_as_evaluate_does(server, tmp_path):
    out = tmp_path / "out"
    done = run_job(server, "--model", "dilatednet", "--input", "data/images", "--output", str(out),
                   "--truth", "data/masks", "--workers", "3", "--overlays")
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    ids = sorted(p.stem for p in (ROOT / "data" / "images").glob("*.png"))
    assert report["recorded"] == report["images"] == len(ids) and not report["failed"]
    assert [r["image"] for r in report["per_image"]] == [f"{i}.png" for i in ids]
    for record in report["per_image"]:
        image_id = record["image"].removesuffix(".png")
        evaluation = requests.post(
            f"{server}/evaluate", json={"image_id": image_id, "model": "dilatednet"}, timeout=60
        ).json()
        assert record["mean_iou"] == evaluation["mean_iou"]
        assert record["iou"] == {c["name"]: c["iou"] for c in evaluation["classes"]}
        mask = np.asarray(Image.open(out / "masks" / record["image"]))
        upload = (ROOT / "data" / "images" / record["image"]).read_bytes()
        served = requests.post(
            f"{server}/segment", files={"image": (record["image"], upload)},
            data={"model": "dilatednet", "output": "mask"}, timeout=60,
        )
        assert np.array_equal(mask, np.asarray(Image.open(io.BytesIO(served.content))))
        assert Image.open(out / "overlays" / record["image"]).size == mask.shape[::-1]
    assert 0 < report["mean_iou"] <= 1 and report["iou"]["void"] is None
    rows = (out / "report.csv").read_text().splitlines()
    assert rows[0].startswith("image,width,height,ms,mean_iou") and len(rows) == len(ids) + 1


def test_an_interrupted_job_resumes_where_it_stopped(server, cityscapes, tmp_path):
    photos = sorted(cityscapes.glob("images/*.png"))
    images, truth, out = tmp_path / "images", tmp_path / "truth", tmp_path / "out"
    images.mkdir()
    truth.mkdir()
    for p in photos:
        shutil.copy(p, images / p.name)
        shutil.copy(cityscapes / "masks" / p.name, truth / p.name)
    args = ["--model", "mask2former", "--input", str(images), "--output", str(out), "--truth", str(truth)]
    proc = subprocess.Popen([*JOB, server, *args, "--workers", "1"], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and len(list((out / "records").glob("*.json"))) < 2:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # not SIGINT: a shell's background jobs (as CI may run) ignore it
    assert proc.wait(timeout=60) == 143
    first = {p.name for p in (out / "records").glob("*.json")}
    assert 2 <= len(first) < len(photos), "the job was not interrupted part-way"
    assert not list(out.rglob("*.partial")), "an interrupted write was left behind"
    before = {name: (out / "records" / name).stat().st_mtime_ns for name in first}

    resumed = run_job(server, *args, "--workers", "2")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"{len(photos) - len(first)} to do ({len(first)} done before)" in resumed.stderr
    assert all((out / "records" / name).stat().st_mtime_ns == t for name, t in before.items())  # not sent again
    report = json.loads((out / "report.json").read_text())
    assert report["recorded"] == len(photos) and report["sent_this_run"] == len(photos) - len(first)
    assert report["scored_images"] == len(photos) and report["truth_kind"] == "label_ids"


def test_a_job_reports_a_broken_image_and_goes_on(server, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(ROOT / "data" / "images" / "scene_900.png", images / "good.png")
    (images / "broken.png").write_bytes((ROOT / "data" / "images" / "scene_901.png").read_bytes()[:2000])
    done = run_job(server, "--model", "unet", "--input", str(images), "--output", str(tmp_path / "out"))
    assert done.returncode == 1
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["recorded"] == 1 and "truncated" in report["failed"]["broken.png"]


def test_a_job_for_a_model_the_server_lacks_stops_with_a_message(server, tmp_path):
    done = run_job(server, "--model", "nope", "--input", "data/images", "--output", str(tmp_path / "out"))
    assert done.returncode == 2 and "has no model 'nope'" in done.stderr
    assert not os.path.exists(tmp_path / "out" / "masks")


def test_a_job_waits_as_long_as_a_busy_model_asks_before_trying_again(monkeypatch):
    import asyncio

    from bentoml.exceptions import BentoMLException
    from tenacity import RetryCallState

    from segmentation import jobs, services
    from segmentation.admission import ModelQueue

    # the gateway's own refusal: 3 images ahead and this one at 4 s each, 16 s of work, 11 s past a 5 s bound
    monkeypatch.setitem(services._QUEUES, "unet", ModelQueue(bound_s=5.0, seconds_per_image=4.0, images=3))
    try:
        asyncio.run(services.call_model(object(), ["image"], "unet"))
    except services.ModelUnavailable as e:
        refusal = e
    # what BentoML's client raises for that answer: its status and text, without the headers
    error = BentoMLException(f"Error making request: 503: {json.dumps({'error': str(refusal)})}", error_code=503)

    def waited(e: BaseException) -> float:
        state = RetryCallState(None, None, (), {})
        state.set_exception((type(e), e, None))
        return jobs._wait(state)

    assert jobs._retried(error)
    assert refusal.retry_after_s <= waited(error) <= refusal.retry_after_s + 1 and refusal.retry_after_s == 11
    assert waited(BentoMLException("Error making request: 429: too many", error_code=429)) <= 10  # back-off
