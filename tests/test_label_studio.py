"""Label Studio's side, without a model: the labelling config, where a task's image may come from, the results."""

from __future__ import annotations

import base64

import numpy as np
import pytest
from label_studio_sdk.converter.brush import decode_rle

from segmentation.classes import CLASS_NAMES
from segmentation.label_studio import (
    TaskError,
    allowed_url,
    brush_results,
    data_url_bytes,
    image_reference,
    parse_config,
    sample_id,
)

CONFIG = """<View>
  <Image name="photo" value="$img" zoom="true"/>
  <BrushLabels name="brush" toName="photo">
    <Label value="Sky" background="#4682b4"/>
    <Label value="Car" predicted_values="vehicle"/>
    <Label value="Tree"/>
  </BrushLabels>
</View>"""


def test_the_config_names_the_control_the_image_and_the_classes():
    config = parse_config(CONFIG, CLASS_NAMES)
    assert (config.from_name, config.to_name, config.data_key) == ("brush", "photo", "img")
    assert config.labels == {CLASS_NAMES.index("sky"): "Sky", CLASS_NAMES.index("vehicle"): "Car"}  # no "Tree"


@pytest.mark.parametrize(
    "config, message",
    [
        ("", "label_config"),
        ("<View><Image", "not valid XML"),
        ('<View><Image name="i" value="$i"/><RectangleLabels name="r" toName="i"/></View>', "no <BrushLabels"),
        ('<View><BrushLabels name="b" toName="i"><Label value="sky"/></BrushLabels></View>', "no <Image name='i'"),
        (CONFIG.replace("Sky", "Cloud").replace("vehicle", "bus"), "none of the BrushLabels' labels"),
        ('<!DOCTYPE x [<!ENTITY a "aaaa">]><View/>', "DOCTYPE"),
    ],
)
def test_a_config_this_service_cannot_answer_says_why(config, message):
    with pytest.raises(TaskError, match=message):
        parse_config(config, CLASS_NAMES)


def test_where_a_task_image_may_come_from(monkeypatch):
    assert [sample_id(r) for r in ("scene_903", "data/images/scene_903.png", "http://h:3000/images/scene_903")] == [
        "scene_903"
    ] * 3
    assert sample_id("/data/upload/1/x.png") is None and sample_id("../service.py") is None
    png = b"\x89PNG fake bytes"
    assert data_url_bytes("data:image/png;base64," + base64.b64encode(png).decode()) == png
    with pytest.raises(TaskError, match="not valid base64"):
        data_url_bytes("data:image/png;base64,@@@")
    assert data_url_bytes("https://example.com/x.png") is None
    with pytest.raises(TaskError, match="SEG_IMAGE_URL_HOSTS") as refused:
        allowed_url("https://example.com/x.png")
    assert refused.value.status == 403
    monkeypatch.setenv("SEG_IMAGE_URL_HOSTS", "images.example.org, Example.com")
    assert allowed_url("https://example.com/x.png") == "https://example.com/x.png"
    with pytest.raises(TaskError):
        allowed_url("http://169.254.169.254/latest/meta-data")
    assert allowed_url("file:///etc/passwd") is None  # not a URL this service fetches at all


def test_a_task_without_its_image_field_is_refused():
    config = parse_config(CONFIG, CLASS_NAMES)
    assert image_reference({"data": {"img": "scene_900"}}, config) == "scene_900"
    with pytest.raises(TaskError, match="'img'"):
        image_reference({"data": {"image": "scene_900"}}, config)


def test_results_are_brushes_for_the_configured_classes_present():
    labels = np.zeros((6, 9), np.uint8)
    labels[:2] = CLASS_NAMES.index("sky")
    labels[4:, 3:7] = CLASS_NAMES.index("vehicle")
    labels[3, 0] = CLASS_NAMES.index("nature")  # present, but not in the config
    results = brush_results(labels, parse_config(CONFIG, CLASS_NAMES))
    assert [r["value"]["brushlabels"] for r in results] == [["Sky"], ["Car"]]
    for r, class_id in zip(results, (5, 7)):
        assert (r["from_name"], r["to_name"], r["type"]) == ("brush", "photo", "brushlabels")
        assert (r["original_width"], r["original_height"]) == (9, 6)
        decoded = decode_rle(r["value"]["rle"]).reshape(6, 9, 4)[:, :, 3]
        assert np.array_equal(decoded, (labels == class_id) * 255)


@pytest.fixture
def www(tmp_path):
    """A local web server: /scene.png, a redirect to elsewhere, and a 404."""
    import http.server
    import threading

    (tmp_path / "scene.png").write_bytes(b"x" * 5000)

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **kw):
            super().__init__(*a, directory=str(tmp_path), **kw)

        def do_GET(self):
            if self.path == "/moved.png":
                self.send_response(302)
                self.send_header("Location", "http://169.254.169.254/latest/meta-data")
                self.end_headers()
                return
            super().do_GET()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_an_allowed_host_is_fetched_within_the_limits(www, monkeypatch):
    import asyncio

    from segmentation.label_studio import fetch

    monkeypatch.setenv("SEG_IMAGE_URL_HOSTS", "127.0.0.1")
    url = allowed_url(f"{www}/scene.png")
    assert asyncio.run(fetch(url, max_bytes=10_000)) == b"x" * 5000
    with pytest.raises(TaskError, match="limit is 1,000") as big:
        asyncio.run(fetch(url, max_bytes=1000))
    assert big.value.status == 413
    with pytest.raises(TaskError, match="answered 302") as moved:  # a redirect could leave the allowed host
        asyncio.run(fetch(f"{www}/moved.png", max_bytes=10_000))
    assert moved.value.status == 502
    with pytest.raises(TaskError, match="answered 404"):
        asyncio.run(fetch(f"{www}/nothing.png", max_bytes=10_000))
