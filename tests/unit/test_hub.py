"""hf:// dataset URLs: resolved through huggingface_hub's cache (laid out here as the hub lays it
out), verified like any download, and, offline without a cached copy, refused with a message that
says so and what to do instead."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from huggingface_hub import constants

from snaketune.data.download import download_dataset
from snaketune.data.hub import parse_hub_url
from snaketune.data.paths import DownloadPaths
from snaketune.data.settings import DownloadSettings
from snaketune.errors import DownloadError

COMMIT = "0123456789abcdef0123456789abcdef01234567"
BODY = b"text,label\nthe parcel is late,delivery\nrefund please,billing\n"
URL = "hf://datasets/acme/support-tickets/data/train.csv"


def populate_cache(cache: Path, repo: str, filename: str, body: bytes, commit: str = COMMIT):
    """What hf_hub_download leaves behind: the bytes under blobs/, a snapshot link per commit,
    and refs/main naming the commit."""
    root = cache / ("datasets--" + repo.replace("/", "--"))
    blob = root / "blobs" / hashlib.sha256(body).hexdigest()
    blob.parent.mkdir(parents=True)
    blob.write_bytes(body)
    link = root / "snapshots" / commit / filename
    link.parent.mkdir(parents=True)
    link.symlink_to(os.path.relpath(blob, link.parent))
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(commit)


@pytest.fixture
def offline_cache(tmp_path, monkeypatch) -> Path:
    """An empty hub cache, with the hub library told it is offline (as HF_HUB_OFFLINE=1 and
    HF_HUB_CACHE would at its import)."""
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def fetch(tmp_path: Path, url: str, body: bytes = BODY) -> list[str]:
    settings = DownloadSettings(url=url, sha256=hashlib.sha256(body).hexdigest())
    return download_dataset(DownloadPaths(tmp_path / "files", tmp_path / "manifest.json"), settings)


# --- addresses -----------------------------------------------------------------------------------


def test_url_names_repository_revision_and_file():
    target = parse_hub_url(f"hf://datasets/acme/support-tickets@{COMMIT}/data/train.csv")
    assert (target.type, target.id, target.revision) == ("dataset", "acme/support-tickets", COMMIT)
    assert target.path_in_repo == "data/train.csv"


@pytest.mark.parametrize(
    "url", ["hf://datasets/acme", "hf://datasets/acme/support-tickets", "hf://buckets/acme/b/f.txt"]
)
def test_url_without_a_repository_file_is_refused_with_the_expected_form(url):
    with pytest.raises(DownloadError, match=r"hf://datasets/<owner>/<name>\[@<revision>\]/<file>"):
        parse_hub_url(url)


# --- the cache -----------------------------------------------------------------------------------


def test_offline_download_resolves_from_the_hub_cache(tmp_path, offline_cache):
    populate_cache(offline_cache, "acme/support-tickets", "data/train.csv", BODY)

    files = fetch(tmp_path, URL)

    assert files == ["train.csv"]
    assert (tmp_path / "files" / "train.csv").read_bytes() == BODY
    assert not (tmp_path / "files" / "train.csv").is_symlink()  # a copy, not a link into it
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["params"]["url"] == URL and manifest["counts"]["fetched_bytes"] == len(BODY)


def test_a_pinned_revision_resolves_from_its_snapshot(tmp_path, offline_cache):
    populate_cache(offline_cache, "acme/support-tickets", "data/train.csv", BODY)

    files = fetch(tmp_path, f"hf://datasets/acme/support-tickets@{COMMIT}/data/train.csv")

    assert (tmp_path / "files" / files[0]).read_bytes() == BODY


def test_a_cached_file_with_another_digest_fails_and_stays_in_the_cache(tmp_path, offline_cache):
    populate_cache(offline_cache, "acme/support-tickets", "data/train.csv", BODY)

    with pytest.raises(DownloadError, match="sha256 mismatch"):
        fetch(tmp_path, URL, body=b"what the config expected")

    assert not (tmp_path / "files").exists()
    assert list(offline_cache.rglob("train.csv"))  # the hub's cache is not ours to delete


def test_offline_without_a_cached_copy_says_so_and_how_to_proceed(tmp_path, offline_cache):
    with pytest.raises(DownloadError) as caught:
        fetch(tmp_path, URL)

    message = str(caught.value)
    assert URL in message and str(offline_cache) in message
    assert "HF_HUB_OFFLINE is set" in message
    assert "local path" in message and "file://" in message
    assert not (tmp_path / "manifest.json").exists()


def test_cli_honours_hf_hub_offline_and_hf_hub_cache_from_the_environment(tmp_path):
    cache = tmp_path / "hf-cache"
    populate_cache(cache, "acme/support-tickets", "data/train.csv", BODY)
    settings = {"url": URL, "sha256": hashlib.sha256(BODY).hexdigest()}
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)}
    command = [sys.executable, "-m", "snaketune.cli", "download"]
    paths = ["--files", str(tmp_path / "files"), "--manifest", str(tmp_path / "manifest.json")]

    run = subprocess.run(
        [*command, *paths, "--settings", json.dumps(settings)], env=env, capture_output=True
    )

    assert run.returncode == 0, run.stderr.decode()[-2000:]
    assert (tmp_path / "files" / "train.csv").read_bytes() == BODY
