"""A real HTTP origin server on 127.0.0.1 that misbehaves on request (5xx, cut connections, no
Range support), and the helpers download tests share. The `origin` fixture lives in
tests/conftest.py."""

from __future__ import annotations

import gzip
import hashlib
import io
import random
import re
import tarfile
import threading
import zipfile
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from snaketune.data.paths import DownloadPaths
from snaketune.data.settings import DownloadSettings


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
    """The download job's files folder and manifest in tmp_path/download."""
    laid_out = DownloadPaths.under(tmp_path / "download")
    return laid_out.files, laid_out.manifest


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
