"""Shared fixtures.

The model store is a fresh ``BENTOML_HOME`` per test session, filled once by ``import_models.py --demo`` (about
4 minutes on 2 cores) the first time a test asks for it. ``SEG_TEST_BENTOML_HOME=/some/dir`` reuses a store
that already holds the three demo models, to iterate faster.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CITYSCAPES = ROOT.parent / "shared" / "cityscapes-sample"

_reuse = os.environ.get("SEG_TEST_BENTOML_HOME")
STORE_HOME = Path(_reuse) if _reuse else Path(tempfile.mkdtemp(prefix="seg-test-bentoml-"))
os.environ["BENTOML_HOME"] = str(STORE_HOME)  # before bentoml is imported anywhere
os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def stored_tags(name: str) -> list[str]:
    import bentoml

    try:
        return sorted(str(m.tag) for m in bentoml.models.list(name))
    except bentoml.exceptions.NotFound:
        return []


@pytest.fixture(scope="session")
def demo_store() -> Path:
    """A model store holding the three demo models (imported once per session)."""
    import import_models

    if not all(stored_tags(n) for n in ("dilatednet", "mask2former", "unet")):
        assert import_models.main(["--demo"]) == 0
    return STORE_HOME


@pytest.fixture(scope="session")
def cityscapes() -> Path:
    if not (CITYSCAPES / "images").is_dir():
        pytest.skip("../shared/cityscapes-sample is not present")
    return CITYSCAPES
