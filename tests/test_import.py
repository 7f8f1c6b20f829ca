"""import_models.py against the real model store: the demo floors, users' artifacts, and every way to fail."""

from __future__ import annotations

import hashlib
import http.server
import logging
import shutil
import threading
import zipfile
from functools import partial

import numpy as np
import pytest

import import_models
from conftest import stored_tags
from segmentation import MODEL_NAMES
from segmentation.preprocessing import Pipeline, compact_scores, labels_at, resize_rgb
from segmentation.registry import label_set_of, pipeline_of

torch = pytest.importorskip("torch")
NAMES = MODEL_NAMES
STORED = (*NAMES, "ensemble")  # what the store holds after --demo


@pytest.fixture
def store(demo_store):
    """The demo store; each test must leave it exactly as it found it, or clean up what it added."""
    import bentoml

    before = {n: stored_tags(n) for n in STORED}
    latest = {n: str(bentoml.models.get(f"{n}:latest").tag) for n in STORED}
    yield before
    for n in STORED:  # remove what a successful import added (a member's refits the ensemble), so `latest` is
        # the demo model again
        for tag in set(stored_tags(n)) - set(before[n]):
            bentoml.models.delete(tag)
        assert str(bentoml.models.get(f"{n}:latest").tag) == latest[n]


@pytest.fixture
def unet_pth(tmp_path):
    from segmentation.models.unet import PRESETS, UNet

    torch.manual_seed(1)
    path = tmp_path / "unet.pth"
    torch.save({"model_state_dict": UNet(PRESETS["small"]).state_dict()}, path)
    return path


@pytest.fixture
def www(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    )
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def refused(argv, caplog, store, expect: str) -> None:
    with caplog.at_level(logging.ERROR, logger="import_models"):
        assert import_models.main(argv) == 1
    assert expect in caplog.text, caplog.text
    assert {n: stored_tags(n) for n in STORED} == store, "a failed import changed the store"


# --- the demo models ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,key,floor", [("dilatednet", "mean_iou", 0.6), ("mask2former", "mean_iou", 0.5), ("unet", "dice", 0.7)]
)
def test_demo_models_meet_their_quality_floor_on_held_out_scenes(demo_store, name, key, floor):
    import bentoml

    meta = bentoml.models.get(f"{name}:latest").info.metadata
    assert meta["demo"] is True and meta["preset"] == "small"
    assert meta["metrics"][key] >= floor
    assert meta["metrics"]["heldout_scenes"] >= 20
    assert meta["classes"] and len(meta["palette"]) == len(meta["classes"]) and meta["input_size"]
    assert meta["framework_versions"]


def test_demo_import_skips_models_already_in_the_store(store):
    assert import_models.main(["--demo", "--skip-existing"]) == 0
    assert {n: stored_tags(n) for n in STORED} == store


# --- users' artifacts -----------------------------------------------------------------------------------------


def test_unet_checkpoint_import_moves_latest_and_records_its_source(store, unet_pth):
    import bentoml

    digest = hashlib.sha256(unet_pth.read_bytes()).hexdigest()
    assert import_models.main(["--unet", str(unet_pth), "--sha256", f"unet={digest}"]) == 0
    latest = bentoml.models.get("unet:latest")
    assert str(latest.tag) not in store["unet"]
    meta = latest.info.metadata
    assert meta["source"] == str(unet_pth) and meta["source_sha256"] == digest
    assert meta["demo"] is False and meta["preset"] == "small" and meta["framework"] == "pytorch"


def test_mask2former_zip_from_a_url(store, www, tmp_path):
    import bentoml

    from segmentation.models.mask2former import build_model, build_processor

    folder = tmp_path / "m2f"
    build_model("small").save_pretrained(folder)
    build_processor((128, 128)).save_pretrained(folder)
    root, url = www
    with zipfile.ZipFile(root / "m2f.zip", "w") as zf:
        for f in folder.iterdir():
            zf.write(f, f"mask2former-custom/{f.name}")
    assert import_models.main(["--mask2former", f"{url}/m2f.zip"]) == 0
    meta = bentoml.models.get("mask2former:latest").info.metadata
    assert meta["source"].endswith("m2f.zip") and meta["input_size"] == [128, 128]


# --- failures: exit 1, a message naming the problem, the store unchanged ------------------------------------------


def test_missing_file(store, caplog, tmp_path):
    refused(["--unet", str(tmp_path / "absent.pth")], caplog, store, "does not exist")


def test_corrupt_files(store, caplog, tmp_path):
    bad = tmp_path / "model.keras"
    bad.write_bytes(b"\x00garbage" * 100)
    refused(["--dilatednet", str(bad)], caplog, store, "could not be loaded as a dilatednet model")
    bad_pth = tmp_path / "model.pth"
    bad_pth.write_bytes(b"\x00garbage" * 100)
    refused(["--unet", str(bad_pth)], caplog, store, "could not be loaded as a unet model")
    folder = tmp_path / "m2f"
    folder.mkdir()
    (folder / "config.json").write_text("{not json")
    refused(["--mask2former", str(folder)], caplog, store, "could not be loaded as a mask2former model")


def test_wrong_architecture(store, caplog, tmp_path):
    torch.save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "resnet.pth")
    refused(["--unet", str(tmp_path / "resnet.pth")], caplog, store, "not a UNet checkpoint")
    import keras

    inp = keras.Input((64, 64, 3))
    keras.Model(inp, keras.layers.Conv2D(21, 1)(inp)).save(tmp_path / "voc.keras")
    refused(
        ["--dilatednet", str(tmp_path / "voc.keras")],
        caplog,
        store,
        "predicts 21 classes; accepted label sets: superclass (8 classes), trainid (19 classes), labelid (34 classes)",
    )
    keras.Model(inp, keras.layers.Conv2D(8, 1)(inp)[:, ::2]).save(tmp_path / "half.keras")
    refused(["--dilatednet", str(tmp_path / "half.keras")], caplog, store, "must output")


def test_shape_mismatch(store, caplog, tmp_path):
    from segmentation.models.unet import PRESETS, UNet

    sd = UNet(PRESETS["small"]).state_dict()
    sd["ups.0.conv.0.weight"] = torch.zeros(3, 3, 3, 3)
    torch.save(sd, tmp_path / "bad.pth")
    refused(["--unet", str(tmp_path / "bad.pth")], caplog, store, "size mismatch")


def test_checksum_mismatch(store, caplog, unet_pth):
    refused(["--unet", str(unet_pth), "--sha256", "unet=" + "0" * 64], caplog, store, "sha256 mismatch")


def test_failing_urls(store, caplog, www):
    _, url = www
    refused(["--unet", f"{url}/missing.pth"], caplog, store, "404")
    refused(["--unet", "http://127.0.0.1:9/unet.pth"], caplog, store, "could not download")


def test_one_bad_artifact_means_none_is_written(store, caplog, unet_pth, tmp_path):
    refused(["--unet", str(unet_pth), "--dilatednet", str(tmp_path / "absent.keras")], caplog, store, "does not exist")


def test_pickled_code_in_a_checkpoint_is_refused_not_run(store, caplog, tmp_path):
    class Payload:
        def __reduce__(self):
            return (shutil.rmtree, (str(tmp_path / "victim"),))

    (tmp_path / "victim").mkdir()
    torch.save({"inc.0.weight": Payload()}, tmp_path / "evil.pth")
    refused(["--unet", str(tmp_path / "evil.pth")], caplog, store, "could not be loaded")
    assert (tmp_path / "victim").exists()


def test_command_line_mistakes_are_usage_errors(capsys):
    with pytest.raises(SystemExit) as e:
        import_models.main([])
    assert e.value.code == 2
    with pytest.raises(SystemExit):
        import_models.main(["--unet", "x.pth", "--sha256", "dilatednet=abc"])
    assert "MODEL=HEX" in capsys.readouterr().err


# --- public checkpoints: other label sets, Hub ids ------------------------------------------------------------------


def _cityscapes_mask2former(folder, names):
    """A tiny Mask2Former with the config layout of facebook/mask2former-swin-*-cityscapes-semantic."""
    from segmentation.models.mask2former import build_config, build_processor
    from transformers import Mask2FormerForUniversalSegmentation

    config = build_config("small")
    config.num_labels = len(names)
    config.id2label, config.label2id = dict(enumerate(names)), {n: i for i, n in enumerate(names)}
    torch.manual_seed(3)
    Mask2FormerForUniversalSegmentation(config).eval().save_pretrained(folder)
    build_processor((128, 128)).save_pretrained(folder)
    return folder


def _scene():
    from segmentation.scenes import generate_scene

    return generate_scene(11, 200, 320)[0]


def _stored_predictor(name):
    import bentoml

    from segmentation.store import load_predictor

    stored = bentoml.models.get(f"{name}:latest")
    # the framework's own forward: these tests are about label sets, which any runtime's answers go through alike
    return load_predictor(name, stored.path, dict(stored.info.metadata), precision="fp32", native=True), stored


def test_a_19_trainid_mask2former_is_served_in_superclasses_by_the_reference_rule(store, tmp_path):
    """Arg-max over the 19 trainIds (transformers' own post-processing), then the trainId -> superclass table."""
    from transformers import Mask2FormerForUniversalSegmentation, Mask2FormerImageProcessor

    from segmentation.classes import TRAIN_ID_NAMES, TRAIN_ID_TO_SUPERCLASS

    folder = _cityscapes_mask2former(tmp_path / "m2f19", list(TRAIN_ID_NAMES))
    assert import_models.main(["--mask2former", str(folder)]) == 0
    predictor, stored = _stored_predictor("mask2former")
    meta = stored.info.metadata
    assert meta["label_set"] == "trainid" and meta["model_classes"] == list(TRAIN_ID_NAMES)
    assert meta["classes"][:2] == ["void", "flat"] and len(meta["classes"]) == 8
    image = _scene()
    model = Mask2FormerForUniversalSegmentation.from_pretrained(folder).eval()
    processor = Mask2FormerImageProcessor.from_pretrained(folder)
    with torch.no_grad():
        outputs = model(**processor(images=image, return_tensors="pt"))
    train_ids = processor.post_process_semantic_segmentation(outputs, target_sizes=[image.shape[:2]])[0].numpy()
    expected = TRAIN_ID_TO_SUPERCLASS[train_ids.astype("uint8")]
    served = predictor.predict([image]).labels[0]
    assert served.shape == expected.shape and (served == expected).mean() == 1.0
    # the served route for a processor the gateway can match: the gateway resizes, the model process sends its 19
    # classes' scores summarised, the gateway takes the arg-max at the photo's size and applies the table
    pipeline = pipeline_of("mask2former", meta)
    assert pipeline == Pipeline("bilinear", "scores-bilinear")
    resized = resize_rgb(image, tuple(meta["input_size"]), pipeline.resize)
    (scores,) = predictor.predict([resized], finish=False).labels
    assert scores.shape[0] == 19
    via_gateway = label_set_of(meta).lookup_table()[labels_at(compact_scores(scores), image.shape[:2])]
    assert np.array_equal(via_gateway, expected)
    with zipfile.ZipFile(tmp_path / "m2f19.zip", "w") as zf:  # the same checkpoint as a zip of its folder
        for f in folder.iterdir():
            zf.write(f, f"m2f19/{f.name}")
    assert import_models.main(["--mask2former", str(tmp_path / "m2f19.zip")]) == 0
    from_zip, stored = _stored_predictor("mask2former")
    assert stored.info.metadata["label_set"] == "trainid"
    assert np.array_equal(from_zip.predict([image]).labels[0], served)


def test_a_mask2former_whose_processor_keeps_the_aspect_is_resized_and_finished_in_its_own_process(store, tmp_path):
    """A processor sized by the shortest edge gives every photo its own input size, which the gateway cannot know:
    no pipeline is recorded, and the model's process runs the processor and transformers' post-processing."""
    from transformers import Mask2FormerForUniversalSegmentation
    from transformers.models.mask2former.image_processing_pil_mask2former import Mask2FormerImageProcessorPil

    from segmentation.models.mask2former import build_model

    folder = tmp_path / "m2f-aspect"
    build_model("small").save_pretrained(folder)
    Mask2FormerImageProcessorPil(size={"shortest_edge": 96, "longest_edge": 192}).save_pretrained(folder)
    assert import_models.main(["--mask2former", str(folder), "--runtime", "native"]) == 0
    predictor, stored = _stored_predictor("mask2former")
    assert "pipeline" not in stored.info.metadata and pipeline_of("mask2former", stored.info.metadata) is None
    image = _scene()
    model, processor = Mask2FormerForUniversalSegmentation.from_pretrained(folder).eval(), predictor.processor
    with torch.no_grad():
        outputs = model(**processor(images=image, return_tensors="pt"))
    expected = processor.post_process_semantic_segmentation(outputs, target_sizes=[image.shape[:2]])[0].numpy()
    assert np.array_equal(predictor.predict([image]).labels[0], expected)


def test_a_hub_id_imports_from_the_local_cache_offline(store, tmp_path):
    """`--mask2former owner/name` through huggingface_hub with HF_HUB_OFFLINE=1: the cache, never the network."""
    import os
    import subprocess
    import sys

    import bentoml

    from conftest import ROOT
    from segmentation.classes import TRAIN_ID_NAMES

    cache, commit = tmp_path / "hf-cache", "0123456789abcdef0123456789abcdef01234567"
    repo = cache / "models--seg-test--mask2former-tiny-cityscapes-semantic"
    _cityscapes_mask2former(repo / "snapshots" / commit, list(TRAIN_ID_NAMES))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)}
    def run(source: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "import_models.py", "--mask2former", source], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=300)

    out = run("seg-test/mask2former-tiny-cityscapes-semantic")
    assert out.returncode == 0, out.stderr[-3000:]
    meta = bentoml.models.get("mask2former:latest").info.metadata
    assert meta["source"] == "seg-test/mask2former-tiny-cityscapes-semantic" and meta["label_set"] == "trainid"
    before = stored_tags("mask2former")
    out = run("seg-test/not-in-the-cache")
    assert out.returncode == 1 and "is not in the Hugging Face cache" in out.stderr
    (repo / "snapshots" / commit / "model.safetensors").unlink()
    (repo / "snapshots" / commit / "pytorch_model.bin").write_bytes(b"pickle")
    out = run("seg-test/mask2former-tiny-cityscapes-semantic")
    assert out.returncode == 1 and "only pickled weights" in out.stderr and "refs/pr/N" in out.stderr
    assert stored_tags("mask2former") == before


def test_a_34_labelid_dilatednet_is_served_in_superclasses_by_the_reference_rule(store, tmp_path):
    import keras
    import tensorflow as tf
    from PIL import Image

    from segmentation.classes import LABEL_ID_TO_SUPERCLASS
    from segmentation.models.dilatednet import build_model

    model = build_model("small", seed=4, classes=34)
    model.save(tmp_path / "labelids.keras")
    assert import_models.main(["--dilatednet", str(tmp_path / "labelids.keras")]) == 0
    predictor, stored = _stored_predictor("dilatednet")
    assert stored.info.metadata["label_set"] == "labelid" and len(stored.info.metadata["model_classes"]) == 34
    image = _scene()
    x = keras.utils.img_to_array(Image.fromarray(image).resize((256, 256))) / 255.0
    probs = model.predict(x[None], verbose=0)[0]
    label_ids = np.argmax(tf.image.resize(probs, image.shape[:2], method="bilinear").numpy(), axis=-1)
    expected = LABEL_ID_TO_SUPERCLASS[label_ids.astype("uint8")]
    assert (predictor.predict([image]).labels[0] == expected).mean() >= 0.999


def test_an_unknown_label_set_is_refused_naming_what_was_found(store, caplog, tmp_path):
    folder = _cityscapes_mask2former(tmp_path / "ade", [f"thing {i}" for i in range(19)])
    refused(["--mask2former", str(folder)], caplog, store, "the model's 19 classes are named thing 0")
    refused(["--mask2former", str(folder), "--labels", "labelid"], caplog, store, "--labels labelid means 34 classes")
    assert import_models.main(["--mask2former", str(folder), "--labels", "trainid"]) == 0  # the user says so


def test_a_recorded_resize_override_is_used_and_shown(store, tmp_path):
    import bentoml

    from segmentation.models.dilatednet import build_model

    build_model("small", seed=5).save(tmp_path / "bilinear.keras")
    assert import_models.main(["--dilatednet", str(tmp_path / "bilinear.keras"), "--resize", "bilinear"]) == 0
    meta = bentoml.models.get("dilatednet:latest").info.metadata
    assert meta["pipeline"] == {"resize": "bilinear", "upsample": "scores-bilinear"}
    predictor, _ = _stored_predictor("dilatednet")
    assert predictor.pipeline.resize == "bilinear"
