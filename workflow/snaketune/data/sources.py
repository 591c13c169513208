"""Local inputs that change in place: dataset files (a path or a file:// URL) after they were
verified, and the local model and tokenizer folders that settings name.

Snakemake decides what to rerun from its outputs, so a local file edited in place under the
same name would go unnoticed: every result would look current while standing on the old data.
The download stage records the file's size and modification time next to its sha256; before
any job, `changed_sources` compares them with the file as it is now, hashes it only if they
differ, and refuses to go on when the content no longer has the configured sha256. Nothing is
deleted: the verified copy and everything built on it stay until the config names the new
digest (which reruns the download) or the file is restored.

A pretrained model or tokenizer folder (`name_or_path`, the chat template's tokenizer) has no
digest in the config: its content digest is a param of the jobs that read it (`folder_sources`),
so an edit in place (a new chat template, other weights) reruns them and everything after, as a
changed setting would. Each file is hashed again only when its size or modification time
changed (FOLDER_DIGESTS keeps the last ones), so gigabytes of weights are read once.
"""

from __future__ import annotations

import hashlib
import json
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


WATCHED_KEYS = ("name_or_path", "chat_tokenizer")
"""Settings whose value may name a local folder a job reads."""
FOLDER_DIGESTS = Path(".snakemake") / "snaketune" / "folder-digests.json"
"""Each watched file's identity and sha256, in the workflow's working directory."""


def watched_folders(settings: Any) -> list[str]:
    """The local folders a job's settings (their JSON form, nested) name under WATCHED_KEYS."""
    found: list[str] = []
    if isinstance(settings, dict):
        for key, value in settings.items():
            if key in WATCHED_KEYS and isinstance(value, str) and Path(value).expanduser().is_dir():
                found.append(value)
            else:
                found += watched_folders(value)
    elif isinstance(settings, list):
        for value in settings:
            found += watched_folders(value)
    return sorted(set(found))


class FolderDigests:
    """Content digests of folders, each file hashed once per change of its size or mtime."""

    def __init__(self, cache: Path = FOLDER_DIGESTS):
        self.cache = cache
        self.known: dict[str, list] = {}
        try:
            self.known = json.loads(cache.read_text()) if cache.exists() else {}
        except (OSError, ValueError):
            pass  # a cache cut short: every file is hashed again, and the cache rewritten
        self.changed = False

    def file_digest(self, path: Path) -> str:
        stat = path.stat()
        key, identity = str(path.resolve()), [stat.st_size, stat.st_mtime_ns]
        if self.known.get(key, [None, None, None])[:2] != identity:
            self.known[key] = [*identity, sha256_file(path)]
            self.changed = True
        return self.known[key][2]

    def folder_digest(self, folder: str) -> str:
        root = Path(folder).expanduser()
        files = sorted(p for p in root.rglob("*") if p.is_file())
        combined = hashlib.sha256()
        for path in files:
            combined.update(f"{path.relative_to(root)}\0{self.file_digest(path)}\n".encode())
        return combined.hexdigest()

    def save(self) -> None:
        if self.changed:
            self.cache.parent.mkdir(parents=True, exist_ok=True)
            write_json(self.cache, self.known)
            self.changed = False


def folder_sources(settings_json: str, digests: FolderDigests) -> dict[str, str]:
    """{folder: content digest} of every local folder a job's settings name."""
    return {
        folder: digests.folder_digest(folder)
        for folder in watched_folders(json.loads(settings_json))
    }


def model_source_digest(model: Any, digests: FolderDigests | None = None) -> str:
    """The content digest of the local folder a pretrained model (model settings) loads from,
    or "" (a hub id, or a model built here): part of a training run's identity, so that a
    checkpoint does not continue on other base weights (snaketune.train.resume)."""
    local = watched_folders({"name_or_path": model.name_or_path})
    if model.init != "pretrained" or not local:
        return ""
    own = digests is None
    digests = digests or FolderDigests()
    digest = digests.folder_digest(local[0])
    if own:
        digests.save()
    return digest
