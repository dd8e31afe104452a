"""Downloads against a loopback HTTP server: complete, resumed after a cut, wrong bytes, 404, unsafe archives."""

import hashlib
import io
import json
import logging
import tarfile
import threading
import zipfile
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from evpretrain.data.download import MARKER, DownloadError, Extract, RemoteFile, Retry, download_dataset, download_files
from evpretrain.data.registry import get_dataset

FAST = Retry(attempts=3, backoff_s=0.0, timeout_s=5.0)


class Loopback:
    """Files served on 127.0.0.1 with Range support; ``cut_once`` names files whose first response stops after
    ``cut_at`` bytes, ``wrong`` files served with other bytes. ``requests`` records (path, Range header)."""

    def __init__(self):
        self.files, self.wrong, self.cut_once, self.cut_at, self.requests = {}, {}, set(), 0, []
        loopback = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                name = self.path.lstrip("/")
                loopback.requests.append((self.path, self.headers.get("Range")))
                if name not in loopback.files:
                    self.send_error(404, "Not Found")
                    return
                data = loopback.wrong.get(name, loopback.files[name])
                start = int(self.headers["Range"].removeprefix("bytes=").rstrip("-")) if "Range" in self.headers else 0
                self.send_response(206 if start else 200)
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                if name in loopback.cut_once:
                    loopback.cut_once.discard(name)
                    self.wfile.write(data[start : loopback.cut_at])  # then the connection closes (HTTP/1.0)
                    return
                self.wfile.write(data[start:])

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, args=(0.01,), daemon=True).start()

    def serve(self, name, data):
        self.files[name] = data
        return RemoteFile(url=f"{self.url}/{name}", name=name, md5=hashlib.md5(data).hexdigest())


@pytest.fixture
def server():
    loopback = Loopback()
    yield loopback
    loopback.server.shutdown()
    loopback.server.server_close()


def zip_bytes(members):
    """A zip archive of {name: bytes}."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def digits_zip():
    # N-MNIST's train.zip layout: Train/<digit>/<n>.bin; 300 kB so that a cut falls inside the transfer
    return zip_bytes({"Train/0/00001.bin": bytes(range(256)) * 600, "Train/1/00002.bin": b"\x01\x02\x03\x04\x05"})


def test_a_complete_download_is_verified_unpacked_and_recorded(server, tmp_path):
    data = digits_zip()
    spec = replace(server.serve("train.zip", data), extract=Extract(into=".", format="zip"))
    record = download_files("n-mnist", [spec], tmp_path, retry=FAST, progress=False)
    assert (tmp_path / "Train/0/00001.bin").read_bytes() == bytes(range(256)) * 600
    assert (tmp_path / "Train/1/00002.bin").read_bytes() == b"\x01\x02\x03\x04\x05"
    assert (tmp_path / "archives/train.zip").read_bytes() == data
    marker = json.loads((tmp_path / MARKER).read_text())
    assert marker == record
    assert marker["files"] == [
        {"name": "train.zip", "md5": hashlib.md5(data).hexdigest(), "url": spec.url, "size": len(data)}
    ]
    assert not list(tmp_path.glob("**/*.part")) and not list(tmp_path.glob(".extracting-*"))


def test_a_download_cut_mid_file_resumes_with_a_range_request(server, tmp_path):
    data = digits_zip()
    spec = replace(server.serve("train.zip", data), extract=Extract(into=".", format="zip"))
    server.cut_once, server.cut_at = {"train.zip"}, 100_000
    download_files("n-mnist", [spec], tmp_path, retry=FAST, progress=False)
    assert server.requests == [("/train.zip", None), ("/train.zip", "bytes=100000-")]
    assert (tmp_path / "archives/train.zip").read_bytes() == data
    assert (tmp_path / "Train/0/00001.bin").is_file()


def test_a_checksum_mismatch_names_both_digests_and_leaves_nothing(server, tmp_path):
    data = digits_zip()
    spec = replace(server.serve("train.zip", data), extract=Extract(into=".", format="zip"))
    wrong = data[:-1] + bytes([data[-1] ^ 0xFF])
    server.wrong["train.zip"] = wrong
    with pytest.raises(DownloadError) as caught:
        download_files("n-mnist", [spec], tmp_path, retry=FAST, progress=False)
    message = str(caught.value)
    assert "train.zip" in message and spec.url in message
    assert f"expected md5 {hashlib.md5(data).hexdigest()}" in message
    assert f"got {hashlib.md5(wrong).hexdigest()}" in message
    left = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*"))
    assert left == ["archives"]  # no .part, no half-named final file, nothing extracted, no marker


def test_a_404_names_the_url_and_the_registrys_other_ways(server, tmp_path):
    entry = get_dataset("n-mnist")
    missing = RemoteFile(url=f"{server.url}/gone.zip", name="gone.zip", md5="0" * 32, extract=Extract(format="zip"))
    with pytest.raises(DownloadError) as caught:
        download_dataset(replace(entry, files=[missing]), tmp_path, retry=FAST, progress=False)
    message = str(caught.value)
    assert f"{server.url}/gone.zip: HTTP 404" in message
    assert entry.obtain in message
    assert server.requests == [("/gone.zip", None)]  # a 404 is not retried


def test_a_dataset_behind_a_form_stops_with_its_steps_and_the_folder(tmp_path):
    entry = get_dataset("n-cars")
    with pytest.raises(DownloadError) as caught:
        download_dataset(entry, tmp_path / "n-cars")
    message = str(caught.value)
    assert entry.obtain in message and entry.authors_copy in message
    assert str((tmp_path / "n-cars").resolve()) in message and "data.roots.n-cars" in message


def tar_bytes(add):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        good = tarfile.TarInfo("good.txt")
        good.size = 4
        archive.addfile(good, io.BytesIO(b"good"))
        add(archive)
    return buffer.getvalue()


def _tar_member(name, kind=tarfile.REGTYPE, linkname=""):
    def add(archive):
        info = tarfile.TarInfo(name)
        info.type, info.linkname, info.size = kind, linkname, 0 if kind != tarfile.REGTYPE else 4
        archive.addfile(info, io.BytesIO(b"evil") if kind == tarfile.REGTYPE else None)

    return add


def _zip_symlink():
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("good.txt", b"good")
        link = zipfile.ZipInfo("link")
        link.external_attr = 0o120777 << 16
        archive.writestr(link, "/etc/passwd")
    return buffer.getvalue()


UNSAFE = {
    "zip-dotdot": ("zip", lambda: zip_bytes({"good.txt": b"good", "../evil.txt": b"evil"}), "'..'"),
    "zip-absolute": ("zip", lambda: zip_bytes({"good.txt": b"good", "/tmp/evil.txt": b"evil"}), "absolute"),
    "zip-symlink": ("zip", _zip_symlink, "symbolic link"),
    "tar-dotdot": ("tar", lambda: tar_bytes(_tar_member("a/../../evil.txt")), "'..'"),
    "tar-absolute": ("tar", lambda: tar_bytes(_tar_member("/tmp/evil.txt")), "absolute"),
    "tar-symlink": ("tar", lambda: tar_bytes(_tar_member("link", tarfile.SYMTYPE, "/etc")), "a link"),
    "tar-hardlink": ("tar", lambda: tar_bytes(_tar_member("hard", tarfile.LNKTYPE, "good.txt")), "a link"),
    "tar-device": ("tar", lambda: tar_bytes(_tar_member("dev", tarfile.CHRTYPE)), "a device"),
}


@pytest.mark.parametrize("case", sorted(UNSAFE))
def test_an_unsafe_archive_is_refused_before_anything_is_extracted(server, tmp_path, case):
    format, build, reason = UNSAFE[case]
    folder = tmp_path / "download"
    spec = replace(server.serve(f"{case}.{format}", build()), extract=Extract(into="data", format=format))
    with pytest.raises(DownloadError, match=f"unsafe archive, nothing was extracted: .*{reason}"):
        download_files("x", [spec], folder, retry=FAST, progress=False)
    assert not (folder / "data").exists() and not list(folder.glob(".extracting-*"))
    assert not (tmp_path / "evil.txt").exists() and not (folder / MARKER).exists()


def test_nested_archives_are_unpacked_in_place_and_removed(server, tmp_path):
    inner = zip_bytes({"airplane/a.aedat4": b"events"})
    spec = replace(
        server.serve("outer.zip", zip_bytes({"airplane.zip": inner})),
        extract=Extract(into="CIFAR10-DVS", format="zip", nested="*.zip"),
    )
    download_files("cifar10-dvs", [spec], tmp_path, retry=FAST, progress=False)
    assert sorted(
        p.relative_to(tmp_path / "CIFAR10-DVS").as_posix() for p in (tmp_path / "CIFAR10-DVS").rglob("*")
    ) == [
        "airplane",
        "airplane/a.aedat4",
    ]


def test_a_second_call_makes_no_request_and_a_kept_archive_is_not_fetched_again(server, tmp_path):
    spec = replace(server.serve("train.zip", digits_zip()), extract=Extract(into=".", format="zip"))
    download_files("n-mnist", [spec], tmp_path, retry=FAST, progress=False)
    assert len(server.requests) == 1
    download_files("n-mnist", [spec], tmp_path, retry=FAST, progress=False)
    assert len(server.requests) == 1  # the marker says it is complete
    (tmp_path / MARKER).unlink()
    (tmp_path / "Train").rename(tmp_path / "gone")
    download_files("n-mnist", [spec], tmp_path, retry=FAST, progress=False)
    assert len(server.requests) == 1  # the archive verified by its sidecar: unpacked again, not fetched
    assert (tmp_path / "Train/1/00002.bin").is_file() and (tmp_path / MARKER).is_file()


def test_a_plain_file_through_a_mirror_with_log_lines_off_a_terminal(server, tmp_path, caplog):
    data = b"weights" * 300_000  # 2.1 MB: more than one block read
    spec = RemoteFile(url="https://example.invalid/models/ViT-B-16.pt", name="ViT-B-16.pt",
                      sha256=hashlib.sha256(data).hexdigest())  # fmt: skip
    server.files["ViT-B-16.pt"] = data
    with caplog.at_level(logging.INFO, logger="evpretrain.data.download"):
        download_files("clip_vit_b16", [spec], tmp_path, mirror=server.url + "/", retry=FAST, progress=False)
    assert (tmp_path / "ViT-B-16.pt").read_bytes() == data
    assert server.requests == [("/ViT-B-16.pt", None)]
    assert "ViT-B-16.pt: 1.0 MB (50%)" in caplog.text and "ViT-B-16.pt: 2.1 MB (100%)" in caplog.text
