"""Fetch a user's model artifact from a local path or a URL, verify it, and unpack it safely.

Downloads stream to a temporary file with a connect/read timeout, a size cap and a progress bar; a sha256, when
given, must match before anything is loaded. Zip files are unpacked only if no member would land outside the
target folder.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import tempfile
import zipfile
from pathlib import Path
from urllib.parse import urlparse

import requests
from tqdm.auto import tqdm

from .settings import settings

log = logging.getLogger(__name__)

TIMEOUT_S = (10.0, 60.0)  # connect, read (between bytes)


class ArtifactError(Exception):
    """An artifact could not be fetched, verified or unpacked. The message says which and why."""


def is_url(source: str) -> bool:
    return urlparse(source).scheme in ("http", "https")


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    if path.is_dir():  # a folder: hash its files in a fixed order, names included
        for f in sorted(p for p in path.rglob("*") if p.is_file()):
            h.update(str(f.relative_to(path)).encode())
            h.update(sha256_of(f).encode())
        return h.hexdigest()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download(url: str, dest_dir: Path, max_bytes: int | None = None) -> Path:
    """Stream ``url`` into ``dest_dir``, refusing more than ``max_bytes`` (default ``SEG_MAX_DOWNLOAD_BYTES``)."""
    max_bytes = max_bytes or settings().max_download_bytes
    name = Path(urlparse(url).path).name or "artifact"
    dest = dest_dir / name
    try:
        with requests.get(url, stream=True, timeout=TIMEOUT_S) as r:
            r.raise_for_status()
            total = int(r.headers.get("content-length") or 0)
            if total > max_bytes:
                raise ArtifactError(f"{url} is {total:,} bytes; the download limit is {max_bytes:,}")
            done = 0
            with dest.open("wb") as fh, tqdm(total=total or None, unit="B", unit_scale=True, desc=f"downloading {name}") as bar:
                for chunk in r.iter_content(1 << 20):
                    done += len(chunk)
                    if done > max_bytes:
                        raise ArtifactError(f"{url} sent more than the download limit of {max_bytes:,} bytes")
                    fh.write(chunk)
                    bar.update(len(chunk))
    except requests.RequestException as e:
        raise ArtifactError(f"could not download {url}: {e}") from None
    return dest


def safe_unzip(archive: Path, dest: Path) -> Path:
    """Unpack ``archive`` into ``dest``; returns the folder holding config.json (the zip's root or its one subfolder)."""
    try:
        with zipfile.ZipFile(archive) as zf:
            root = dest.resolve()
            for member in zf.namelist():
                target = (dest / member).resolve()
                if not target.is_relative_to(root):
                    raise ArtifactError(f"{archive.name} holds {member!r}, which would land outside the unpack folder")
            zf.extractall(dest)
    except zipfile.BadZipFile:
        raise ArtifactError(f"{archive.name} is not a valid zip file") from None
    candidates = [p.parent for p in dest.rglob("config.json")]
    if len(candidates) != 1:
        raise ArtifactError(f"{archive.name} must hold exactly one save_pretrained folder (config.json); found {len(candidates)}")
    return candidates[0]


class Fetched:
    """A context manager: the local path of an artifact (downloaded and/or unpacked into a temp dir if needed)."""

    def __init__(self, source: str, expected_sha256: str | None = None):
        self.source = source
        self.expected = expected_sha256.lower() if expected_sha256 else None
        self._tmp: str | None = None
        self.path: Path | None = None
        self.sha256: str | None = None

    def __enter__(self) -> "Fetched":
        self._tmp = tempfile.mkdtemp(prefix="seg-artifact-")
        try:
            if is_url(self.source):
                path = download(self.source, Path(self._tmp))
            else:
                path = Path(self.source).expanduser()
                if not path.exists():
                    raise ArtifactError(f"{self.source} does not exist")
            self.sha256 = sha256_of(path)
            if self.expected and self.sha256 != self.expected:
                raise ArtifactError(f"sha256 mismatch for {self.source}: expected {self.expected}, got {self.sha256}")
            if path.is_file() and path.suffix == ".zip":
                path = safe_unzip(path, Path(self._tmp) / "unzipped")
            self.path = path
            return self
        except BaseException:
            self.__exit__(None, None, None)
            raise

    def __exit__(self, *exc) -> None:
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None
