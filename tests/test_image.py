"""The OCI image end to end: build it from this checkout, export and load it as a server would, run it on
loopback, and check it answers like `bentoml serve` on the same demo models. Slow (minutes): it runs where
podman or Docker can run, that is as root here (CI), or when SEG_TEST_IMAGE=1; it cleans up even when it fails,
including the image it built."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import uuid

import numpy as np
import pytest

from conftest import ROOT, _free_port, described
from segmentation.readiness import wait_until_ready
from segmentation import MODEL_NAMES

MODELS = MODEL_NAMES
SAMPLE = ROOT / "data" / "images" / "scene_904.png"

if not (os.environ.get("CI") or os.environ.get("SEG_TEST_IMAGE")):
    pytest.skip("image build test: set SEG_TEST_IMAGE=1 (CI runs it)", allow_module_level=True)
if os.geteuid() != 0 and not shutil.which("podman") and not shutil.which("docker"):
    pytest.skip("no container engine, and not root to install podman", allow_module_level=True)


@pytest.fixture(scope="module")
def engine_env():
    conf = ROOT / "build" / "containers.conf"
    return {**os.environ, **({"CONTAINERS_CONF": str(conf)} if conf.exists() else {})}


@pytest.fixture(scope="module")
def image(demo_store, engine_env):
    """Build with the documented command, export to an OCI archive, remove the image, load the archive back."""
    archive = ROOT / "build" / f"test-{uuid.uuid4().hex[:8]}.oci.tar"
    env = {**os.environ, "BENTOML_HOME": str(demo_store)}
    out = subprocess.run([sys.executable, "scripts/build_image.py", "--export", str(archive)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=3000)
    assert out.returncode == 0, out.stderr[-4000:]
    name = out.stdout.strip().splitlines()[-1]
    env = (
        {**engine_env, "CONTAINERS_CONF": str(ROOT / "build" / "containers.conf")}
        if shutil.which("podman")
        else dict(os.environ)
    )
    tool = "podman" if shutil.which("podman") else "docker"
    try:
        subprocess.run(
            [tool, "rmi", "-f", name, "localhost/segmentation:latest"], env=env, check=True, capture_output=True
        )
        loaded = subprocess.run([tool, "load", "-i", str(archive)], env=env, check=True, capture_output=True, text=True)
        assert "Loaded image" in loaded.stdout + loaded.stderr
        subprocess.run([tool, "tag", name, "localhost/segmentation:latest"], env=env, check=True, capture_output=True)
        yield tool, env, name
    finally:
        archive.unlink(missing_ok=True)
        # ~3 GB per build: a test run must not leave its image behind (the base image stays, as the build's cache)
        subprocess.run([tool, "rmi", "-f", name, "localhost/segmentation:latest"], env=env, capture_output=True)


@pytest.fixture(scope="module")
def container(image):
    tool, env, name = image
    cname, port = f"seg-test-{uuid.uuid4().hex[:8]}", _free_port()
    subprocess.run(
        [
            tool,
            "run",
            "-d",
            "--pull",
            "never",
            "--name",
            cname,
            "-p",
            f"127.0.0.1:{port}:3000",
            "--cpus",
            "2",
            "--memory",
            "6g",
            name,
        ],
        env=env,
        check=True,
        capture_output=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        try:
            wait_until_ready(url, 240)
        except RuntimeError as e:
            logs = subprocess.run([tool, "logs", cname], env=env, capture_output=True, text=True).stdout[-3000:]
            pytest.fail(f"{e}:\n{logs}")
        yield tool, env, cname, url
    finally:
        subprocess.run([tool, "rm", "-f", "-t", "5", cname], env=env, capture_output=True)


def test_container_runs_as_a_non_root_user(container):
    tool, env, cname, _ = container
    uid = subprocess.run([tool, "exec", cname, "id", "-u"], env=env, capture_output=True, text=True).stdout.strip()
    assert uid and uid != "0"


def test_image_has_cpu_torch_and_no_cuda(container):
    tool, env, cname, _ = container
    out = subprocess.run(
        [
            tool,
            "exec",
            cname,
            "python",
            "-c",
            "import torch, importlib.metadata as m; print(torch.__version__, torch.cuda.is_available(),"
            " [d.metadata['Name'] for d in m.distributions()"
            "  if d.metadata['Name'].lower().startswith(('nvidia-cu', 'nvidia-nccl', 'triton', 'torchvision'))])",
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    # no CUDA wheels (nvidia-cublas-cu12, nvidia-cudnn-cu12, ...), no triton, no torchvision; BentoML's own
    # nvidia-ml-py (pure-Python NVML bindings) is allowed
    assert out.stdout.split() == ["2.13.0+cpu", "False", "[]"], out.stdout + out.stderr[-2000:]


def test_the_image_stays_within_its_size_budget(image):
    """3.5 GB at most, compiled runtimes and the demo models' converted artifacts included (issue #23)."""
    tool, env, name = image
    size = int(subprocess.run([tool, "image", "inspect", "--format", "{{.Size}}", name], env=env, check=True,
                              capture_output=True, text=True).stdout.strip())
    logging.getLogger(__name__).info("image %s: %.2f GB", name, size / 1e9)
    assert size <= 3.5e9, f"the image weighs {size / 1e9:.2f} GB"


def test_container_answers_like_bentoml_serve(container, server):
    import bentoml

    _, _, _, url = container
    with bentoml.SyncHTTPClient(url, timeout=120) as boxed, bentoml.SyncHTTPClient(server, timeout=120) as local:
        assert described(boxed.models()) == described(local.models())
        for model in (*MODELS, "ensemble"):
            for output in ("mask", "overlay"):
                a = np.asarray(boxed.segment(image=SAMPLE, model=model, output=output))
                b = np.asarray(local.segment(image=SAMPLE, model=model, output=output))
                assert a.shape == b.shape and np.array_equal(a, b), (model, output)


def test_sigterm_to_the_container_finishes_in_flight_requests_and_exits(container):
    """Last in this module: it stops the container. `podman stop -t GRACE` is what Kubernetes does: SIGTERM, then
    SIGKILL after the grace period, so an exit code of 137 would mean the grace period ran out."""
    import asyncio
    import time

    from test_shutdown import IN_FLIGHT, grace_period_s, photo, requests_then_sigterm

    tool, env, cname, url = container
    grace = grace_period_s()
    stopper: list = []
    codes, t0 = asyncio.run(
        requests_then_sigterm(
            url,
            photo(),
            lambda: stopper.append(
                subprocess.Popen(
                    [tool, "stop", "-t", str(int(grace)), cname],
                    env=env,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                )
            ),
        )
    )
    stopper[0].wait(grace + 30)
    took = time.monotonic() - t0
    state = subprocess.run(
        [tool, "inspect", cname, "--format", "{{.State.Status}} {{.State.ExitCode}}"],
        env=env,
        capture_output=True,
        text=True,
    ).stdout.split()
    assert codes == [200] * IN_FLIGHT, codes
    assert state[0] in ("exited", "stopped") and state[1] != "137", state
    assert took < grace, took
