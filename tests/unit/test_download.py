"""download_dataset against a real HTTP server on 127.0.0.1 when nothing goes wrong: digests and
manifests, .gz and archives unpacked, local paths and file:// URLs copied. Failures (bad digests,
retries, resumes, hostile archives) are in tests/reliability/test_inputs.py."""

from __future__ import annotations

import json

import pytest

from snaketune.data.download import download_dataset
from snaketune.data.paths import DownloadPaths
from snaketune.data.settings import DownloadSettings
from tests.support.downloads import (
    archive_of,
    gzipped,
    part_files,
    paths,
    payload,
    settings_for,
    sha256_bytes,
    write_input,
)

# --- plain http ----------------------------------------------------------------------------------


def test_http_download_checks_sha256_and_writes_manifest(origin, tmp_path):
    body = payload(300_000)
    url = origin.serve("/data/corpus.txt", body)
    out, manifest = paths(tmp_path)

    files = download_dataset(DownloadPaths(out, manifest), settings_for(url, body))

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
    assert download_dataset(DownloadPaths(*paths(tmp_path)), settings) == ["a.txt"]


# --- unpacking -----------------------------------------------------------------------------------


def test_gz_is_decompressed_and_digest_is_of_the_fetched_bytes(origin, tmp_path):
    text = b"".join(b'{"text": "line %d"}\n' % i for i in range(1000))
    packed = gzipped(text)
    url = origin.serve("/corpus.jsonl.gz", packed)
    out, manifest = paths(tmp_path)

    files = download_dataset(DownloadPaths(out, manifest), settings_for(url, packed))

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

    files = download_dataset(DownloadPaths(out, manifest), settings_for(str(source), packed))

    assert sorted(files) == sorted(members)
    assert {f: (out / f).read_bytes() for f in files} == members
    record = json.loads(manifest.read_text())
    assert record["outputs"] == {name: sha256_bytes(data) for name, data in members.items()}
    assert record["counts"] == {"files": 2, "fetched_bytes": len(packed)}


# --- local files ---------------------------------------------------------------------------------


@pytest.mark.parametrize("as_uri", [False, True], ids=["local-path", "file-url"])
def test_local_path_and_file_url_are_copied(tmp_path, as_uri):
    body = payload(10_000, seed=4)
    source = write_input(tmp_path, "my corpus.txt", body)  # the space is %20 in the file:// URL
    url = source.as_uri() if as_uri else str(source)
    out, manifest = paths(tmp_path)

    files = download_dataset(DownloadPaths(out, manifest), settings_for(url, body))

    assert files == ["my corpus.txt"]
    assert (out / "my corpus.txt").read_bytes() == body
    assert source.read_bytes() == body  # the source is copied, never moved or deleted
    assert json.loads(manifest.read_text())["counts"]["fetched_bytes"] == len(body)
