"""Local dataset files (a path or a file:// URL) that change after they were verified.

Snakemake decides what to rerun from its outputs, so a local file edited in place under the
same name would go unnoticed: every result would look current while standing on the old data.
The download stage records the file's size and modification time next to its sha256; before
any job, `changed_sources` compares them with the file as it is now, hashes it only if they
differ, and refuses to go on when the content no longer has the configured sha256. Nothing is
deleted: the verified copy and everything built on it stay until the config names the new
digest (which reruns the download) or the file is restored.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from snaketune.fileio import read_json, sha256_file, write_json

SOURCE_RECORD = "source.json"


def local_source(url: str) -> Path | None:
    """The file a dataset URL names on this machine, or None for a remote one."""
    parsed = urlparse(url)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path))
    return Path(url) if parsed.scheme == "" else None


def identity(path: Path) -> dict[str, Any]:
    """What tells a file changed without reading it."""
    stat = os.stat(path)
    return {"path": str(Path(path).resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def record_path(download_manifest: Path) -> Path:
    """Where the download keeps its source's identity: beside its manifest, not an output."""
    return Path(download_manifest).with_name(SOURCE_RECORD)


def remember(download_manifest: Path, source: Path, sha256: str) -> None:
    write_json(record_path(download_manifest), {**identity(source), "sha256": sha256})


def changed_source(download_manifest: Path, url: str, sha256: str) -> str | None:
    """Why a verified local source can no longer be trusted, or None. Needs a finished
    download; a file gone missing is no problem (its verified copy stands). A file touched but
    unchanged is hashed once, then remembered."""
    source, record = local_source(url), record_path(download_manifest)
    if source is None or not record.exists() or not source.is_file():
        return None
    known = read_json(record)
    if {k: known.get(k) for k in ("path", "size", "mtime_ns")} == identity(source):
        return None
    actual = sha256_file(source)
    if actual == sha256.lower() == known.get("sha256"):
        remember(download_manifest, source, actual)
        return None
    if actual == sha256.lower():
        return None  # a new digest in the config: the download reruns and verifies it
    return (
        f"{source} changed after it was verified: its sha256 is now {actual}, the config says "
        f"{sha256}. The verified copy in {record.parent} and everything built on it are kept. "
        f"If the change is meant, set the dataset's sha256 to {actual} (the download and what "
        "follows then rerun); otherwise restore the file."
    )


def changed_sources(sources: dict[str, tuple[str, str, Path]]) -> list[str]:
    """The problems of every dataset (name -> (resolved url, sha256, download manifest)) whose
    local file changed, by key."""
    return [
        f"datasets.{name}.url: {problem}"
        for name, (url, sha256, manifest) in sources.items()
        if (problem := changed_source(manifest, url, sha256))
    ]
