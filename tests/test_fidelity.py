"""The served masks are the reference pipelines' masks (../shared/notes/reference-pipelines.md), on real photos.

Each reference below is written again here from the apps' steps, with the frameworks' own calls (Pillow's default
resize, Keras' img_to_array, `tf.image.resize`, transformers' processor and post-processing), on the stored model
the server runs. A user who brings weights trained with those apps gets the masks those apps gave."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

log = logging.getLogger(__name__)
MODELS = ("dilatednet", "mask2former", "unet")
FLOOR = {"fp32": 0.999, "bf16": 0.995}  # share of the photos' pixels equal to the reference's, by precision


def reference_dilatednet(path: Path):
    import keras
    import tensorflow as tf

    model = keras.models.load_model(str(path / "model.keras"), compile=False)
    h, w = model.input_shape[1:3]

    def predict_mask(img: Image.Image) -> np.ndarray:
        x = keras.utils.img_to_array(img.resize((w, h))) / 255.0  # Pillow's default filter: bicubic for RGB
        probs = model.predict(x[None], verbose=0)[0].reshape((h, w, -1))
        return np.argmax(tf.image.resize(probs, (img.height, img.width), method="bilinear").numpy(), axis=-1)

    return predict_mask


def reference_mask2former(path: Path):
    import torch
    from transformers import Mask2FormerForUniversalSegmentation, Mask2FormerImageProcessor

    model = Mask2FormerForUniversalSegmentation.from_pretrained(path).eval()
    processor = Mask2FormerImageProcessor.from_pretrained(path)

    def predict_mask(img: Image.Image) -> np.ndarray:
        inputs = processor(images=img, return_tensors="pt")
        with torch.no_grad():
            outputs = model(**inputs)
        return processor.post_process_semantic_segmentation(outputs, target_sizes=[(img.height, img.width)])[0].numpy()

    return predict_mask


def reference_unet(path: Path):
    import torch

    from segmentation.models.unet import load_state_dict, read_state_dict

    model = load_state_dict(read_state_dict(path / "model.safetensors")).eval()

    def predict_mask(img: Image.Image) -> np.ndarray:
        x = np.asarray(img.resize((256, 256), Image.BILINEAR), np.float32) / 255.0  # resize, [0, 1], tensor
        with torch.no_grad():
            prob = torch.sigmoid(model(torch.from_numpy(x).permute(2, 0, 1)[None]))[0, 0].numpy()
        return np.asarray(Image.fromarray((prob > 0.5).astype(np.uint8)).resize(img.size, Image.NEAREST))

    return predict_mask


REFERENCES = {"dilatednet": reference_dilatednet, "mask2former": reference_mask2former, "unet": reference_unet}


def _served_mask(server: str, photo: Path, model: str) -> np.ndarray:
    r = requests.post(f"{server}/segment", files={"image": photo.open("rb")}, data={"model": model, "output": "mask"},
                      timeout=300)
    assert r.status_code == 200, r.text
    return np.asarray(Image.open(io.BytesIO(r.content)))


@pytest.mark.parametrize("model", MODELS)
def test_served_masks_are_the_reference_pipelines_masks(server, demo_store, cityscapes, model):
    import bentoml

    from segmentation.store import load_predictor

    stored = bentoml.models.get(f"{model}:latest")
    reference = REFERENCES[model](Path(stored.path))
    served_precision = next(
        m["precision"] for m in requests.post(f"{server}/models", timeout=30).json() if m["name"] == model
    )
    fp32 = load_predictor(model, stored.path, dict(stored.info.metadata), precision="fp32", native=True)
    rows = []
    for photo in sorted((cityscapes / "images").glob("*.png")):
        img = Image.open(photo).convert("RGB")
        expected = reference(img)
        served = _served_mask(server, photo, model)
        in_process = fp32.predict([np.asarray(img)]).labels[0]
        assert served.shape == expected.shape == (img.height, img.width)
        rows.append((photo.stem, float(np.mean(served == expected)), float(np.mean(in_process == expected))))
    served_share = float(np.mean([s for _, s, _ in rows]))  # the photos are all 2048x1024: a mean over pixels
    log.info(
        "%s served in %s, pixels equal to the reference pipeline's (served, in-process fp32): %s; served, all "
        "photos: %.5f",
        model,
        served_precision,
        ", ".join(f"{n} {s:.5f}/{f:.5f}" for n, s, f in rows),
        served_share,
    )
    assert all(f >= FLOOR["fp32"] for _, _, f in rows), rows  # in fp32, on every photo
    assert served_share >= FLOOR[served_precision], rows
    if served_precision == "fp32":
        assert all(s >= FLOOR["fp32"] for _, s, _ in rows), rows
