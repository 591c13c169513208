"""Reliability scenarios 1-9: bad inputs and config fail early and clearly, leave no output that
looks complete, and a rerun continues where the last one stopped. See README.md here."""

from __future__ import annotations

import io
import json
import tarfile
import time
import zipfile
from dataclasses import asdict
from pathlib import Path

import pandas as pd
import pytest

from snaketune.config import schema_problems
from snaketune.data.clean import clean_corpus
from snaketune.data.download import download_dataset
from snaketune.data.paths import CleanPaths, DownloadPaths, TokenizerPaths
from snaketune.data.settings import (
    CleanJob,
    CleanSettings,
    DownloadSettings,
    ReadSettings,
    TokenizerSettings,
)
from snaketune.data.tokenizer import prepare_tokenizer
from snaketune.errors import DownloadError, ModelError, TokenizerError
from snaketune.fileio import sha256_file
from snaketune.train.models import build_model
from snaketune.train.settings import ModelSettings
from tests.support.downloads import (
    add_tar_file,
    archive_of,
    gzipped,
    part_files,
    paths,
    payload,
    settings_for,
    sha256_bytes,
    write_input,
)
from tests.support.servers import free_port
from tests.support.workflow import config_with, snakemake_with

# --- 1. config: unknown key, wrong type, out of range --------------------------------------------


def test_unknown_key_is_named_with_the_allowed_keys():
    problems = schema_problems(config_with(experiments__0__train__learning_rate=0.1))
    assert len(problems) == 1
    assert "experiments[0].train" in problems[0]
    assert "'learning_rate'" in problems[0] and "'lr'" in problems[0]


def test_bad_enum_names_key_and_allowed_values():
    (problem,) = schema_problems(config_with(experiments__1__task="regression"))
    assert problem.startswith("experiments[1].task:")
    assert "'regression'" in problem and "causal_lm" in problem
    assert "sequence_classification" in problem


def test_wrong_type_and_out_of_range_are_both_reported():
    problems = schema_problems(
        config_with(experiments__0__train__max_steps="many", experiments__0__model__dropout=2.0)
    )
    keys = sorted(p.split(":")[0] for p in problems)
    assert keys == ["experiments[0].model.dropout", "experiments[0].train.max_steps"]


def test_snakemake_refuses_a_bad_config_before_any_job(tmp_path: Path):
    result = snakemake_with(
        tmp_path, config_with(experiments__0__task="regression"), "--cores", "1"
    )
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "experiments[0].task" in output and "sequence_classification" in output
    assert not (tmp_path / "results").exists()


# --- 2. dataset URL unreachable, 404, 500 --------------------------------------------------------


def test_unreachable_host_is_retried_with_growing_waits_then_named(no_proxy, tmp_path):
    url = f"http://127.0.0.1:{free_port()}/corpus.txt"  # nothing listens there
    settings = DownloadSettings(url=url, sha256="0" * 64, retries=2, backoff_seconds=0.05)
    out, manifest = paths(tmp_path)

    started = time.monotonic()
    with pytest.raises(DownloadError) as caught:
        download_dataset(DownloadPaths(out, manifest), settings)

    assert time.monotonic() - started >= 0.05 + 0.1  # two waits, the second twice the first
    message = str(caught.value)
    assert url in message and "after 3 attempts" in message and "Connection refused" in message
    assert "Check the URL and your network" in message
    assert not out.exists() and not manifest.exists() and part_files(tmp_path) == []


def test_http_404_fails_at_once_without_retrying(origin, tmp_path):
    url = origin.url("/missing.txt")
    settings = DownloadSettings(url=url, sha256="0" * 64, retries=4, backoff_seconds=0.01)
    out, manifest = paths(tmp_path)

    with pytest.raises(DownloadError, match=r"HTTP 404") as caught:
        download_dataset(DownloadPaths(out, manifest), settings)

    assert url in str(caught.value)
    assert len(origin.requests) == 1
    assert not out.exists() and part_files(tmp_path) == []


def test_http_500_twice_then_success_after_three_requests(origin, tmp_path):
    body = payload(20_000)
    url = origin.serve("/flaky.txt", body, fail_times=2)
    out, manifest = paths(tmp_path)

    download_dataset(DownloadPaths(out, manifest), settings_for(url, body, retries=4))

    assert [r.status for r in origin.requests] == [500, 500, 200]
    assert (out / "flaky.txt").read_bytes() == body


def test_http_500_beyond_retries_gives_up_and_says_how_often(origin, tmp_path):
    body = payload(1000)
    url = origin.serve("/down.txt", body, fail_times=10)

    with pytest.raises(DownloadError) as caught:
        download_dataset(DownloadPaths(*paths(tmp_path)), settings_for(url, body, retries=2))

    assert "after 3 attempts" in str(caught.value) and "HTTP 500" in str(caught.value)
    assert [r.status for r in origin.requests] == [500, 500, 500]


def test_missing_local_file_is_named(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(DownloadError, match=r"does not exist") as caught:
        download_dataset(DownloadPaths(*paths(tmp_path)), settings_for(str(missing), b""))
    assert str(missing) in str(caught.value)


# --- 3. checksum mismatch ------------------------------------------------------------------------


def test_sha256_mismatch_names_both_digests_and_leaves_nothing(origin, tmp_path):
    body = payload(50_000)
    expected = sha256_bytes(b"what the config promised")
    url = origin.serve("/corpus.txt", body)
    out, manifest = paths(tmp_path)
    settings = DownloadSettings(url=url, sha256=expected, backoff_seconds=0.01)

    with pytest.raises(DownloadError) as caught:
        download_dataset(DownloadPaths(out, manifest), settings)

    message = str(caught.value)
    assert url in message
    assert f"expected {expected}" in message
    assert f"got {sha256_bytes(body)}" in message
    assert not out.exists()
    assert not manifest.exists()
    # A corrupt partial must not be resumed by the next run.
    assert part_files(tmp_path) == []


def test_whole_but_corrupt_part_file_is_caught_by_the_digest_and_removed(origin, tmp_path):
    body = payload(5000, seed=5)
    url = origin.serve("/data.bin", body)
    out, manifest = paths(tmp_path)
    stale = out.parent / ".partial" / "data.bin.part"  # as left by a job killed after streaming
    stale.parent.mkdir(parents=True)
    stale.write_bytes(payload(5000, seed=6))

    with pytest.raises(DownloadError, match=r"sha256 mismatch"):
        download_dataset(DownloadPaths(out, manifest), settings_for(url, body))
    assert not stale.exists()
    download_dataset(DownloadPaths(out, manifest), settings_for(url, body))

    assert [(r.range, r.status) for r in origin.requests] == [("bytes=5000-", 416), (None, 200)]
    assert (out / "data.bin").read_bytes() == body


# --- 4. download interrupted mid-stream ----------------------------------------------------------


def test_cut_connection_is_retried_with_a_range_request(origin, tmp_path):
    body = payload(400_000, seed=1)
    cut = 123_457
    url = origin.serve("/big.bin", body, cut_first_at=cut)
    out, manifest = paths(tmp_path)

    download_dataset(DownloadPaths(out, manifest), settings_for(url, body, retries=2))

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
        download_dataset(DownloadPaths(out, manifest), settings_for(url, body, retries=0))
    (part,) = part_files(tmp_path)
    assert part.stat().st_size == cut
    assert not out.exists()

    download_dataset(DownloadPaths(out, manifest), settings_for(url, body, retries=0))

    assert [r.range for r in origin.requests] == [None, f"bytes={cut}-"]
    assert (out / "big.bin").read_bytes() == body


def test_server_that_ignores_range_makes_the_download_start_over(origin, tmp_path):
    body = payload(100_000, seed=3)
    url = origin.serve("/big.bin", body, cut_first_at=30_000, honor_range=False)
    out, manifest = paths(tmp_path)

    download_dataset(DownloadPaths(out, manifest), settings_for(url, body, retries=1))

    # Range was asked for, the server answered 200 with everything: appending would corrupt it.
    assert [(r.range, r.status) for r in origin.requests] == [(None, 200), ("bytes=30000-", 200)]
    assert (out / "big.bin").read_bytes() == body


def test_cut_chunked_response_is_retried_not_raised_raw(origin, tmp_path):
    # Without a Content-Length the client learns of the cut from http.client.IncompleteRead.
    body = payload(100_000, seed=7)
    url = origin.serve("/stream.bin", body, cut_first_at=40_000, chunked=True)
    out, manifest = paths(tmp_path)

    download_dataset(DownloadPaths(out, manifest), settings_for(url, body, retries=1))

    assert [r.status for r in origin.requests] == [200, 200]
    assert (out / "stream.bin").read_bytes() == body


def test_cut_chunked_response_without_retries_is_a_download_error(origin, tmp_path):
    body = payload(50_000, seed=8)
    url = origin.serve("/stream.bin", body, cut_first_at=20_000, chunked=True)

    with pytest.raises(DownloadError, match=r"after 1 attempts \(IncompleteRead"):
        download_dataset(DownloadPaths(*paths(tmp_path)), settings_for(url, body, retries=0))


# --- 5. archive members escaping their folder ----------------------------------------------------


@pytest.mark.parametrize("evil", ["../evil.txt", "inner/../../evil.txt"])
def test_zip_member_escaping_the_folder_is_refused(tmp_path, evil):
    packed = archive_of("zip", {"fine.txt": b"fine", evil: b"owned"})
    source = write_input(tmp_path, "set.zip", packed)
    out, manifest = paths(tmp_path)

    with pytest.raises(DownloadError, match=r"outside") as caught:
        download_dataset(DownloadPaths(out, manifest), settings_for(str(source), packed))

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
        download_dataset(DownloadPaths(out, manifest), settings_for(str(source), buffer.getvalue()))

    assert not out.exists() and not manifest.exists()
    assert list(tmp_path.rglob("passwd")) == []


def test_tar_member_with_absolute_path_is_refused(tmp_path):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        add_tar_file(archive, str(tmp_path / "abs.txt"), b"owned")
    source = write_input(tmp_path, "set.tar", buffer.getvalue())

    with pytest.raises(DownloadError, match=r"outside"):
        download_dataset(
            DownloadPaths(*paths(tmp_path)), settings_for(str(source), buffer.getvalue())
        )

    assert not (tmp_path / "abs.txt").exists()


# --- 6. decompression bomb -----------------------------------------------------------------------


def test_gz_expanding_past_the_limit_is_refused(tmp_path):
    bomb = gzipped(b"\0" * (3 << 20))  # 3 MiB of zeros pack into a few KiB
    source = write_input(tmp_path, "bomb.txt.gz", bomb)
    out, manifest = paths(tmp_path)
    settings = settings_for(str(source), bomb, max_unpacked_bytes=1_000_000)

    with pytest.raises(DownloadError) as caught:
        download_dataset(DownloadPaths(out, manifest), settings)

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
        download_dataset(DownloadPaths(*paths(tmp_path)), settings)


def test_limit_raised_after_a_refused_http_download_succeeds_on_rerun(origin, tmp_path):
    # The refused file was verified, so its .part is kept; the rerun must not ask for bytes
    # past its end (a real server answers that with 416).
    text = b"\0" * (2 << 20)
    packed = gzipped(text)
    url = origin.serve("/bomb.txt.gz", packed)
    out, manifest = paths(tmp_path)

    with pytest.raises(DownloadError, match=r"max_unpacked_bytes"):
        download_dataset(
            DownloadPaths(out, manifest), settings_for(url, packed, max_unpacked_bytes=1 << 20)
        )
    files = download_dataset(
        DownloadPaths(out, manifest), settings_for(url, packed, max_unpacked_bytes=4 << 20)
    )

    assert files == ["bomb.txt"]
    assert [(r.range, r.status) for r in origin.requests] == [
        (None, 200),
        (f"bytes={len(packed)}-", 416),
    ]
    assert sha256_file(out / "bomb.txt") == sha256_bytes(text)
    assert part_files(tmp_path) == []


# --- 7. invalid UTF-8, BOM, NUL, CRLF and a 50 MB line --------------------------------------------


def test_messy_bytes_and_a_50_mb_line_are_cleaned_and_counted(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "messy.txt").write_bytes(
        b"\xef\xbb\xbffirst line\r\n"  # a BOM, CRLF line ends
        b"bad \xff\xfe bytes\r\n"  # invalid UTF-8
        b"nul\x00 inside\r\n"
        + b"word " * (10 << 20)  # one 50 MiB line
        + b"\r\nlast line\r\n"
    )
    out = tmp_path / "clean"

    paths = CleanPaths(raw, out / "corpus.parquet", out / "report.json", out / "manifest.json")
    report = clean_corpus(paths, CleanJob(ReadSettings(format="txt"), CleanSettings()))

    docs = pd.read_parquet(out / "corpus.parquet")["text"].tolist()
    assert docs == ["first line", "bad \ufffd\ufffd bytes", "nul inside", "last line"]
    assert report.input_records == 5
    assert report.undecodable_bytes_replaced == 2
    assert report.control_chars_removed == 1
    assert report.removed == {"too_long": 1}  # over max_chars, counted instead of kept
    assert json.loads((out / "report.json").read_text()) == asdict(report)


# --- 9. tokenizer or model missing, or a hub id while offline ------------------------------------


def test_missing_tokenizer_directory_is_named(tmp_path):
    missing = tmp_path / "no-tokenizer"
    settings = TokenizerSettings(kind="pretrained", name_or_path=str(missing))
    out, manifest = tmp_path / "tokenizer", tmp_path / "manifest.json"

    with pytest.raises(TokenizerError) as caught:
        prepare_tokenizer(TokenizerPaths(tmp_path / "train.parquet", out, manifest), settings)

    message = str(caught.value)
    assert f"tokenizer.name_or_path: tokenizer directory {missing} does not exist" in message
    assert "save_pretrained" in message
    assert not out.exists() and not manifest.exists()


def test_missing_model_directory_is_named(tmp_path):
    missing = tmp_path / "no-model"
    settings = ModelSettings(init="pretrained", name_or_path=str(missing))
    with pytest.raises(ModelError, match=rf"model directory {missing} does not exist"):
        build_model(settings, "causal_lm", 400, 32, 0, 0, [])


def test_hub_ids_while_offline_say_so_and_how_to_give_a_local_path(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub_id = "snaketune-tests/not-in-any-cache"
    tokenizer = TokenizerSettings(kind="pretrained", name_or_path=hub_id)
    model = ModelSettings(init="pretrained", name_or_path=hub_id)

    with pytest.raises(TokenizerError) as tokenizer_error:
        prepare_tokenizer(
            TokenizerPaths(tmp_path / "train.parquet", tmp_path / "tok", tmp_path / "m.json"),
            tokenizer,
        )
    with pytest.raises(ModelError) as model_error:
        build_model(model, "causal_lm", 400, 32, 0, 0, [])

    for caught, key in ((tokenizer_error, "tokenizer"), (model_error, "model")):
        message = str(caught.value)
        assert f"{hub_id!r} is a hub id and this run is offline (HF_HUB_OFFLINE" in message
        assert f"hf download {hub_id} --local-dir DIR" in message
        assert f"set {key}.name_or_path to that directory" in message
