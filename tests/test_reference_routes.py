"""The reference API's routes, over HTTP, with the reference's request and response shapes."""

import io

import numpy as np
import pytest
import requests
from PIL import Image

from conftest import ROOT
from segmentation.classes import CLASS_NAMES
from segmentation.samples import Samples

SAMPLE = ROOT / "data" / "images" / "scene_902.png"


def test_listing_images_masks_legend_and_models(server):
    assert requests.get(f"{server}/list_images/", timeout=10).json() == {"ids": Samples().ids()}
    img = requests.get(f"{server}/list_images/scene_902", timeout=10)
    assert img.headers["content-type"] == "image/png" and img.content == SAMPLE.read_bytes()
    gt = requests.get(f"{server}/get_mask/scene_902", timeout=10)
    assert gt.status_code == 200 and gt.content == requests.get(f"{server}/images/scene_902/mask", timeout=10).content
    legend = requests.get(f"{server}/legend_data/", timeout=10).json()["legend"]
    assert [e["name"] for e in legend] == list(CLASS_NAMES) and legend[1]["color"] == [128, 64, 128]
    assert requests.get(f"{server}/available_models/", timeout=10).json() == {
        "models": ["dilatednet", "mask2former", "unet", "ensemble"]
    }


@pytest.mark.parametrize("model", ["dilatednet", "mask2former", "DilatedNet"])
def test_predict_from_file_and_from_id_return_the_overlay(server, model):
    with SAMPLE.open("rb") as fh:
        r = requests.post(f"{server}/predict_from_file/", files={"file": fh}, data={"model_name": model}, timeout=60)
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    by_id = requests.post(f"{server}/predict_from_id/", json={"image_id": "scene_902", "model_name": model}, timeout=60)
    assert by_id.status_code == 200 and by_id.content == r.content
    with SAMPLE.open("rb") as fh:
        new = requests.post(f"{server}/segment", files={"image": fh}, data={"model": model.lower()}, timeout=60)
    assert r.content == new.content  # the same overlay as the new API
    assert Image.open(io.BytesIO(r.content)).size == Image.open(SAMPLE).size


def test_unet_reference_predict_is_the_red_overlay(server):
    with SAMPLE.open("rb") as fh:
        r = requests.post(f"{server}/predict", files={"file": fh}, timeout=60)
    assert r.status_code == 200
    out = np.asarray(Image.open(io.BytesIO(r.content)).convert("RGB")).astype(int)
    photo = np.asarray(Image.open(SAMPLE).convert("RGB")).astype(int)
    changed = np.any(out != photo, axis=2)
    assert changed.any() and (out[changed][:, 0] >= photo[changed][:, 0]).all()  # tinted towards red only


@pytest.mark.parametrize(
    "kwargs,status,expect",
    [
        (dict(files={"file": ("x.png", b"nope")}, data={"model_name": "unet"}), 400, "not a decodable image"),
        (
            dict(files={"file": ("x.png", SAMPLE.read_bytes())}, data={"model_name": "yolo"}),
            400,
            "available: dilatednet",
        ),
        (dict(data={"model_name": "unet"}), 400, "file"),
    ],
)
def test_predict_from_file_errors_are_4xx_with_detail(server, kwargs, status, expect):
    r = requests.post(f"{server}/predict_from_file/", timeout=30, **kwargs)
    assert r.status_code == status and expect in r.json()["detail"]


@pytest.mark.parametrize(
    "body,status",
    [
        ({"image_id": "nope", "model_name": "unet"}, 404),
        ({"image_id": "../service", "model_name": "unet"}, 404),
        ({"image_id": "scene_902", "model_name": "x"}, 400),
        ({"image_id": 5, "model_name": "unet"}, 404),
    ],
)
def test_predict_from_id_errors(server, body, status):
    r = requests.post(f"{server}/predict_from_id/", json=body, timeout=30)
    assert r.status_code == status and r.json()["detail"]
    assert requests.post(f"{server}/predict_from_id/", data=b"{broken", timeout=30).status_code == 400


def test_reference_get_routes_404_for_unknown_ids(server):
    for path in ("/list_images/nope", "/get_mask/nope"):
        r = requests.get(server + path, timeout=10)
        assert r.status_code == 404 and "nope" in r.json()["detail"]
    for path in ("/get_mask/..%2Fservice.py", "/list_images/..%2F..%2Fservice.py", "/list_images/%2e%2e"):
        r = requests.get(server + path, timeout=10)  # no route matches a decoded separator: the router's 404
        assert r.status_code == 404 and b"import" not in r.content
