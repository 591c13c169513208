"""Stage 1, download_dataset: fetch a dataset file, verify its sha256, unpack it safely.

Remote files stream into a `.part` file kept outside Snakemake's outputs, so a download that
dies is resumed with an HTTP Range request on the next run instead of starting over. Nothing
appears under the output name until the digest matches. hf:// URLs go through huggingface_hub
and its cache (snaketune.data.hub); their digest is checked the same way.
"""

from __future__ import annotations

import gzip
import http.client
import logging
import shutil
import tarfile
import time
import urllib.error
import urllib.request
import zipfile
import zlib
from pathlib import Path, PurePosixPath
from urllib.parse import unquote, urlparse

from snaketune.context import IN_PROCESS, JobContext
from snaketune.data.hub import fetch_from_hub
from snaketune.data.paths import DownloadPaths
from snaketune.data.settings import URL_SCHEMES, DownloadSettings, resolve_url
from snaketune.data.sources import local_source, remember
from snaketune.errors import DownloadError
from snaketune.fileio import atomic_dir, sha256_file
from snaketune.manifest import stage_manifest

log = logging.getLogger(__name__)

ARCHIVE_SUFFIXES = (".zip", ".tar.gz", ".tgz", ".tar")
SCHEMES = ("", *URL_SCHEMES)  # "" is a local path


def file_name_of(url: str) -> str:
    name = PurePosixPath(unquote(urlparse(url).path)).name
    return name or "download"


def fetch(settings: DownloadSettings, partial_dir: Path, repository: Path) -> Path:
    """Return a local file holding the verified bytes of `settings.url`."""
    parsed = urlparse(settings.url)
    if parsed.scheme not in SCHEMES:
        raise DownloadError(
            f"url {settings.url!r} has scheme {parsed.scheme!r}; supported are http, https, file, "
            "hf and local paths"
        )
    if parsed.scheme in ("http", "https"):
        part = Path(partial_dir) / (file_name_of(settings.url) + ".part")
        _fetch_http(settings, part)
        source = part
    elif parsed.scheme == "hf":
        source = fetch_from_hub(settings.url)  # a file in the hub's cache: read, never removed
    else:
        local = resolve_url(settings.url, repository)
        source = Path(unquote(parsed.path) if parsed.scheme == "file" else local)
        if not source.is_file():
            raise DownloadError(f"dataset file {source} does not exist (url: {settings.url})")
    actual = sha256_file(source)
    if actual != settings.sha256.lower():
        if source.suffix == ".part":
            source.unlink()  # a corrupt partial must not be resumed
        raise DownloadError(
            f"sha256 mismatch for {settings.url}: expected {settings.sha256}, got {actual}. "
            "If the file changed on purpose, update the dataset's sha256 in config.yaml."
        )
    return source


def _fetch_http(settings: DownloadSettings, part: Path) -> None:
    part.parent.mkdir(parents=True, exist_ok=True)
    wait = settings.backoff_seconds
    for attempt in range(settings.retries + 1):
        try:
            _stream_once(settings, part)
            return
        except urllib.error.HTTPError as err:
            if err.code == 416 and part.exists() and part.stat().st_size:
                # Nothing lies past the bytes we hold: the .part is already whole (e.g. kept
                # because unpacking failed after it was verified). fetch() checks its digest.
                return
            if err.code < 500 and err.code != 429:
                raise DownloadError(f"HTTP {err.code} {err.reason} for {settings.url}") from err
            problem = f"HTTP {err.code} {err.reason}"
        except (OSError, http.client.HTTPException) as err:
            # OSError covers URLError, dropped connections and timeouts. A chunked response cut
            # off mid-stream raises IncompleteRead, an HTTPException: just as retryable.
            problem = f"{type(err).__name__}: {getattr(err, 'reason', err)}"
        if attempt == settings.retries:
            raise DownloadError(
                f"could not download {settings.url} after {attempt + 1} attempts ({problem}). "
                "Check the URL and your network; rerun to resume from "
                f"{part.stat().st_size if part.exists() else 0} bytes."
            )
        log.warning(
            "attempt %d for %s failed (%s); retrying in %.1fs",
            attempt + 1,
            settings.url,
            problem,
            wait,
        )
        time.sleep(wait)
        wait *= 2


def _stream_once(settings: DownloadSettings, part: Path) -> None:
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(settings.url, headers={"User-Agent": "snaketune"})
    if have:
        request.add_header("Range", f"bytes={have}-")
    with urllib.request.urlopen(request, timeout=settings.timeout_seconds) as response:
        if have and response.status == 206:
            log.info("resuming %s at byte %d", settings.url, have)
            mode = "ab"
        else:
            mode = "wb"  # server ignored Range (or nothing to resume): start over
        expected = response.headers.get("Content-Length")
        with part.open(mode) as out:
            shutil.copyfileobj(response, out, 1 << 20)
    got = part.stat().st_size - (have if mode == "ab" else 0)
    if expected is not None and got < int(expected):
        raise ConnectionError(f"connection closed after {got} of {expected} bytes")


# What a truncated or damaged archive raises while it is read.
DAMAGED_ARCHIVE = (EOFError, zlib.error, gzip.BadGzipFile, zipfile.BadZipFile, tarfile.TarError)


def unpack(source: Path, name: str, target: Path, max_bytes: int) -> list[str]:
    """Copy or unpack `source` (fetched as `name`) into `target`; return the files written."""
    try:
        return unpack_unchecked(source, name, target, max_bytes)
    except DAMAGED_ARCHIVE as err:  # the archive's own index, before any member is read
        raise damaged(name, err) from err


def unpack_unchecked(source: Path, name: str, target: Path, max_bytes: int) -> list[str]:
    if name.endswith(".zip"):
        return _unzip(source, target, max_bytes)
    if name.endswith((".tar.gz", ".tgz", ".tar")):
        return _untar(source, target, max_bytes)
    if name.endswith(".gz"):
        out_name = name[: -len(".gz")]
        with gzip.open(source, "rb") as src, (target / out_name).open("wb") as dst:
            _copy_capped(src, dst, max_bytes, name)
        return [out_name]
    shutil.copyfile(source, target / name)
    return [name]


def _copy_capped(src, dst, max_bytes: int, what: str) -> int:
    written = 0
    for chunk in iter(lambda: _read_member(src, what), b""):
        written += len(chunk)
        if written > max_bytes:
            raise DownloadError(
                f"{what} expands past max_unpacked_bytes={max_bytes}; refusing it as a possible "
                "decompression bomb. Raise the limit in the dataset settings if it is genuine."
            )
        dst.write(chunk)
    return written


def _read_member(src, what: str) -> bytes:
    try:
        return src.read(1 << 20)
    except DAMAGED_ARCHIVE as err:
        raise damaged(what, err) from err


def damaged(what: str, err: Exception) -> DownloadError:
    return DownloadError(
        f"{what} cannot be unpacked: {err or type(err).__name__}. The file matches the "
        "configured sha256, so the pinned file itself is truncated or damaged: fetch a whole "
        "copy and set the dataset's sha256 to its digest."
    )


def _safe_member_path(target: Path, member: str) -> Path:
    resolved = (target / member).resolve()
    if PurePosixPath(member).is_absolute() or not resolved.is_relative_to(target.resolve()):
        raise DownloadError(f"archive member {member!r} would be written outside {target}; refused")
    return resolved


def _unzip(source: Path, target: Path, max_bytes: int) -> list[str]:
    written, total = [], 0
    with zipfile.ZipFile(source) as archive:
        for info in archive.infolist():
            dest = _safe_member_path(target, info.filename)
            if info.is_dir():
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            with archive.open(info) as src, dest.open("wb") as dst:
                total += _copy_capped(src, dst, max_bytes - total, info.filename)
            written.append(info.filename)
    return written


def _untar(source: Path, target: Path, max_bytes: int) -> list[str]:
    written, total = [], 0
    with tarfile.open(source) as archive:
        for member in archive.getmembers():
            dest = _safe_member_path(target, member.name)
            if member.issym() or member.islnk():
                raise DownloadError(f"archive member {member.name!r} is a link; refused")
            if not member.isfile():
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            with archive.extractfile(member) as src, dest.open("wb") as dst:
                total += _copy_capped(src, dst, max_bytes - total, member.name)
            written.append(member.name)
    return written


def download_dataset(
    paths: DownloadPaths, settings: DownloadSettings, context: JobContext = IN_PROCESS
) -> list[str]:
    """Fetch, verify and unpack into paths.files (atomically); write the stage manifest."""
    partial_dir = paths.files.parent / ".partial"
    with stage_manifest(paths, settings, context=context) as record:
        source = fetch(settings, partial_dir, context.repository)
        with atomic_dir(paths.files) as tmp:
            files = unpack(source, file_name_of(settings.url), tmp, settings.max_unpacked_bytes)
            record.outputs = {f: sha256_file(tmp / f) for f in files}
        record.counts = {"files": len(files), "fetched_bytes": source.stat().st_size}
        record.extra["fetched_sha256"] = settings.sha256.lower()
        if local_source(settings.url) is not None:
            remember(paths.manifest, source, settings.sha256.lower())
        if source.suffix == ".part":
            source.unlink()
    return files
