"""`bentoml build`, then `bentoml serve <tag>`: the built Bento serves the same answers as the project."""

import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, bentoml_serve, described
from segmentation import MODEL_NAMES

SAMPLE = ROOT / "data" / "images" / "scene_901.png"


@pytest.fixture(scope="module")
def bento_tag(demo_store):
    out = subprocess.run(
        [sys.executable, "-m", "bentoml", "build", "--output", "tag"], cwd=ROOT, capture_output=True, text=True,
        env={**os.environ, "BENTOML_HOME": str(demo_store)}, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    tag = out.stdout.strip().splitlines()[-1].removeprefix("__tag__:")
    assert tag.startswith("segmentation:")
    return tag


def test_built_bento_holds_the_models_and_serves_the_same_masks(bento_tag, demo_store, tmp_path):
    import bentoml

    bento = bentoml.bentos.get(bento_tag)
    names = {str(m.tag).split(":")[0] for m in bento.info.all_models}
    assert names == {"dilatednet", "mask2former", "unet", "ensemble"}
    with bentoml_serve(bento_tag, demo_store, tmp_path / "bento.log", cwd=tmp_path) as url:
        with bentoml.SyncHTTPClient(url, timeout=120) as client:
            from_bento = {
                m: np.asarray(client.segment(image=SAMPLE, model=m, output="mask"))
                for m in (*MODEL_NAMES, "ensemble")
            }
            ids = client.models()
    with bentoml_serve("service:Segmentation", demo_store, tmp_path / "dev.log") as url:
        with bentoml.SyncHTTPClient(url, timeout=120) as client:
            for m, mask in from_bento.items():
                assert np.array_equal(mask, np.asarray(client.segment(image=SAMPLE, model=m, output="mask"))), m
            assert described(client.models()) == described(ids)

