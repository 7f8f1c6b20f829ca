"""Build the Bento and containerize it into a CPU-only OCI image.

    python scripts/build_image.py                       # -> localhost/segmentation:<bento version>, and :latest
    python scripts/build_image.py --export build/segmentation.oci.tar

Where a Docker engine answers, BentoML's defaults are used (``bentoml containerize``, python:3.11-slim). Where it
does not (these machines: the docker CLI without a daemon, no registry), it uses podman with a Debian base image
made locally with debootstrap, the machine's CA certificates baked in, and the build on the host network.

Wheels the image cannot fetch as binaries are made here and mounted into the build, never copied into the image:
the CPU build of torch (``pip download torch==<pin>``, which resolves to the CPU build where pip is configured for
it) and the packages PyPI has only as source (pywuffs), built into wheels with this machine's compiler (Debian
bookworm, as the image). The build mounts them at /opt/wheels and points uv at them (``UV_FIND_LINKS``), so
``torch==<pin>`` resolves to ``<pin>+cpu``, no CUDA wheels are pulled and the image needs no compiler.
``UV_NO_CACHE`` keeps uv's download cache out of the image (without BuildKit, BentoML's cache mount does not apply
and the cache would double the install layer).
The models come from the local model store (import them first: ``make models``).
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename
from tqdm.auto import tqdm

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / "build"
BASE_IMAGE = "localhost/segmentation-base:bookworm"
SOURCE_ONLY = ("pywuffs",)  # pinned in requirements.txt, published on PyPI as source only
# Installed with the project but never imported by the served image: left out of it with uv's overrides (a marker
# that never holds removes a requirement). libclang is TensorFlow's, for its source tools; onnx is the format the
# import exports to, which ONNX Runtime reads without it.
IMAGE_OVERRIDES = """\
libclang ; python_version < "0"
onnx ; python_version < "0"
"""
IMAGE = "localhost/segmentation"
APT_PACKAGES = ["podman", "buildah", "skopeo", "runc", "debootstrap"]
CONTAINERS_CONF = """\
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
"""

log = logging.getLogger("build_image")


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    log.info("$ %s", " ".join(cmd))
    return subprocess.run(cmd, check=True, **kw)


def docker_engine_answers() -> bool:
    if not shutil.which("docker"):
        return False
    return subprocess.run(["docker", "info"], capture_output=True, timeout=30).returncode == 0


def ensure_podman() -> dict[str, str]:
    """podman and friends installed and configured for this sandbox; returns the environment to use them with."""
    missing = [p for p in APT_PACKAGES if not shutil.which(p if p != "skopeo" else "skopeo")]
    if missing:
        if os.geteuid() != 0:
            sys.exit(f"install {' '.join(missing)} first (apt-get install {' '.join(APT_PACKAGES)})")
        run(["apt-get", "update", "-qq"])
        run(["apt-get", "install", "-y", "-qq", *APT_PACKAGES], env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    BUILD.mkdir(exist_ok=True)
    conf = BUILD / "containers.conf"
    conf.write_text(CONTAINERS_CONF)
    return {**os.environ, "CONTAINERS_CONF": str(conf)}


def image_exists(name: str, env: dict) -> bool:
    return subprocess.run(["podman", "image", "exists", name], env=env).returncode == 0


def ensure_base_image(env: dict, rebuild: bool = False) -> str:
    """A Debian bookworm rootfs with Python 3.11, pip and venv and this machine's CA certificates, with uv pointed
    at /opt/wheels, where the build mounts :func:`image_wheels`, and at the overrides there. Returns its name."""
    name = BASE_IMAGE
    if image_exists(name, env) and not rebuild:
        log.info("base image %s is there", name)
        return name
    with tempfile.TemporaryDirectory(prefix="seg-rootfs-") as tmp:
        rootfs = Path(tmp) / "rootfs"
        log.info("debootstrap: a minimal Debian bookworm with Python (about a minute)")
        run(["debootstrap", "--variant=minbase", "--include=python3,python3-venv,python3-pip,ca-certificates",
             "bookworm", str(rootfs), "http://deb.debian.org/debian"], stdout=subprocess.DEVNULL)
        cas = sorted(Path("/usr/local/share/ca-certificates").glob("*.crt"))
        for ca in cas:  # outbound HTTPS here passes a proxy whose CA the build must trust
            shutil.copy2(ca, rootfs / "usr/local/share/ca-certificates" / ca.name)
        run(["chroot", str(rootfs), "update-ca-certificates"], stdout=subprocess.DEVNULL)
        for cache in ("var/cache/apt/archives", "var/lib/apt/lists"):
            shutil.rmtree(rootfs / cache, ignore_errors=True)
        (rootfs / "opt/wheels").mkdir(parents=True, exist_ok=True)
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        run(["podman", "import", "--change", "ENV PIP_BREAK_SYSTEM_PACKAGES=1",
             "--change", "ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt",
             "--change", "ENV UV_FIND_LINKS=/opt/wheels", "--change", "ENV UV_NO_CACHE=1",
             "--change", "ENV UV_OVERRIDE=/opt/wheels/overrides.txt",
             "--change", "CMD [\"/bin/bash\"]", "-", name], stdin=tar.stdout, env=env, stdout=subprocess.DEVNULL)
        tar.wait()
    return name


def _pins() -> dict[str, str]:
    """requirements.txt's exact pins, by canonical package name."""
    lines = (ROOT / "requirements.txt").read_text().splitlines()
    requirements = [Requirement(line.split("#")[0]) for line in lines if line.split("#")[0].strip()]
    return {canonicalize_name(r.name): s.version for r in requirements for s in r.specifier if s.operator == "=="}


def image_wheels() -> Path:
    """build/wheels with the CPU torch wheel and a wheel of each package in ``SOURCE_ONLY``, at their pins, and uv's
    overrides for the image (``IMAGE_OVERRIDES``)."""
    pins, dest = _pins(), BUILD / "wheels"
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "overrides.txt").write_text(IMAGE_OVERRIDES)
    pip = [sys.executable, "-m", "pip"]
    run([*pip, "download", "--quiet", "--no-deps", "--only-binary=:all:", f"torch=={pins['torch']}", "-d", str(dest)])
    wheels = sorted(dest.glob(f"torch-{pins['torch']}*.whl"))
    if not any("+cpu" in w.name for w in wheels):
        sys.exit(
            f"pip resolved torch=={pins['torch']} to {[w.name for w in wheels]}, not a CPU build: configure pip for "
            "the PyTorch CPU wheels (extra-index-url https://download.pytorch.org/whl/cpu) and try again"
        )
    for name in SOURCE_ONLY:
        if not list(dest.glob(f"{name}-{pins[name]}-*.whl")):
            log.info("building a wheel of %s==%s (with this machine's compiler; the image has none)", name, pins[name])
            run([*pip, "wheel", "--quiet", "--no-deps", f"{name}=={pins[name]}", "-w", str(dest)])
    for wheel in dest.glob("*.whl"):
        name, version = parse_wheel_filename(wheel.name)[:2]
        if version.public != pins.get(name):
            wheel.unlink()  # an earlier pin's wheel would be a second candidate for uv
    return dest


# BentoML's own Dockerfile with one line changed. Naming a template keeps BentoML on its v1 image path, which
# builds on the base image as it is; the v2 path (taken without one) first apt-installs build-essential and git
# (~300 MB) that no package here needs, since every dependency is a binary wheel. The one change: no bytecode
# compiled at build time (338 MB in the image); Python compiles what it imports at first start instead.
DOCKERFILE_TEMPLATE = """{% extends bento_base_template %}
{% block SETUP_BENTO_COMPONENTS %}{{ super() | replace("ENV UV_COMPILE_BYTECODE=1", "ENV UV_COMPILE_BYTECODE=0") }}\
{% endblock %}
"""


def image_bentofile(base_image: str | None) -> Path:
    """bentofile.yaml with the local base image, where there is one."""
    spec = yaml.safe_load((ROOT / "bentofile.yaml").read_text())
    if base_image:
        template = BUILD / "Dockerfile.template"
        template.write_text(DOCKERFILE_TEMPLATE)
        spec.setdefault("docker", {}).update(
            base_image=base_image, dockerfile_template=f"./{template.relative_to(ROOT)}"
        )
    out = BUILD / "bentofile.image.yaml"
    out.write_text(yaml.safe_dump(spec, sort_keys=False))
    return out


def bentoml_build(bentofile: Path) -> str:
    cmd = [sys.executable, "-m", "bentoml", "build", "-f", str(bentofile), "--output", "tag", str(ROOT)]
    log.info("$ %s", " ".join(cmd))
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        sys.exit(f"bentoml build failed:\n{out.stderr[-3000:]}")
    return out.stdout.strip().splitlines()[-1].removeprefix("__tag__:")


def containerize(tag: str, image: str, backend: str, env: dict, wheels: Path | None = None) -> None:
    """``bentoml containerize`` with a progress bar over the build's steps; the full output goes to a log file.
    ``wheels`` is mounted read-only at /opt/wheels for the build's steps, so the wheels are not in the image."""
    cmd = [sys.executable, "-m", "bentoml", "containerize", tag, "--backend", backend, "-t", image]
    if backend != "docker":
        cmd += ["--opt", "network=host"]
    if wheels:
        cmd += ["--opt", f"volume={wheels.resolve()}:/opt/wheels:ro"]
    logfile = BUILD / "image-build.log"
    # containerize copies the Bento to $TMPDIR and then refuses a dockerfile_template outside the working
    # directory (BentoML 1.4.39), so the copy must land under it.
    tmp = BUILD / "tmp"
    tmp.mkdir(exist_ok=True)
    env = {**env, "TMPDIR": str(tmp)}
    log.info("$ %s  (output: %s)", " ".join(cmd), logfile)
    step = re.compile(r"^(?:INFO: )?STEP (\d+)/(\d+)")
    with logfile.open("w") as fh, tqdm(desc="building image", unit="step") as bar:
        proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:
            fh.write(line)
            if m := step.match(line):
                bar.total = int(m.group(2))
                bar.n = int(m.group(1)) - 1
                bar.set_postfix_str(line.split(":", 1)[1].strip()[:60])
                bar.refresh()
        if proc.wait() != 0:
            sys.exit(
                f"containerize failed; the last lines of {logfile}:\n"
                + "".join(logfile.read_text().splitlines(True)[-30:])
            )
        bar.n = bar.total or bar.n
        bar.refresh()


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--export", type=Path, help="also save the image as an OCI archive (.tar) for a server")
    ap.add_argument("--rebuild-base", action="store_true", help="make the local base image again")
    args = ap.parse_args(argv)
    t0 = time.monotonic()
    BUILD.mkdir(exist_ok=True)
    if docker_engine_answers():
        backend, env, base, wheels = "docker", dict(os.environ), None, None
    else:
        backend, env = "podman", ensure_podman()
        base, wheels = ensure_base_image(env, args.rebuild_base), image_wheels()
    bento_tag = bentoml_build(image_bentofile(base))
    version = bento_tag.split(":")[1]
    image = f"{IMAGE}:{version}"
    log.info("built bento %s; containerizing into %s", bento_tag, image)
    containerize(bento_tag, image, backend, env, wheels)
    tool = "docker" if backend == "docker" else "podman"
    run([tool, "tag", image, f"{IMAGE}:latest"], env=env)
    size = subprocess.run(
        [tool, "image", "inspect", image, "--format", "{{.Size}}"], env=env, capture_output=True, text=True
    ).stdout.strip()
    log.info("image %s: %.2f GB, built in %.0f s", image, int(size) / 1e9, time.monotonic() - t0)
    if args.export:
        args.export.parent.mkdir(parents=True, exist_ok=True)
        run(
            [tool, "save", "--format", "oci-archive", "-o", str(args.export), image]
            if tool == "podman"
            else [tool, "save", "-o", str(args.export), image],
            env=env,
        )
        log.info(
            "exported %s (%.2f GB): copy it to a server and `podman load -i` it",
            args.export,
            args.export.stat().st_size / 1e9,
        )
    print(image)  # the one line a calling script reads
    return 0


if __name__ == "__main__":
    sys.exit(main())
