"""download_dataset against a real HTTP server on 127.0.0.1: digests are checked before anything
appears, retries and Range resumes really happen, and archives cannot write outside their folder
or expand without bound."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import random
import re
import tarfile
import threading
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from snaketune.download import DownloadSettings, download_dataset
from snaketune.errors import DownloadError
from snaketune.fileio import sha256_file

# --- a real origin server ------------------------------------------------------------------------


@dataclass
class Served:
    """One file on the test server and how it misbehaves."""

    body: bytes
    fail_times: int = 0
    """Answer 500 this many times before serving the body."""
    cut_first_at: int | None = None
    """On the first body response, promise the full length but send only this many bytes."""
    honor_range: bool = True
    chunked: bool = False
    """Send the body with HTTP/1.1 chunked transfer encoding instead of a Content-Length."""


@dataclass
class Seen:
    path: str
    range: str | None
    status: int


class Origin(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), OriginHandler)
        self.files: dict[str, Served] = {}
        self.requests: list[Seen] = []
        self.lock = threading.Lock()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}{path}"

    def serve(self, path: str, body: bytes, **misbehaviour) -> str:
        self.files[path] = Served(body, **misbehaviour)
        return self.url(path)


class OriginHandler(BaseHTTPRequestHandler):
    server: Origin

    def do_GET(self) -> None:  # the name http.server dispatches GET requests to
        with self.server.lock:
            served = self.server.files.get(self.path)
            range_header = self.headers.get("Range")
            status = self._status(served, range_header)
            self.server.requests.append(Seen(self.path, range_header, status))
            cut = None
            if status in (200, 206) and served.cut_first_at is not None:
                cut, served.cut_first_at = served.cut_first_at, None
        if status in (404, 500, 416):
            self._send_empty(status, served)
            return
        start = _range_start(range_header) if status == 206 else 0
        chunk = served.body[start:]
        if served.chunked:
            self.protocol_version = "HTTP/1.1"  # chunked transfer exists from HTTP/1.1 on
        self.send_response(status)
        if served.chunked:
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.send_header("Content-Length", str(len(chunk)))
        if status == 206:
            self.send_header(
                "Content-Range", f"bytes {start}-{len(served.body) - 1}/{len(served.body)}"
            )
        self.end_headers()
        # When cut: promise the whole body, deliver only part of it, then drop the connection.
        self._write_body(chunk if cut is None else chunk[:cut], served.chunked, cut is None)
        self.close_connection = True

    def _write_body(self, data: bytes, chunked: bool, complete: bool) -> None:
        if not chunked:
            self.wfile.write(data)
            return
        for i in range(0, len(data), 4096):
            piece = data[i : i + 4096]
            self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
        if complete:
            self.wfile.write(b"0\r\n\r\n")

    def _status(self, served: Served | None, range_header: str | None) -> int:
        if served is None:
            return 404
        if served.fail_times > 0:
            served.fail_times -= 1
            return 500
        if range_header and served.honor_range:
            return 206 if _range_start(range_header) < len(served.body) else 416
        return 200

    def _send_empty(self, status: int, served: Served | None) -> None:
        self.send_response(status)
        if status == 416:
            self.send_header("Content-Range", f"bytes */{len(served.body)}")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args) -> None:
        pass  # keep pytest output clean


def _range_start(header: str) -> int:
    match = re.fullmatch(r"bytes=(\d+)-", header)
    assert match, f"client sent an unexpected Range header {header!r}"
    return int(match[1])


@pytest.fixture
def origin() -> Iterator[Origin]:
    server = Origin()
    thread = threading.Thread(target=server.serve_forever, args=(0.01,), daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch):
    # urllib honours *_proxy variables; a proxy from the environment must not see loopback calls.
    for name in (
        "http_proxy",
        "https_proxy",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "all_proxy",
        "ALL_PROXY",
    ):
        monkeypatch.delenv(name, raising=False)


# --- helpers -------------------------------------------------------------------------------------


def payload(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def settings_for(url: str, body: bytes, **overrides) -> DownloadSettings:
    return DownloadSettings(
        url=url, sha256=sha256_bytes(body), backoff_seconds=0.01, timeout_seconds=10, **overrides
    )


def paths(tmp_path: Path) -> tuple[Path, Path]:
    return tmp_path / "download" / "files", tmp_path / "download" / "manifest.json"


def part_files(tmp_path: Path) -> list[Path]:
    return sorted(tmp_path.rglob("*.part"))


def gzipped(data: bytes) -> bytes:
    return gzip.compress(data, mtime=0)


def write_input(tmp_path: Path, name: str, data: bytes) -> Path:
    source = tmp_path / "inputs" / name
    source.parent.mkdir(parents=True, exist_ok=True)
    source.write_bytes(data)
    return source


def add_tar_file(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    archive.addfile(info, io.BytesIO(data))


def archive_of(kind: str, members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    if kind == "zip":
        with zipfile.ZipFile(buffer, "w") as archive:
            for name, data in members.items():
                archive.writestr(name, data)
    else:
        with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
            for name, data in members.items():
                add_tar_file(archive, name, data)
    return buffer.getvalue()


# --- plain http ----------------------------------------------------------------------------------


def test_http_download_checks_sha256_and_writes_manifest(origin, tmp_path):
    body = payload(300_000)
    url = origin.serve("/data/corpus.txt", body)
    out, manifest = paths(tmp_path)

    files = download_dataset(settings_for(url, body), out, manifest)

    assert files == ["corpus.txt"]
    assert (out / "corpus.txt").read_bytes() == body
    record = json.loads(manifest.read_text())
    assert record["stage"] == "download"
    assert record["outputs"] == {"corpus.txt": sha256_bytes(body)}
    assert record["counts"] == {"files": 1, "fetched_bytes": len(body)}
    assert record["fetched_sha256"] == sha256_bytes(body)
    assert [(r.range, r.status) for r in origin.requests] == [(None, 200)]
    assert part_files(tmp_path) == []  # the verified .part is removed once unpacked


def test_uppercase_sha256_in_config_is_accepted(origin, tmp_path):
    body = payload(1000)
    url = origin.serve("/a.txt", body)
    settings = DownloadSettings(url=url, sha256=sha256_bytes(body).upper(), backoff_seconds=0.01)
    assert download_dataset(settings, *paths(tmp_path)) == ["a.txt"]


def test_sha256_mismatch_names_both_digests_and_leaves_nothing(origin, tmp_path):
    body = payload(50_000)
    expected = sha256_bytes(b"what the config promised")
    url = origin.serve("/corpus.txt", body)
    out, manifest = paths(tmp_path)
    settings = DownloadSettings(url=url, sha256=expected, backoff_seconds=0.01)

    with pytest.raises(DownloadError) as caught:
        download_dataset(settings, out, manifest)

    message = str(caught.value)
    assert url in message
    assert f"expected {expected}" in message
    assert f"got {sha256_bytes(body)}" in message
    assert not out.exists()
    assert not manifest.exists()
    # A corrupt partial must not be resumed by the next run.
    assert part_files(tmp_path) == []


def test_http_404_fails_at_once_without_retrying(origin, tmp_path):
    url = origin.url("/missing.txt")
    settings = DownloadSettings(url=url, sha256="0" * 64, retries=4, backoff_seconds=0.01)
    out, manifest = paths(tmp_path)

    with pytest.raises(DownloadError, match=r"HTTP 404") as caught:
        download_dataset(settings, out, manifest)

    assert url in str(caught.value)
    assert len(origin.requests) == 1
    assert not out.exists() and part_files(tmp_path) == []


def test_http_500_twice_then_success_after_three_requests(origin, tmp_path):
    body = payload(20_000)
    url = origin.serve("/flaky.txt", body, fail_times=2)
    out, manifest = paths(tmp_path)

    download_dataset(settings_for(url, body, retries=4), out, manifest)

    assert [r.status for r in origin.requests] == [500, 500, 200]
    assert (out / "flaky.txt").read_bytes() == body


def test_http_500_beyond_retries_gives_up_and_says_how_often(origin, tmp_path):
    body = payload(1000)
    url = origin.serve("/down.txt", body, fail_times=10)

    with pytest.raises(DownloadError) as caught:
        download_dataset(settings_for(url, body, retries=2), *paths(tmp_path))

    assert "after 3 attempts" in str(caught.value) and "HTTP 500" in str(caught.value)
    assert [r.status for r in origin.requests] == [500, 500, 500]


# --- interrupted transfers -----------------------------------------------------------------------


def test_cut_connection_is_retried_with_a_range_request(origin, tmp_path):
    body = payload(400_000, seed=1)
    cut = 123_457
    url = origin.serve("/big.bin", body, cut_first_at=cut)
    out, manifest = paths(tmp_path)

    download_dataset(settings_for(url, body, retries=2), out, manifest)

    # The second request asks only for the bytes the first one did not deliver.
    assert [(r.range, r.status) for r in origin.requests] == [(None, 200), (f"bytes={cut}-", 206)]
    assert sha256_file(out / "big.bin") == sha256_bytes(body)
    assert part_files(tmp_path) == []


def test_rerun_after_a_failed_download_resumes_the_part_file(origin, tmp_path):
    body = payload(200_000, seed=2)
    cut = 70_000
    url = origin.serve("/big.bin", body, cut_first_at=cut)
    out, manifest = paths(tmp_path)

    with pytest.raises(DownloadError, match=rf"resume from {cut} bytes"):
        download_dataset(settings_for(url, body, retries=0), out, manifest)
    (part,) = part_files(tmp_path)
    assert part.stat().st_size == cut
    assert not out.exists()

    download_dataset(settings_for(url, body, retries=0), out, manifest)

    assert [r.range for r in origin.requests] == [None, f"bytes={cut}-"]
    assert (out / "big.bin").read_bytes() == body


def test_server_that_ignores_range_makes_the_download_start_over(origin, tmp_path):
    body = payload(100_000, seed=3)
    url = origin.serve("/big.bin", body, cut_first_at=30_000, honor_range=False)
    out, manifest = paths(tmp_path)

    download_dataset(settings_for(url, body, retries=1), out, manifest)

    # Range was asked for, the server answered 200 with everything: appending would corrupt it.
    assert [(r.range, r.status) for r in origin.requests] == [(None, 200), ("bytes=30000-", 200)]
    assert (out / "big.bin").read_bytes() == body


def test_cut_chunked_response_is_retried_not_raised_raw(origin, tmp_path):
    # Without a Content-Length the client learns of the cut from http.client.IncompleteRead.
    body = payload(100_000, seed=7)
    url = origin.serve("/stream.bin", body, cut_first_at=40_000, chunked=True)
    out, manifest = paths(tmp_path)

    download_dataset(settings_for(url, body, retries=1), out, manifest)

    assert [r.status for r in origin.requests] == [200, 200]
    assert (out / "stream.bin").read_bytes() == body


def test_cut_chunked_response_without_retries_is_a_download_error(origin, tmp_path):
    body = payload(50_000, seed=8)
    url = origin.serve("/stream.bin", body, cut_first_at=20_000, chunked=True)

    with pytest.raises(DownloadError, match=r"after 1 attempts \(IncompleteRead"):
        download_dataset(settings_for(url, body, retries=0), *paths(tmp_path))


# --- unpacking -----------------------------------------------------------------------------------


def test_gz_is_decompressed_and_digest_is_of_the_fetched_bytes(origin, tmp_path):
    text = b"".join(b'{"text": "line %d"}\n' % i for i in range(1000))
    packed = gzipped(text)
    url = origin.serve("/corpus.jsonl.gz", packed)
    out, manifest = paths(tmp_path)

    files = download_dataset(settings_for(url, packed), out, manifest)

    assert files == ["corpus.jsonl"]
    assert (out / "corpus.jsonl").read_bytes() == text
    record = json.loads(manifest.read_text())
    assert record["outputs"] == {"corpus.jsonl": sha256_bytes(text)}
    assert record["counts"]["fetched_bytes"] == len(packed)
    assert record["fetched_sha256"] == sha256_bytes(packed)


@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
def test_archive_members_are_unpacked_with_their_folders(tmp_path, kind):
    members = {"data/train.txt": b"train rows\n", "README": b"about\n"}
    packed = archive_of(kind, members)
    source = write_input(tmp_path, f"set.{kind}", packed)
    out, manifest = paths(tmp_path)

    files = download_dataset(settings_for(str(source), packed), out, manifest)

    assert sorted(files) == sorted(members)
    assert {f: (out / f).read_bytes() for f in files} == members
    record = json.loads(manifest.read_text())
    assert record["outputs"] == {name: sha256_bytes(data) for name, data in members.items()}
    assert record["counts"] == {"files": 2, "fetched_bytes": len(packed)}


@pytest.mark.parametrize("evil", ["../evil.txt", "inner/../../evil.txt"])
def test_zip_member_escaping_the_folder_is_refused(tmp_path, evil):
    packed = archive_of("zip", {"fine.txt": b"fine", evil: b"owned"})
    source = write_input(tmp_path, "set.zip", packed)
    out, manifest = paths(tmp_path)

    with pytest.raises(DownloadError, match=r"outside") as caught:
        download_dataset(settings_for(str(source), packed), out, manifest)

    assert repr(evil) in str(caught.value)
    assert list(tmp_path.rglob("evil.txt")) == []
    assert list(tmp_path.rglob("fine.txt")) == []  # the half-unpacked temp folder is gone too
    assert not out.exists() and not manifest.exists()


@pytest.mark.parametrize("kind", [tarfile.SYMTYPE, tarfile.LNKTYPE])
def test_tar_gz_with_a_link_member_is_refused(tmp_path, kind):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        add_tar_file(archive, "fine.txt", b"fine")
        link = tarfile.TarInfo("passwd")
        link.type, link.linkname = kind, "/etc/passwd"
        archive.addfile(link)
    source = write_input(tmp_path, "set.tar.gz", buffer.getvalue())
    out, manifest = paths(tmp_path)

    with pytest.raises(DownloadError, match=r"'passwd' is a link; refused"):
        download_dataset(settings_for(str(source), buffer.getvalue()), out, manifest)

    assert not out.exists() and not manifest.exists()
    assert list(tmp_path.rglob("passwd")) == []


def test_tar_member_with_absolute_path_is_refused(tmp_path):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        add_tar_file(archive, str(tmp_path / "abs.txt"), b"owned")
    source = write_input(tmp_path, "set.tar", buffer.getvalue())

    with pytest.raises(DownloadError, match=r"outside"):
        download_dataset(settings_for(str(source), buffer.getvalue()), *paths(tmp_path))

    assert not (tmp_path / "abs.txt").exists()


def test_gz_expanding_past_the_limit_is_refused(tmp_path):
    bomb = gzipped(b"\0" * (3 << 20))  # 3 MiB of zeros pack into a few KiB
    source = write_input(tmp_path, "bomb.txt.gz", bomb)
    out, manifest = paths(tmp_path)
    settings = settings_for(str(source), bomb, max_unpacked_bytes=1_000_000)

    with pytest.raises(DownloadError) as caught:
        download_dataset(settings, out, manifest)

    message = str(caught.value)
    assert "bomb.txt.gz" in message and "max_unpacked_bytes=1000000" in message
    assert not out.exists() and not manifest.exists()
    assert list(tmp_path.rglob("bomb.txt")) == []


def test_zip_limit_counts_all_members_together(tmp_path):
    zipped = io.BytesIO()
    with zipfile.ZipFile(zipped, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("a.txt", b"a" * 600_000)
        archive.writestr("b.txt", b"b" * 600_000)  # each alone fits, both together do not
    source = write_input(tmp_path, "set.zip", zipped.getvalue())
    settings = settings_for(str(source), zipped.getvalue(), max_unpacked_bytes=1_000_000)

    with pytest.raises(DownloadError, match=r"b\.txt expands past max_unpacked_bytes"):
        download_dataset(settings, *paths(tmp_path))


def test_limit_raised_after_a_refused_http_download_succeeds_on_rerun(origin, tmp_path):
    # The refused file was verified, so its .part is kept; the rerun must not ask for bytes
    # past its end (a real server answers that with 416).
    text = b"\0" * (2 << 20)
    packed = gzipped(text)
    url = origin.serve("/bomb.txt.gz", packed)
    out, manifest = paths(tmp_path)

    with pytest.raises(DownloadError, match=r"max_unpacked_bytes"):
        download_dataset(settings_for(url, packed, max_unpacked_bytes=1 << 20), out, manifest)
    files = download_dataset(settings_for(url, packed, max_unpacked_bytes=4 << 20), out, manifest)

    assert files == ["bomb.txt"]
    assert [(r.range, r.status) for r in origin.requests] == [
        (None, 200),
        (f"bytes={len(packed)}-", 416),
    ]
    assert sha256_file(out / "bomb.txt") == sha256_bytes(text)
    assert part_files(tmp_path) == []


def test_whole_but_corrupt_part_file_is_caught_by_the_digest_and_removed(origin, tmp_path):
    body = payload(5000, seed=5)
    url = origin.serve("/data.bin", body)
    out, manifest = paths(tmp_path)
    stale = out.parent / ".partial" / "data.bin.part"  # as left by a job killed after streaming
    stale.parent.mkdir(parents=True)
    stale.write_bytes(payload(5000, seed=6))

    with pytest.raises(DownloadError, match=r"sha256 mismatch"):
        download_dataset(settings_for(url, body), out, manifest)
    assert not stale.exists()
    download_dataset(settings_for(url, body), out, manifest)

    assert [(r.range, r.status) for r in origin.requests] == [("bytes=5000-", 416), (None, 200)]
    assert (out / "data.bin").read_bytes() == body


# --- local files ---------------------------------------------------------------------------------


@pytest.mark.parametrize("as_uri", [False, True], ids=["local-path", "file-url"])
def test_local_path_and_file_url_are_copied(tmp_path, as_uri):
    body = payload(10_000, seed=4)
    source = write_input(tmp_path, "my corpus.txt", body)  # the space is %20 in the file:// URL
    url = source.as_uri() if as_uri else str(source)
    out, manifest = paths(tmp_path)

    files = download_dataset(settings_for(url, body), out, manifest)

    assert files == ["my corpus.txt"]
    assert (out / "my corpus.txt").read_bytes() == body
    assert source.read_bytes() == body  # the source is copied, never moved or deleted
    assert json.loads(manifest.read_text())["counts"]["fetched_bytes"] == len(body)


def test_missing_local_file_is_named(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(DownloadError, match=r"does not exist") as caught:
        download_dataset(settings_for(str(missing), b""), *paths(tmp_path))
    assert str(missing) in str(caught.value)


@pytest.mark.parametrize("url", ["ftp://example.org/data.txt", "gopher://x/y", "s3://bucket/key"])
def test_unsupported_url_schemes_are_refused(tmp_path, url):
    settings = DownloadSettings(url=url, sha256="0" * 64)
    with pytest.raises(DownloadError, match="supported are http, https, file"):
        download_dataset(settings, tmp_path / "files", tmp_path / "manifest.json")
    assert not (tmp_path / "files").exists()
