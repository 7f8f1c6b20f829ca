"""import_models.py against the real model store: the demo floors, users' artifacts, and every way to fail."""

from __future__ import annotations

import hashlib
import http.server
import logging
import shutil
import threading
import zipfile
from functools import partial

import pytest

import import_models
from conftest import stored_tags

torch = pytest.importorskip("torch")
NAMES = ("dilatednet", "mask2former", "unet")


@pytest.fixture
def store(demo_store):
    """The demo store; each test must leave it exactly as it found it, or clean up what it added."""
    import bentoml

    before = {n: stored_tags(n) for n in NAMES}
    latest = {n: str(bentoml.models.get(f"{n}:latest").tag) for n in NAMES}
    yield before
    for n in NAMES:  # remove what a successful import added, so `latest` is the demo model again
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
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(http.server.SimpleHTTPRequestHandler, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def refused(argv, caplog, store, expect: str) -> None:
    with caplog.at_level(logging.ERROR, logger="import_models"):
        assert import_models.main(argv) == 1
    assert expect in caplog.text, caplog.text
    assert {n: stored_tags(n) for n in NAMES} == store, "a failed import changed the store"


# --- the demo models ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,key,floor", [("dilatednet", "mean_iou", 0.6), ("mask2former", "mean_iou", 0.5), ("unet", "dice", 0.7)])
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
    assert {n: stored_tags(n) for n in NAMES} == store


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
    refused(["--dilatednet", str(tmp_path / "voc.keras")], caplog, store, "must output")


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
