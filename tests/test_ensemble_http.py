"""model=ensemble over HTTP: a re-computation from the members' probabilities, unchanged members, every API,
and a clear answer when the store's ensemble was fitted on other members."""

from __future__ import annotations

import asyncio
import io
import json
import shutil

import numpy as np
import pytest
import requests
from PIL import Image

from conftest import ROOT, bentoml_serve, served_mask
from segmentation import ensemble as E

SAMPLES = sorted((ROOT / "data" / "images").glob("*.png"))


@pytest.fixture(scope="module")
def members(demo_store):
    """The members as the server loads them (same store entries, same precision)."""
    import bentoml

    from segmentation.store import load_predictor

    out = {}
    for m in E.MEMBERS:
        stored = bentoml.models.get(f"{m}:latest")
        out[m] = load_predictor(m, stored.path, dict(stored.info.metadata))
    return out


def test_the_ensemble_is_a_recomputation_from_its_members_probabilities(server, members):
    entry = next(m for m in requests.post(f"{server}/models", json={}, timeout=30).json() if m["name"] == E.NAME)
    weights = [entry["weights"][m] for m in E.MEMBERS]
    for path in SAMPLES:
        image = np.asarray(Image.open(path).convert("RGB"))
        probs = [members[m].probabilities([image]).labels[0] for m in E.MEMBERS]
        expected = E.fuse(probs, weights, image.shape[:2])
        assert np.array_equal(served_mask(server, path, E.NAME), expected), path.name


def test_models_lists_the_ensemble_with_its_members(server):
    models = {m["name"]: m for m in requests.post(f"{server}/models", json={}, timeout=30).json()}
    entry = models[E.NAME]
    assert entry["available"] is True and entry["tag"].startswith("ensemble:")
    assert entry["members"] == {m: models[m]["tag"] for m in E.MEMBERS}
    assert sum(entry["weights"].values()) == pytest.approx(1.0)
    metrics = entry["metrics"]
    assert set(metrics["members_mean_iou"]) == set(E.MEMBERS) and 0 < metrics["mean_iou"] <= 1
    assert str(entry["weights"]["dilatednet"]) in metrics["fit_grid"]


def test_members_answer_the_same_while_the_ensemble_runs(server):
    import aiohttp

    alone = {m: [served_mask(server, p, m) for p in SAMPLES[:3]] for m in E.MEMBERS}

    async def flood():
        async with aiohttp.ClientSession() as session:
            async def one(path, model):
                form = aiohttp.FormData()
                form.add_field("image", path.read_bytes(), filename=path.name, content_type="image/png")
                form.add_field("model", model)
                form.add_field("output", "mask")
                async with session.post(f"{server}/segment", data=form) as r:
                    assert r.status == 200
                    return model, path, np.asarray(Image.open(io.BytesIO(await r.read())))

            calls = [one(p, m) for p in SAMPLES[:3] for m in (*E.MEMBERS, E.NAME, E.NAME)]
            return await asyncio.gather(*calls)

    for model, path, mask in asyncio.run(flood()):
        if model in E.MEMBERS:
            assert np.array_equal(mask, alone[model][SAMPLES.index(path)]), (model, path.name)


def test_every_image_api_takes_the_ensemble(server):
    path = SAMPLES[3]
    mask = served_mask(server, path, E.NAME)
    files = {"image": (path.name, path.read_bytes())}
    analyze = requests.post(f"{server}/analyze", files=files, data={"model": E.NAME}, timeout=60).json()
    assert analyze["model"] == E.NAME and analyze["tag"].startswith("ensemble:")
    fractions = {c["name"]: c["fraction"] for c in analyze["classes"]}
    assert fractions["sky"] == pytest.approx((mask == 5).mean(), abs=1e-6)
    evaluation = requests.post(f"{server}/evaluate", json={"image_id": path.stem, "model": E.NAME}, timeout=60)
    assert evaluation.status_code == 200 and evaluation.json()["mean_iou"] > 0
    as_json = requests.post(f"{server}/segment_json", files=files, data={"model": E.NAME, "encoding": "png"},
                            timeout=60).json()
    assert as_json["tag"].startswith("ensemble:")
    overlay = requests.post(f"{server}/predict_from_file/", files={"file": (path.name, path.read_bytes())},
                            data={"model_name": E.NAME}, timeout=60)
    assert overlay.status_code == 200 and overlay.headers["content-type"] == "image/png"
    assert E.NAME in requests.get(f"{server}/available_models/", timeout=10).json()["models"]
    legend = requests.post(f"{server}/legend", json={"model": E.NAME}, timeout=10).json()
    assert [c["name"] for c in legend["classes"]][-1] == "vehicle"


def test_an_ensemble_fitted_on_other_members_is_refused_alone(demo_store, tmp_path):
    """A store whose ensemble names a member version it no longer holds: every model is served, and
    model=ensemble answers 404 saying which member and how to fit it again."""
    import os
    import subprocess
    import sys

    home = tmp_path / "store"
    shutil.copytree(demo_store / "models", home / "models", ignore=shutil.ignore_patterns("ensemble"))
    script = (
        "import bentoml; from segmentation.store import ensemble_metadata, save_ensemble; "
        "m2f = str(bentoml.models.get('mask2former:latest').tag); "
        "m = {'dilatednet': 'dilatednet:gone00000000', 'mask2former': m2f}; "
        "save_ensemble(ensemble_metadata(m, {'dilatednet': 0.5, 'mask2former': 0.5}, {}, True))"
    )
    subprocess.run([sys.executable, "-c", script], cwd=ROOT, check=True, env={**os.environ, "BENTOML_HOME": str(home)})
    log = tmp_path / "serve.log"
    with bentoml_serve("service:Segmentation", home, log) as url:
        assert served_mask(url, SAMPLES[0], "dilatednet").shape == (256, 512)
        r = requests.post(f"{url}/segment", files={"image": ("a.png", SAMPLES[0].read_bytes())},
                          data={"model": E.NAME}, timeout=60)
        assert r.status_code == 404
        message = json.dumps(r.json())
        assert "dilatednet:gone00000000" in message and "import_models.py --ensemble" in message
        entry = requests.post(f"{url}/models", json={}, timeout=10).json()[-1]
        assert entry["name"] == E.NAME and entry["available"] is False
    assert "model=ensemble is not served" in log.read_text()
