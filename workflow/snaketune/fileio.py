"""Atomic writes and content digests shared by every stage.

A stage never leaves a half-written file under its final name: it writes to a temporary sibling
and renames it into place (rename is atomic on one filesystem), so a killed job leaves either
the old output or nothing. A write the filesystem refuses (full disk, quota, file size limit,
read-only mount) becomes an OutputError that names the output; the temporary is removed.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from snaketune.errors import OutputError

_CHUNK = 1 << 20
# Parquet row groups are the unit a reader decodes at once: small groups keep streaming readers'
# memory flat however large the file is.
PARQUET_ROW_GROUP_ROWS = 8192
# Failures that say the filesystem will not take the bytes, not that the writer is wrong.
_REFUSED = {
    errno.ENOSPC: ("no space left on the device", "free space on the filesystem of {folder}"),
    errno.EDQUOT: ("disk quota exceeded", "free space within your quota on {folder}"),
    errno.EFBIG: ("file size limit reached", "raise the file size limit (ulimit -f)"),
    errno.EROFS: ("read-only filesystem", "point results_dir at a writable folder"),
}


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def _open_permissions(path: Path, mode: int) -> None:
    """mkstemp/mkdtemp create owner-only files; results are meant to be shared like any file."""
    os.chmod(path, mode & ~_umask())


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


# Snakemake marks a finished directory output with this empty file; it is no part of the content.
SNAKEMAKE_TIMESTAMP = ".snakemake_timestamp"


def files_in(folder: Path) -> list[Path]:
    """Every file below `folder`, sorted, without Snakemake's bookkeeping."""
    return sorted(
        p for p in Path(folder).rglob("*") if p.is_file() and p.name != SNAKEMAKE_TIMESTAMP
    )


def sha256_tree(path: Path) -> str:
    """Digest of a file, or of a directory's relative names and file contents in sorted order."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    if not path.is_dir():
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), str(path))
    digest = hashlib.sha256()
    for child in files_in(path):
        digest.update(child.relative_to(path).as_posix().encode())
        digest.update(sha256_file(child).encode())
    return digest.hexdigest()


def _make_temp_file(prefix: str, suffix: str, dir: Path) -> str:
    fd, name = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=dir)
    os.close(fd)
    return name


def _temporary_beside(final: Path, make) -> Path:
    """A new temporary sibling of `final` made by `make` (mkstemp or mkdtemp style)."""
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        return Path(make(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    except OSError as err:
        raise OutputError(
            f"cannot write {final}: its folder {final.parent} cannot be created or written "
            f"({err.strerror or err}). Point results_dir at a writable folder and rerun."
        ) from err


def _raise_if_refused(final: Path, err: OSError) -> None:
    if err.errno in _REFUSED:
        what, advice = _REFUSED[err.errno]
        raise OutputError(
            f"could not write {final}: {what} ({err}). Nothing was kept under that name; "
            f"{advice.format(folder=final.parent)} and rerun."
        ) from err


@contextlib.contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temporary path beside `final`; rename it onto `final` only if the block succeeds."""
    final = Path(final)
    tmp = _temporary_beside(final, _make_temp_file)
    _open_permissions(tmp, 0o666)
    try:
        yield tmp
        os.replace(tmp, final)
    except OSError as err:
        _raise_if_refused(final, err)
        raise
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary directory beside `final`; swap it in for `final` on success."""
    final = Path(final)
    tmp = _temporary_beside(final, tempfile.mkdtemp)
    _open_permissions(tmp, 0o777)
    try:
        yield tmp
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except OSError as err:
        _raise_if_refused(final, err)
        raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_json(path: Path, data: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())
