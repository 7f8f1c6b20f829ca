"""Settings are read and checked in one place; a bad value names its variable, at start, never as a 500 later.
The BentoML workarounds refuse a BentoML release they were not written for."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import ROOT
from segmentation.bentoml_workarounds import WRITTEN_FOR, BentoMLVersionError, check_version
from segmentation.settings import Settings, SettingsError, from_environ, settings


def test_defaults_are_the_documented_limits():
    s = from_environ({})
    assert (s.max_upload_bytes, s.max_pixels, s.min_side) == (20 * 1024 * 1024, 40_000_000, 8)
    assert (s.max_concurrency, s.timeout_s, s.split_batch, s.precision) == (32, 120.0, True, None)
    assert s.request_limit == s.max_upload_bytes + 64 * 1024


def test_values_are_parsed_and_per_model_variables_are_kept_by_model():
    s = from_environ({"SEG_MAX_PIXELS": "1000", "SEG_TIMEOUT_S": "2.5", "SEG_SPLIT_BATCH": "0", "SEG_PRECISION": "bf16",
                      "SEG_UNET_THREADS": "3", "SEG_MASK2FORMER_WORKERS": "2", "SEG_MAX_REQUEST_BYTES": "4096",
                      "SEG_MIN_SIDE": ""})
    assert (s.max_pixels, s.timeout_s, s.split_batch, s.precision, s.request_limit) == (1000, 2.5, False, "bf16", 4096)
    assert s.threads == {"unet": 3} and s.workers == {"mask2former": 2} and s.min_side == 8
    with pytest.raises(Exception):
        s.max_pixels = 5  # frozen


@pytest.mark.parametrize("var,value,says", [
    ("SEG_MAX_PIXELS", "abc", "valid integer"),
    ("SEG_TIMEOUT_S", "-1", "greater than 0"),
    ("SEG_MAX_CONCURRENCY", "0", "greater than 0"),
    ("SEG_PRECISION", "fp16", "'fp32' or 'bf16'"),
    ("SEG_SPLIT_BATCH", "maybe", "valid boolean"),
    ("SEG_UNET_WORKERS", "two", "valid integer"),
])
def test_a_bad_value_names_the_variable_and_what_is_wrong(var, value, says):
    with pytest.raises(SettingsError) as e:
        from_environ({var: value})
    assert f"{var}={value!r}" in str(e.value) and says in str(e.value)


def test_settings_follow_the_environment(monkeypatch):
    monkeypatch.setenv("SEG_MAX_PIXELS", "12345")
    assert settings().max_pixels == 12345
    monkeypatch.delenv("SEG_MAX_PIXELS")
    assert settings().max_pixels == Settings().max_pixels


@pytest.mark.parametrize("env", [{"SEG_MAX_PIXELS": "abc"}, {"SEG_TIMEOUT_S": "-1"}])
def test_the_service_refuses_to_start_with_a_bad_value(env):
    """What `bentoml serve service:Segmentation` runs first: importing the service module."""
    (var, value), = env.items()
    out = subprocess.run([sys.executable, "-c", "import service"], cwd=ROOT, env={**os.environ, **env},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert f"SettingsError: bad setting: {var}={value!r}" in out.stderr


def test_the_workarounds_refuse_another_bentoml_release():
    check_version(WRITTEN_FOR)
    with pytest.raises(BentoMLVersionError, match=f"BentoML 1.4.40 is installed.*written for BentoML {WRITTEN_FOR}"):
        check_version("1.4.40")


def test_a_server_on_another_bentoml_release_stops_at_start():
    """The version is faked the way the check reads it (package metadata), then the service module is imported."""
    fake = ("import importlib.metadata as m; real = m.version; "
            "m.version = lambda name: '1.5.0' if name == 'bentoml' else real(name); import service")
    out = subprocess.run([sys.executable, "-c", fake], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert "BentoMLVersionError: BentoML 1.5.0 is installed" in out.stderr and "bentoml==1.4.39" in out.stderr


def test_only_the_workarounds_module_reaches_into_bentoml_internals():
    found = subprocess.run(["grep", "-rln", r"_bentoml_impl\|bentoml\._internal", "segmentation", "service.py"],
                           cwd=ROOT, capture_output=True, text=True).stdout.split()
    assert found == ["segmentation/bentoml_workarounds.py"]
