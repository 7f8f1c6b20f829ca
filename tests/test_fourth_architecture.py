"""Adding an architecture takes its module and one registry line: a copy of the project gets
tests/fourth_architecture/toynet.py and its ModelSpec, imports its demo model and serves it through every API."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import subprocess
import sys

import numpy as np
import requests
from PIL import Image

from conftest import ROOT, bentoml_serve

SPEC_LINE = (
    '    ModelSpec("toynet", "segmentation.models.toynet", "pytorch", ("torch",), "multiclass", "model.safetensors",\n'
    '              Pipeline("bilinear", "scores-bilinear"), 4, 30_000, ("mean_iou", 0.0)),\n'
)
SKIP = shutil.ignore_patterns(".venv", ".git", "build", "__pycache__", ".pytest_cache", ".ruff_cache", ".hypothesis")


def digests(root) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts
    }


def test_a_fourth_architecture_is_its_module_and_one_registry_line(demo_store, tmp_path):
    project = tmp_path / "project"
    shutil.copytree(ROOT, project, ignore=SKIP)
    before = digests(project)
    shutil.copy(ROOT / "tests" / "fourth_architecture" / "toynet.py", project / "segmentation" / "models")
    registry = project / "segmentation" / "registry.py"
    text = registry.read_text()
    assert text.count("\n)\nSPECS") == 1
    registry.write_text(text.replace("\n)\nSPECS", "\n" + SPEC_LINE.rstrip("\n") + "\n)\nSPECS"))
    after = digests(project)
    changed = {p for p in after if before.get(p) != after[p]}
    assert changed == {"segmentation/models/toynet.py", "segmentation/registry.py"}

    home = tmp_path / "store"
    shutil.copytree(demo_store / "models", home / "models")
    env = {**os.environ, "BENTOML_HOME": str(home)}
    done = subprocess.run([sys.executable, "import_models.py", "--demo", "--only", "toynet"], cwd=project, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    sample = ROOT / "data" / "images" / "scene_903.png"
    with bentoml_serve("service:Segmentation", home, tmp_path / "serve.log", cwd=project) as url:
        models = {m["name"]: m for m in requests.post(f"{url}/models", json={}, timeout=30).json()}
        assert set(models) == {"dilatednet", "mask2former", "unet", "toynet", "ensemble"}
        assert models["toynet"]["tag"].startswith("toynet:") and models["toynet"]["pipeline"]["resize"] == "bilinear"
        files = {"image": (sample.name, sample.read_bytes())}
        mask = requests.post(f"{url}/segment", files=files, data={"model": "toynet", "output": "mask"}, timeout=60)
        assert mask.status_code == 200, mask.text
        labels = np.asarray(Image.open(io.BytesIO(mask.content)))
        assert labels.shape == (256, 512) and labels.max() < 8
        as_json = requests.post(f"{url}/segment_json", files=files, data={"model": "toynet"}, timeout=60).json()
        assert sum(c["pixels"] for c in as_json["classes"]) == labels.size
        evaluation = requests.post(f"{url}/evaluate", json={"image_id": "scene_903", "model": "toynet"}, timeout=60)
        assert evaluation.status_code == 200 and evaluation.json()["mean_iou"] is not None
        overlay = requests.post(f"{url}/predict_from_file/", files={"file": (sample.name, sample.read_bytes())},
                                data={"model_name": "toynet"}, timeout=60)
        assert overlay.status_code == 200
        assert "toynet" in requests.get(f"{url}/available_models/", timeout=10).json()["models"]
        assert models["ensemble"]["available"] is True  # its members are as they were
