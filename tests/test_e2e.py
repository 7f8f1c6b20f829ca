"""End to end: the real `bentoml serve` process, called over HTTP and through BentoML's Python clients."""

from __future__ import annotations

import asyncio
import io
import re

import numpy as np
import pytest
import requests
from PIL import Image

from conftest import ROOT
from segmentation.classes import PALETTE, label_ids_to_superclasses
from segmentation.render import render_overlay
from segmentation.samples import Samples
from segmentation import MODEL_NAMES

MODELS = MODEL_NAMES
SAMPLE = ROOT / "data" / "images" / "scene_903.png"


@pytest.fixture(scope="module")
def client(server):
    import bentoml

    with bentoml.SyncHTTPClient(server, timeout=120) as c:
        yield c


# --- every API through the Python client ------------------------------------------------------------------------

@pytest.mark.parametrize("model", MODELS)
def test_segment_outputs_at_the_input_size(client, model):
    size = Image.open(SAMPLE).size
    overlay = client.segment(image=SAMPLE, model=model, output="overlay")
    color = client.segment(image=SAMPLE, model=model, output="color")
    mask = client.segment(image=SAMPLE, model=model, output="mask")
    for img in (overlay, color, mask):
        assert img.size == size
    assert overlay.mode == "RGB" and color.mode == "RGB" and mask.mode == "L"
    ids = np.asarray(mask)
    assert ids.max() <= (1 if model == "unet" else 7)
    if model != "unet":  # the colour map is the palette looked up at the mask's ids
        assert np.array_equal(np.asarray(color), PALETTE[ids])
        photo = np.asarray(Image.open(SAMPLE).convert("RGB"))
        assert np.array_equal(np.asarray(overlay), render_overlay(photo, ids, 0.5))
    else:
        assert set(np.unique(ids)) == {0, 1}  # the demo scene has cars


def test_client_file_arguments_the_readme_documents(client):
    """A pathlib.Path, a str path, or a PIL image opened from a file work; an open file object does not (1.4.39)."""
    a = client.segment(image=SAMPLE, model="unet", output="mask")
    b = client.segment(image=str(SAMPLE), model="unet", output="mask")
    c = client.segment(image=Image.open(SAMPLE), model="unet", output="mask")
    assert np.array_equal(np.asarray(a), np.asarray(b)) and np.array_equal(np.asarray(a), np.asarray(c))
    with SAMPLE.open("rb") as fh, pytest.raises(AssertionError):
        client.segment(image=fh, model="unet", output="mask")


def test_segment_by_id_matches_segment_of_the_same_file(client):
    a = client.segment_by_id(image_id="scene_903", model="dilatednet", output="mask")
    b = client.segment(image=SAMPLE, model="dilatednet", output="mask")
    assert np.array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("fmt,pil", [("jpeg", "JPEG"), ("webp", "WEBP")])
def test_compressed_overlay_formats(server, fmt, pil):
    with SAMPLE.open("rb") as fh:
        r = requests.post(f"{server}/segment", files={"image": fh}, data={"model": "unet", "format": fmt}, timeout=60)
    assert r.status_code == 200 and r.headers["content-type"] == f"image/{fmt}"
    assert Image.open(io.BytesIO(r.content)).format == pil


def test_analyze_reports_fractions_and_timings(client):
    report = client.analyze(image=SAMPLE, model="mask2former")
    assert (report["width"], report["height"]) == Image.open(SAMPLE).size
    assert report["model"] == "mask2former" and report["tag"].startswith("mask2former:")
    assert [c["name"] for c in report["classes"]][:2] == ["void", "flat"]
    assert sum(c["fraction"] for c in report["classes"]) == pytest.approx(1.0, abs=1e-4)
    assert {"decode", "preprocess", "inference", "postprocess", "total"} <= set(report["timings_ms"])
    assert report["batch_size"] >= 1


def test_segment_reports_its_stages_in_server_timing(server):
    with open(SAMPLE, "rb") as f:
        r = requests.post(f"{server}/segment", files={"image": f}, data={"model": "unet", "output": "mask"}, timeout=60)
    assert r.status_code == 200
    stages = dict(part.strip().split(";dur=") for part in r.headers["Server-Timing"].split(","))
    assert list(stages) == ["decode", "preprocess", "inference", "postprocess", "queue", "render"]
    assert all(float(ms) >= 0 for ms in stages.values()) and float(stages["inference"]) > 0
    by_id = requests.post(f"{server}/segment_by_id", json={"image_id": SAMPLE.stem, "model": "unet"}, timeout=60)
    assert "decode" not in by_id.headers["Server-Timing"] and "inference" in by_id.headers["Server-Timing"]


def test_evaluate_against_ground_truth(client):
    report = client.evaluate(image_id="scene_903", model="dilatednet")
    assert report["mean_iou"] > 0.5 and report["pixel_accuracy"] > 0.8  # a trained demo model on a demo scene
    sky = next(c for c in report["classes"] if c["name"] == "sky")
    assert sky["iou"] > 0.8 and sky["dice"] >= sky["iou"]
    unet = client.evaluate(image_id="scene_903", model="unet")
    assert [c["name"] for c in unet["classes"]] == ["background", "vehicle"]


def test_models_and_legend(client):
    models = {m["name"]: m for m in client.models()}
    assert set(models) == {*MODELS, "ensemble"}
    assert models.pop("ensemble")["members"] == {m: models[m]["tag"] for m in ("dilatednet", "mask2former")}
    for m in models.values():
        assert m["demo"] is True and m["tag"].startswith(m["name"] + ":") and m["input_size"]
        # the runtime the model's process runs, as its import chose it, with why and what was measured
        runtime = m["runtime"]
        assert runtime["name"] == runtime["chosen_at_import"] and runtime["precision"] == m["precision"], runtime
        assert runtime["reason"] and {"native", "openvino"} <= {c["runtime"] for c in runtime["candidates"]}
        # what the gateway admits: the bound, and the time per image it has learned (the import's before an answer)
        queue = m["queue"]
        assert queue["latency_bound_s"] > 0 and queue["seconds_per_image"] > 0 and queue["images_in_flight"] == 0
    assert models["dilatednet"]["metrics"]["mean_iou"] >= 0.6
    assert models["unet"]["classes"] == ["background", "vehicle"]
    assert [c["name"] for c in client.legend()["classes"]] == list(models["mask2former"]["classes"])
    assert client.legend(model="unet")["classes"][1]["color"] == [255, 0, 0]


def test_sample_routes(server):
    ids = requests.get(f"{server}/images", timeout=10).json()["ids"]
    assert ids == Samples().ids()
    r = requests.get(f"{server}/images/{ids[0]}", timeout=10)
    assert r.headers["content-type"] == "image/png"
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(r.content))), Samples().image(ids[0]))
    gt = requests.get(f"{server}/images/{ids[0]}/mask", timeout=10)
    expected = render_overlay(Samples().image(ids[0]), label_ids_to_superclasses(Samples().label_ids(ids[0])))
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(gt.content))), expected)


# --- errors --------------------------------------------------------------------------------------------------

def _post(server, route, files=None, **data):
    if files is None:
        return requests.post(f"{server}/{route}", json=data, timeout=30)
    return requests.post(f"{server}/{route}", files=files, data=data, timeout=30)


@pytest.mark.parametrize(
    "body,expect",
    [(b"this is not an image", "not a decodable image"), (b"", "empty"), (SAMPLE.read_bytes()[:5000], "truncated")],
)
def test_bad_uploads_are_400_with_a_reason_and_no_server_path(server, body, expect):
    r = _post(server, "segment", files={"image": ("x.png", body, "image/png")})
    assert r.status_code == 400, r.text
    assert expect in r.text and "/tmp" not in r.text and str(ROOT) not in r.text


@pytest.mark.parametrize(
    "data,expect",
    [
        ({"model": "yolo"}, "'dilatednet', 'mask2former', 'unet' or 'ensemble'"),
        ({"output": "heatmap"}, "'overlay', 'color' or 'mask'"),
        ({"alpha": "1.5"}, "less than or equal to 1"),
        ({"alpha": "-0.1"}, "greater than or equal to 0"),
        ({"alpha": "half"}, "valid number"),
        ({"format": "gif"}, "'png', 'jpeg' or 'webp'"),
        ({"output": "mask", "format": "jpeg"}, "lossless"),
    ],
)
def test_bad_parameters_are_400_listing_what_is_valid(server, data, expect):
    with SAMPLE.open("rb") as fh:
        r = _post(server, "segment", files={"image": fh}, **data)
    assert r.status_code == 400 and expect in r.text, r.text


def test_missing_image_field_is_400(server):
    r = _post(server, "segment", files={"other": ("x", b"")}, model="unet")
    assert r.status_code == 400


@pytest.mark.parametrize(
    "image_id",
    ["nope", "../service", "/etc/passwd", "..%2F..%2Fservice.py", "%252e%252e%252fservice", "scene_903/../x"],
)
def test_unknown_or_escaping_ids_are_404_and_read_nothing(server, image_id):
    r = _post(server, "segment_by_id", image_id=image_id, model="unet")
    assert r.status_code == 404, r.text
    assert "root:" not in r.text
    r = _post(server, "evaluate", image_id=image_id, model="unet")
    assert r.status_code == 404


@pytest.mark.parametrize(
    "path",
    [
        "/images/nope",
        "/images/..%2Fservice.py",
        "/images/%2e%2e/service.py",
        "/images/..%252Fservice.py/mask",
        "/images/nope/mask",
    ],
)
def test_get_routes_never_leave_data(server, path):
    r = requests.get(server + path, timeout=10)
    assert r.status_code == 404 and b"import" not in r.content


# --- concurrency: batches form, and a batched answer equals the lone one -----------------------------------------


def _batch_counts(metrics: str, service: str) -> dict[float, float]:
    """Cumulative histogram buckets of bentoml_service_adaptive_batch_size for one model service."""
    out = {}
    for line in metrics.splitlines():
        if line.startswith("bentoml_service_adaptive_batch_size_bucket") and f'service_name="{service}"' in line:
            le = float(re.search(r'le="([^"]+)"', line).group(1))
            out[le] = out.get(le, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


@pytest.mark.parametrize("model", MODELS)
def test_sixteen_concurrent_calls_form_batches_and_match_lone_calls(server, client, model):
    import bentoml

    samples = Samples()
    inputs = [samples.image_path(i) for i in samples.ids()]
    inputs = (inputs * 3)[:16]
    lone = [np.asarray(client.segment(image=p, model=model, output="mask")) for p in inputs[:6]]

    async def burst():
        async with bentoml.AsyncHTTPClient(server, timeout=300) as ac:
            # PIL images, not paths: the client closes every path-opened file when any call ends (see README)
            return await asyncio.gather(*(ac.segment(image=Image.open(p), model=model, output="mask") for p in inputs))

    before = _batch_counts(requests.get(f"{server}/metrics", timeout=10).text, f"{model}_model")
    results = asyncio.run(burst())
    after = _batch_counts(requests.get(f"{server}/metrics", timeout=10).text, f"{model}_model")
    assert len(results) == 16
    for i, img in enumerate(results):
        assert np.array_equal(np.asarray(img), lone[i % 6]), f"request {i} differs from the same image sent alone"
    batches_of_one = after.get(1.0, 0) - before.get(1.0, 0)
    batches = after[float("inf")] - before.get(float("inf"), 0)
    assert batches < 16 and batches > batches_of_one, f"no batch larger than 1 formed ({batches} batches)"


# --- the real photos ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", MODELS)
def test_real_2048x1024_photos(client, cityscapes, model):
    photo = sorted((cityscapes / "images").glob("*.png"))[0]
    mask = client.segment(image=photo, model=model, output="mask")
    assert mask.size == (2048, 1024)
    overlay = client.segment(image=photo, model=model, output="overlay", format="jpeg")
    assert overlay.size == (2048, 1024)


@pytest.mark.parametrize("model", MODELS)
def test_served_photo_labels_equal_the_in_process_pipeline(client, cityscapes, model):
    """The gateway resizes DilatedNet's and UNet's inputs and labels itself (service.py); the answer must be the
    one the predictor gives for the full photo in one process."""
    import bentoml

    from segmentation.store import load_predictor

    photo = sorted((cityscapes / "images").glob("*.png"))[1]
    stored = bentoml.models.get(f"{model}:latest")
    predictor = load_predictor(model, stored.path, dict(stored.info.metadata))
    expected = predictor.predict([np.asarray(Image.open(photo).convert("RGB"))]).labels[0]
    served = np.asarray(client.segment(image=photo, model=model, output="mask"))
    assert served.shape == expected.shape == (1024, 2048)
    assert np.array_equal(served, expected)
