import hashlib
import http.server
import threading
import zipfile
from functools import partial

import pytest

from segmentation.artifacts import ArtifactError, Fetched, download, safe_unzip


@pytest.fixture
def http_dir(tmp_path):
    """A real HTTP server on loopback serving ``tmp_path / 'www'``."""
    www = tmp_path / "www"
    www.mkdir()
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(www))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield www, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_download_streams_the_file(http_dir, tmp_path):
    www, url = http_dir
    (www / "w.bin").write_bytes(b"abc" * 1000)
    out = tmp_path / "out"
    out.mkdir()
    assert download(f"{url}/w.bin", out).read_bytes() == b"abc" * 1000


def test_download_over_the_cap_is_refused(http_dir, tmp_path):
    www, url = http_dir
    (www / "big.bin").write_bytes(b"x" * 5000)
    with pytest.raises(ArtifactError, match="limit"):
        download(f"{url}/big.bin", tmp_path, max_bytes=1000)


def test_a_missing_url_names_the_problem(http_dir, tmp_path):
    _, url = http_dir
    with pytest.raises(ArtifactError, match="404"):
        download(f"{url}/nope.keras", tmp_path)


def test_sha256_is_checked_before_anything_is_used(tmp_path):
    f = tmp_path / "w.pth"
    f.write_bytes(b"weights")
    good = hashlib.sha256(b"weights").hexdigest()
    with Fetched(str(f), good) as fetched:
        assert fetched.sha256 == good
    with pytest.raises(ArtifactError, match="sha256 mismatch"):
        with Fetched(str(f), "0" * 64):
            pass


def test_missing_local_file(tmp_path):
    with pytest.raises(ArtifactError, match="does not exist"):
        with Fetched(str(tmp_path / "absent.keras")):
            pass


def test_zip_slip_is_refused(tmp_path):
    z = tmp_path / "evil.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("../../outside.txt", "x")
    with pytest.raises(ArtifactError, match="outside"):
        safe_unzip(z, tmp_path / "out")
    assert not (tmp_path.parent / "outside.txt").exists()


def test_zip_of_a_save_pretrained_folder_unpacks_to_that_folder(tmp_path):
    z = tmp_path / "m.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("mask2former_cityscapes/config.json", "{}")
        zf.writestr("mask2former_cityscapes/model.safetensors", "")
    folder = safe_unzip(z, tmp_path / "out")
    assert folder.name == "mask2former_cityscapes" and (folder / "config.json").exists()


def test_a_zip_bomb_is_refused_before_anything_is_unpacked(tmp_path):
    z = tmp_path / "bomb.zip"
    with zipfile.ZipFile(z, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("m/config.json", "{}")
        zf.writestr("m/model.safetensors", b"\x00" * (8 * 1024 * 1024))  # 8 MB that packs to a few KB
    assert z.stat().st_size < 100_000
    with pytest.raises(ArtifactError, match="unpacks to 8,388,6.. bytes; the limit is 1,000,000"):
        safe_unzip(z, tmp_path / "out", max_bytes=1_000_000)
    assert not (tmp_path / "out").exists()


def test_links_inside_a_zip_are_refused(tmp_path):
    z = tmp_path / "link.zip"
    with zipfile.ZipFile(z, "w") as zf:
        info = zipfile.ZipInfo("m/model.safetensors")
        info.external_attr = (0o120777 << 16)  # a symbolic link
        zf.writestr(info, "/etc/passwd")
        zf.writestr("m/config.json", "{}")
    with pytest.raises(ArtifactError, match="holds a link"):
        safe_unzip(z, tmp_path / "out")
