"""Masks as data over HTTP: segment_json, segment_batch, evaluate with an upload, Label Studio's /predict.

Every encoding is read back with the tool it is for (pycocotools, a polygon rasteriser, a PNG reader, Label
Studio's own decoder) and compared with the mask ``/segment output=mask`` serves.
"""

from __future__ import annotations

import base64
import io
import logging

import numpy as np
import pytest
import requests
from label_studio_sdk.converter.brush import decode_rle
from PIL import Image
from pycocotools import mask as coco_mask

from conftest import ROOT, served_mask
from segmentation import MODEL_NAMES
from segmentation.encodings import rasterise

log = logging.getLogger(__name__)
SAMPLES = sorted((ROOT / "data" / "images").glob("*.png"))
MASKS = ROOT / "data" / "masks"


def segment_json(server, path, model, **params) -> dict:
    r = requests.post(
        f"{server}/segment_json", files={"image": (path.name, path.read_bytes())}, data={"model": model, **params},
        timeout=120,
    )
    assert r.status_code == 200, r.text
    return r.json()


def from_rle(answer: dict) -> np.ndarray:
    labels = np.full((answer["height"], answer["width"]), 255, np.uint8)
    for c in answer["classes"]:
        binary = coco_mask.decode({"size": c["rle"]["size"], "counts": c["rle"]["counts"].encode()}).astype(bool)
        assert not np.any(binary & (labels != 255)), "classes overlap"
        labels[binary] = c["id"]
    return labels


@pytest.mark.parametrize("model", MODEL_NAMES)
def test_rle_answer_is_the_served_mask_bit_for_bit(server, model):
    path = SAMPLES[0]
    answer = segment_json(server, path, model)
    mask = served_mask(server, path, model)
    assert (answer["width"], answer["height"], answer["model"]) == (mask.shape[1], mask.shape[0], model)
    assert answer["tag"].startswith(f"{model}:") and answer["encoding"] == "rle"
    assert np.array_equal(from_rle(answer), mask)
    for c in answer["classes"]:
        assert c["pixels"] == int((mask == c["id"]).sum()) and len(c["color"]) == 3


def test_a_photo_as_rle_polygons_and_png(server, cityscapes):
    photo = sorted(cityscapes.glob("images/*.png"))[0]
    mask = served_mask(server, photo, "mask2former")
    rle = segment_json(server, photo, "mask2former", encoding="rle")
    assert np.array_equal(from_rle(rle), mask)
    png = segment_json(server, photo, "mask2former", encoding="png")
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(base64.b64decode(png["mask_png"])))), mask)
    polygons = segment_json(server, photo, "mask2former", encoding="polygons")
    for c in polygons["classes"]:
        binary = mask == c["id"]
        covered = (rasterise(c["polygons"], mask.shape) & binary).sum() / binary.sum()
        assert covered >= 0.99, (c["name"], covered)
    rough = segment_json(server, photo, "mask2former", encoding="polygons", tolerance=2)
    count = lambda a: sum(len(s["outer"]) for c in a["classes"] for s in c["polygons"])  # noqa: E731
    assert count(rough) < count(polygons)
    sizes = {name: len(r.encode()) for name, r in (("rle", str(rle)), ("polygons", str(polygons)))}
    log.info("2048x1024 answer sizes (bytes): %s, png %d", sizes, len(base64.b64decode(png["mask_png"])))


@pytest.mark.parametrize("params, message", [({"encoding": "svg"}, "encoding"), ({"tolerance": -1}, "tolerance")])
def test_bad_parameters_are_400(server, params, message):
    r = requests.post(
        f"{server}/segment_json", files={"image": ("a.png", SAMPLES[0].read_bytes())}, data=params, timeout=30
    )
    assert r.status_code == 400 and message in r.text


# --- many images in one call ---------------------------------------------------------------------------------

def test_a_batch_of_sixteen_equals_sixteen_single_calls(server, cityscapes):
    photos = sorted(cityscapes.glob("images/*.png"))
    paths = (SAMPLES + photos)[:16]
    files = [("images", (p.name, p.read_bytes())) for p in paths]
    r = requests.post(f"{server}/segment_batch", files=files, data={"model": "dilatednet"}, timeout=300)
    assert r.status_code == 200, r.text
    entries = r.json()
    expected = [(i, p.name, 200) for i, p in enumerate(paths)]
    assert [(e["index"], e["filename"], e["status"]) for e in entries] == expected
    for entry, path in zip(entries, paths):
        single = segment_json(server, path, "dilatednet")
        assert {k: v for k, v in entry.items() if k not in ("index", "filename", "status")} == single


def test_a_corrupt_image_gets_its_own_error_and_the_others_are_answered(server):
    good = SAMPLES[1].read_bytes()
    files = [("images", ("a.png", good)), ("images", ("broken.png", good[:3000])), ("images", ("c.png", good))]
    r = requests.post(f"{server}/segment_batch", files=files, data={"model": "unet", "encoding": "png"}, timeout=120)
    assert r.status_code == 200, r.text
    a, broken, c = r.json()
    assert (a["status"], c["status"]) == (200, 200) and a["mask_png"] == c["mask_png"]
    assert broken["status"] == 400 and "truncated" in broken["error"] and "classes" not in broken


def test_too_many_images_or_none_is_400(server):
    files = [("images", ("a.png", SAMPLES[0].read_bytes()))] * 17
    r = requests.post(f"{server}/segment_batch", files=files, timeout=60)
    assert r.status_code == 400 and "at most 16" in r.text and "SEG_MAX_BATCH_IMAGES" in r.text
    r = requests.post(f"{server}/segment_batch", files=[("model", (None, "unet"))], timeout=60)
    assert r.status_code == 400


# --- evaluate an upload against its own ground truth ------------------------------------------------------------

@pytest.mark.parametrize("model", ["dilatednet", "unet"])
def test_evaluating_an_upload_equals_evaluating_the_sample(server, model):
    path = SAMPLES[3]
    by_id = requests.post(f"{server}/evaluate", json={"image_id": path.stem, "model": model}, timeout=60).json()
    r = requests.post(
        f"{server}/evaluate",
        files={"image": (path.name, path.read_bytes()), "mask": ("truth.png", (MASKS / path.name).read_bytes())},
        data={"model": model, "mask_kind": "label_ids"},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    upload = r.json()
    assert upload["image_id"] is None and by_id["image_id"] == path.stem
    assert {k: v for k, v in upload.items() if k != "image_id"} == {k: v for k, v in by_id.items() if k != "image_id"}
    assert upload["mean_iou"] is not None


def test_evaluate_through_the_python_client(server):
    import bentoml

    path = SAMPLES[2]
    with bentoml.SyncHTTPClient(server, timeout=120) as client:
        by_id = client.evaluate(image_id=path.stem, model="dilatednet")
        upload = client.evaluate(image=[path], mask=[MASKS / path.name], model="dilatednet")
    assert upload["mean_iou"] == by_id["mean_iou"] and upload["classes"] == by_id["classes"]


@pytest.mark.parametrize(
    "files, data, message",
    [
        ({"image": SAMPLES[0]}, {}, "send it as 'mask'"),
        ({"image": SAMPLES[0], "mask": SAMPLES[0]}, {}, "mode RGB"),
        ({"image": SAMPLES[0], "mask": MASKS / SAMPLES[0].name}, {"mask_kind": "superclasses"}, "superclass ids"),
        ({"image": SAMPLES[0], "mask": MASKS / SAMPLES[0].name}, {"image_id": "scene_900"}, "not both"),
        ({}, {}, "either image_id"),
    ],
)
def test_a_bad_evaluation_upload_is_a_400_that_says_why(server, files, data, message):
    parts = {k: (p.name, p.read_bytes()) for k, p in files.items()} or {"model": (None, "unet")}
    r = requests.post(f"{server}/evaluate", files=parts, data=data, timeout=60)
    assert r.status_code == 400 and message in r.text, r.text


def test_a_mask_of_another_size_is_refused(server, cityscapes):
    photo = sorted(cityscapes.glob("images/*.png"))[0]
    r = requests.post(
        f"{server}/evaluate",
        files={"image": (photo.name, photo.read_bytes()), "mask": ("m.png", (MASKS / SAMPLES[0].name).read_bytes())},
        data={"model": "unet"},
        timeout=60,
    )
    assert r.status_code == 400 and "same size" in r.text


# --- Label Studio ----------------------------------------------------------------------------------------------

CONFIG = """<View><Image name="image" value="$image"/>
<BrushLabels name="tag" toName="image"><Label value="Road" predicted_values="flat"/><Label value="Sky"/>
<Label value="Car" predicted_values="vehicle"/><Label value="Building" predicted_values="construction"/></BrushLabels>
</View>"""
LABELS = {"Road": 1, "Sky": 5, "Car": 7, "Building": 2}


def test_label_studio_health_and_setup(server):
    assert requests.get(f"{server}/label-studio/health", timeout=10).json()["status"] == "UP"
    setup = requests.post(f"{server}/label-studio/dilatednet/setup", json={"project": "1.1"}, timeout=10).json()
    assert setup["model_version"].startswith("dilatednet:")
    assert requests.get(f"{server}/label-studio/nope/health", timeout=10).status_code == 404


def test_label_studio_predictions_decode_to_the_served_mask(server):
    path = SAMPLES[2]
    data_url = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()
    tasks = [
        {"id": 1, "data": {"image": path.stem}},
        {"id": 2, "data": {"image": data_url}},
        {"id": 3, "data": {"image": "http://169.254.169.254/latest/meta-data/x.png"}},
        {"id": 4, "data": {"image": "data:image/png;base64," + base64.b64encode(b"not a png").decode()}},
    ]
    r = requests.post(
        f"{server}/label-studio/dilatednet/predict", json={"tasks": tasks, "label_config": CONFIG}, timeout=120
    )
    assert r.status_code == 200, r.text
    by_id, by_data, fetched, garbage = r.json()["results"]
    mask = served_mask(server, path, "dilatednet")
    assert by_id["result"] and by_id == by_data
    for result in by_id["result"]:
        assert (result["original_width"], result["original_height"]) == (mask.shape[1], mask.shape[0])
        (label,) = result["value"]["brushlabels"]
        decoded = decode_rle(result["value"]["rle"]).reshape(*mask.shape, 4)[:, :, 3]
        assert np.array_equal(decoded, (mask == LABELS[label]).astype(np.uint8) * 255), label
    assert {x["value"]["brushlabels"][0] for x in by_id["result"]} == {
        name for name, i in LABELS.items() if (mask == i).any()
    }
    assert fetched["result"] == [] and fetched["status"] == 403 and "SEG_IMAGE_URL_HOSTS" in fetched["error"]
    assert garbage["result"] == [] and garbage["status"] == 400


@pytest.mark.parametrize(
    "body, message",
    [
        ({"tasks": [], "label_config": CONFIG}, "at least one task"),
        ({"tasks": [{"data": {"image": "scene_900"}}]}, "label_config"),
        ({"tasks": [{"data": {"image": "scene_900"}}] * 17, "label_config": CONFIG}, "at most 16"),
        ({"tasks": [{"data": {}}], "label_config": CONFIG.replace("Brush", "Rectangle")}, "BrushLabels"),
    ],
)
def test_a_label_studio_request_this_service_cannot_answer_is_400(server, body, message):
    r = requests.post(f"{server}/label-studio/predict", json=body, timeout=30)
    assert r.status_code == 400 and message in r.json()["error"]
