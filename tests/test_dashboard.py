"""The dashboard at /ui, driven in a real headless Chromium (Debian's, through Playwright) against the real server."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import requests

from conftest import ROOT

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
SHOTS = Path(os.environ.get("SEG_SCREENSHOT_DIR", ROOT / "build" / "screenshots"))
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

if not Path(CHROMIUM).exists():
    if os.environ.get("CI"):
        raise RuntimeError("CI must install Debian's chromium for the dashboard test (see .ci/run)")
    pytest.skip("Debian's chromium is not installed (apt-get install chromium)", allow_module_level=True)


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser, server):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(90_000)
    page.goto(f"{server}/ui")
    yield page
    context.close()


def wait_done(page):
    page.wait_for_function("document.getElementById('status').textContent.startsWith('Done')")
    page.wait_for_function(
        "document.getElementById('prediction').complete && document.getElementById('prediction').naturalWidth > 0"
    )


def legend_on_page(page) -> dict[str, float]:
    return {
        row.get_attribute("data-class"): float(row.get_attribute("data-fraction"))
        for row in page.locator("#legend .row").all()
    }


def test_segment_a_sample_with_each_model_and_match_the_api(page, server):
    SHOTS.mkdir(parents=True, exist_ok=True)
    wait_done(page)  # the first sample is segmented on load
    sample = page.locator("#samples button.active").get_attribute("data-id")
    assert page.locator("#truth").is_visible() and page.locator("#meanIou").inner_text()
    for model in ("dilatednet", "unet", "mask2former"):
        page.select_option("#model", model)
        wait_done(page)
        image = requests.get(f"{server}/images/{sample}", timeout=10).content
        api = requests.post(
            f"{server}/analyze", files={"image": (f"{sample}.png", image)}, data={"model": model}, timeout=60
        ).json()
        assert legend_on_page(page) == {c["name"]: c["fraction"] for c in api["classes"]}
        evaluation = requests.post(f"{server}/evaluate", json={"image_id": sample, "model": model}, timeout=60).json()
        assert page.locator("#meanIou").inner_text() == str(evaluation["mean_iou"])
        page.screenshot(path=str(SHOTS / f"dashboard-{model}.png"), full_page=True)


def test_upload_an_image_and_see_errors_from_the_api(page, tmp_path):
    wait_done(page)
    page.set_input_files("#file", str(ROOT / "data" / "images" / "scene_905.png"))
    wait_done(page)
    assert page.locator("#truthFigure").is_hidden()
    assert set(legend_on_page(page)) == {"void", "flat", "construction", "object", "nature", "sky", "human", "vehicle"}
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    page.set_input_files("#file", str(bad))
    page.wait_for_selector("#error", state="visible")
    assert "not a decodable image" in page.locator("#error").inner_text()


def test_phone_sized_screen(browser, server):
    context = browser.new_context(viewport={"width": 390, "height": 844}, device_scale_factor=2, is_mobile=True)
    page = context.new_page()
    page.set_default_timeout(90_000)
    page.goto(f"{server}/ui")
    wait_done(page)
    assert page.evaluate("document.documentElement.scrollWidth") <= 390  # nothing runs off the side
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / "dashboard-phone.png"), full_page=True)
    context.close()


def test_compare_every_model_on_one_image(page, server):
    wait_done(page)
    sample = page.locator("#samples button").nth(2)
    sample.click()
    wait_done(page)
    image_id = sample.get_attribute("data-id")
    page.click("#compareButton")
    page.wait_for_function("document.getElementById('compareStatus').textContent.startsWith('Compared')")
    models = [m["name"] for m in requests.post(f"{server}/models", json={}, timeout=10).json()]
    figures = page.locator("#compare figure")
    assert [f.get_attribute("data-model") for f in figures.all()] == models
    width = page.evaluate("document.getElementById('original').naturalWidth")
    for model in models:
        figure = page.locator(f'#compare figure[data-model="{model}"]')
        page.wait_for_function(
            f"document.querySelector('#compare figure[data-model=\"{model}\"] img').naturalWidth === {width}"
        )
        evaluation = requests.post(f"{server}/evaluate", json={"image_id": image_id, "model": model}, timeout=60).json()
        assert figure.locator(".meanIou").inner_text() == str(evaluation["mean_iou"])
    page.screenshot(path=str(SHOTS / "dashboard-compare.png"), full_page=True)
    page.set_input_files("#file", str(ROOT / "data" / "images" / "scene_905.png"))  # another image: stale, hidden
    wait_done(page)
    assert page.locator("#compareCard").is_hidden()
    page.click("#compareButton")
    page.wait_for_function("document.getElementById('compareStatus').textContent.startsWith('Compared')")
    assert "no ground truth" in page.locator("#compare figure").first.inner_text()
