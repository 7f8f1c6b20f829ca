"""Fetch a user's model artifact from a local path, a URL or the Hugging Face Hub, verify it, and unpack it safely.

Downloads stream to a temporary file with a connect/read timeout, a size cap and a progress bar; a sha256, when
given, must match before anything is loaded. Zip files are unpacked only if no member would land outside the
target folder, none is a link, and the whole unpacks to no more than the download limit. Hub repositories (for
transformers models) come through huggingface_hub's cache, safetensors only.
"""

from __future__ import annotations

import hashlib
import logging
import re
import shutil
import stat
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


# owner/name[@revision], as the Hugging Face Hub names a repository
HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<revision>[\w./-]+))?$")


def hub_id(source: str) -> re.Match | None:
    """A Hugging Face Hub id (``facebook/mask2former-swin-small-cityscapes-semantic``, optionally ``@revision``), if
    ``source`` is one and no local path of that name exists."""
    return None if Path(source).expanduser().exists() or is_url(source) else HUB_ID.match(source)


def hub_snapshot(repo: str, revision: str | None) -> Path:
    """A Hub repository's configuration and safetensors weights, through ``huggingface_hub`` (its cache, and
    ``HF_HUB_OFFLINE=1`` to use only what the cache holds). Pickled weights are never fetched or loaded."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    where = f"{repo}@{revision or 'main'}"
    try:
        path = Path(snapshot_download(repo, revision=revision, allow_patterns=["*.json", "*.safetensors"]))
    except LocalEntryNotFoundError:
        raise ArtifactError(f"{where} is not in the Hugging Face cache and the Hub cannot be reached (offline?); "
                            "download it where the Hub is reachable, or give a local save_pretrained folder") from None
    except (HfHubHTTPError, OSError, ValueError) as e:
        raise ArtifactError(f"could not fetch {where} from the Hugging Face Hub: {e}") from None
    if not (path / "config.json").exists():
        raise ArtifactError(f"{where} has no config.json: not a transformers model repository")
    if not any(path.glob("*.safetensors")):
        raise ArtifactError(f"{where} has only pickled weights (pytorch_model.bin), which this project never loads; "
                            "use a revision that has model.safetensors (the Hub's safetensors conversion is usually "
                            f"a pull request: {repo}@refs/pr/N), or convert it and give the folder")
    return path


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
            with (
                dest.open("wb") as fh,
                tqdm(total=total or None, unit="B", unit_scale=True, desc=f"downloading {name}") as bar,
            ):
                for chunk in r.iter_content(1 << 20):
                    done += len(chunk)
                    if done > max_bytes:
                        raise ArtifactError(f"{url} sent more than the download limit of {max_bytes:,} bytes")
                    fh.write(chunk)
                    bar.update(len(chunk))
    except requests.RequestException as e:
        raise ArtifactError(f"could not download {url}: {e}") from None
    return dest


def safe_unzip(archive: Path, dest: Path, max_bytes: int | None = None) -> Path:
    """Unpack ``archive`` into ``dest``; returns the folder holding config.json (the zip's root or its one subfolder).

    Refused before anything is written: a member that would land outside ``dest``, a link, or more than
    ``max_bytes`` uncompressed in all (default ``SEG_MAX_DOWNLOAD_BYTES``: a zip bomb)."""
    max_bytes = max_bytes or settings().max_download_bytes
    try:
        with zipfile.ZipFile(archive) as zf:
            root = dest.resolve()
            members = zf.infolist()
            for member in members:
                target = (dest / member.filename).resolve()
                if not target.is_relative_to(root):
                    raise ArtifactError(
                        f"{archive.name} holds {member.filename!r}, which would land outside the unpack folder"
                    )
                if stat.S_ISLNK(member.external_attr >> 16):
                    raise ArtifactError(f"{archive.name} holds a link, {member.filename!r}; links are not unpacked")
            total = sum(m.file_size for m in members)
            if total > max_bytes:
                raise ArtifactError(
                    f"{archive.name} unpacks to {total:,} bytes; the limit is {max_bytes:,} (SEG_MAX_DOWNLOAD_BYTES)"
                )
            zf.extractall(dest)
    except zipfile.BadZipFile:
        raise ArtifactError(f"{archive.name} is not a valid zip file") from None
    candidates = [p.parent for p in dest.rglob("config.json")]
    if len(candidates) != 1:
        raise ArtifactError(
            f"{archive.name} must hold exactly one save_pretrained folder (config.json); found {len(candidates)}"
        )
    return candidates[0]


class Fetched:
    """A context manager: the local path of an artifact (downloaded and/or unpacked into a temp dir if needed)."""

    def __init__(self, source: str, expected_sha256: str | None = None, hub: bool = False):
        """``hub``: a ``owner/name[@revision]`` that is no local path names a Hugging Face Hub repository."""
        self.source = source
        self.hub = hub
        self.expected = expected_sha256.lower() if expected_sha256 else None
        self._tmp: str | None = None
        self.path: Path | None = None
        self.sha256: str | None = None

    def __enter__(self) -> "Fetched":
        self._tmp = tempfile.mkdtemp(prefix="seg-artifact-")
        try:
            if is_url(self.source):
                path = download(self.source, Path(self._tmp))
            elif self.hub and (hub := hub_id(self.source)):
                path = hub_snapshot(hub["repo"], hub["revision"])
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
