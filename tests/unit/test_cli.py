"""How `snaketune <command>` ends a job that fails, each with exit status 1: a problem the user
can fix in one line without a traceback; a fault of the operating system in one line that says
so and names the path; anything else as a bug, its traceback then a line that says it is one.
Real stages on real inputs, called as the rules call them (snaketune.cli.main)."""

from __future__ import annotations

import errno
import io
import json
import os
import signal
import time

import pytest

from snaketune import cli, joblog

MISSING_SHA = "0" * 64


def download(tmp_path, settings: str) -> list[str]:
    files, manifest = tmp_path / "files", tmp_path / "manifest.json"
    return ["download", "--files", str(files), "--manifest", str(manifest), "--settings", settings]


def split(tmp_path, corpus) -> list[str]:
    outputs = {name: str(tmp_path / f"{name}.parquet") for name in ("train", "val", "test")}
    return [
        "split",
        "--corpus",
        str(corpus),
        *[arg for name, path in outputs.items() for arg in (f"--{name}", path)],
        "--manifest",
        str(tmp_path / "manifest.json"),
        "--settings",
        "{}",
    ]


def ended(capsys, argv: list[str]) -> tuple[int, str]:
    """main's exit status and what it wrote on stderr."""
    status = cli.main(argv)
    return status, capsys.readouterr().err


def test_a_user_error_is_one_line_without_a_traceback(tmp_path, capsys):
    missing = tmp_path / "corpus.csv"
    settings = json.dumps({"url": str(missing), "sha256": MISSING_SHA})
    status, err = ended(capsys, download(tmp_path, settings))
    assert status == 1
    assert err.strip().splitlines() == [
        f"snaketune download: error: dataset file {missing} does not exist (url: {missing})"
    ]


@pytest.mark.parametrize(
    ("settings", "says"),
    [
        ('{"url": 3}', "url: 3 is not of type str"),
        ('{"url": "a.csv"', "--settings is not JSON (Expecting ',' delimiter"),
        ("[]", "--settings is a JSON list; expected an object of the download job's settings"),
        ("{}", "url: is required and missing"),
    ],
    ids=["wrong-type", "not-json", "not-an-object", "missing-key"],
)
def test_settings_the_job_cannot_take_are_a_user_error(tmp_path, capsys, settings, says):
    status, err = ended(capsys, download(tmp_path, settings))
    assert status == 1
    (line,) = err.strip().splitlines()
    assert line.startswith(f"snaketune download: error: {says}")


def test_an_operating_system_fault_is_one_line_naming_the_path(tmp_path, capsys):
    corpus = tmp_path / "corpus.parquet"  # never written: the split stage finds no input
    status, err = ended(capsys, split(tmp_path, corpus))
    assert status == 1
    assert err.strip().splitlines() == [
        f"snaketune split: error: operating-system error on {corpus}: No such file or directory "
        "(FileNotFoundError, ENOENT)"
    ]
    assert not (tmp_path / "train.parquet").exists()


def test_an_unexpected_value_error_is_a_bug_with_its_traceback(tmp_path, capsys, monkeypatch):
    # No input makes a real stage fail by a bug on purpose, so the stage's entry is replaced by
    # one with a real bug: zip(strict=True) over lists of different lengths, the ValueError that
    # the CLI used to print as if it were bad input.
    from snaketune.data import download as stage

    def buggy(paths, settings, context):
        return list(zip([paths.files, paths.manifest], [settings.url], strict=True))

    monkeypatch.setattr(stage, "download_dataset", buggy)
    settings = json.dumps({"url": "a.csv", "sha256": MISSING_SHA})
    status, err = ended(capsys, download(tmp_path, settings))
    assert status == 1
    lines = err.strip().splitlines()
    assert "Traceback (most recent call last):" in lines
    assert "ValueError: zip() argument 2 is shorter than argument 1" in lines
    assert lines[-1] == (
        "snaketune download: this is a bug in snaketune, not in your data or settings; please "
        "report it with the traceback above"
    )
    assert not [line for line in lines if joblog.ERROR_MARK in line]
    # The failed job's summary shows the exception, the frame that raised it and the bug line.
    message = joblog.job_message("INFO something logged before\n" + err, 1).splitlines()
    assert message[-2:] == lines[-2:] and "in buggy" in "\n".join(message)
    assert "INFO something logged before" not in message


@pytest.mark.parametrize(
    ("fault", "line"),
    [
        (
            OSError(errno.ENOSPC, "No space left on device", "/results/model.safetensors"),
            "operating-system error on /results/model.safetensors: No space left on device "
            "(OSError, ENOSPC)",
        ),
        (
            PermissionError(errno.EACCES, "Permission denied", "/data/a.csv", None, "/data/b.csv"),
            "operating-system error on /data/a.csv -> /data/b.csv: Permission denied "
            "(PermissionError, EACCES)",
        ),
        (
            ConnectionResetError("peer reset"),
            "operating-system error: peer reset (ConnectionResetError)",
        ),
        (MemoryError(), "out of memory (MemoryError); give the job more memory"),
        (
            RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried 9 GB"),
            "out of memory (RuntimeError: DefaultCPUAllocator: can't allocate memory",
        ),
    ],
    ids=["disk-full", "permission", "no-errno", "memory", "torch-cpu-memory"],
)
def test_a_fault_of_the_machine_says_what_the_system_reported(fault, line):
    assert cli.system_error(fault).startswith(line)


@pytest.mark.parametrize(
    "error",
    [io.UnsupportedOperation("not readable"), KeyError("text"), RuntimeError("shape mismatch")],
)
def test_errors_only_a_bug_raises_are_not_a_fault_of_the_machine(error):
    assert cli.system_error(error) is None


def test_a_sigterm_ends_the_job_as_an_exit_that_unwinds_it(tmp_path, monkeypatch):
    """Python's default would end the process where it stands, leaving the job's MLflow run
    RUNNING; the job's `finally`s run instead, and the handler before it is back after."""
    from snaketune.data import download as stage

    unwound = []

    def stopped_from_outside(paths, settings, context):
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler runs at the next bytecode; never reached
            unwound.append("slept")
        finally:
            unwound.append("finally")

    monkeypatch.setattr(stage, "download_dataset", stopped_from_outside)
    before = signal.getsignal(signal.SIGTERM)
    settings = json.dumps({"url": "a.csv", "sha256": MISSING_SHA})
    with pytest.raises(SystemExit) as stopped:
        cli.main(download(tmp_path, settings))
    assert str(stopped.value) == (
        "download: SIGTERM received before the job finished; rerun to resume"
    )
    assert unwound == ["finally"]
    assert signal.getsignal(signal.SIGTERM) is before
    assert not (tmp_path / "manifest.json").exists()
