"""snaketune.joblog: what a failed job shows on the console and in the run's summary, from the
job's real log (the CLI's own output for a user error, a bug's traceback, a killed job)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from snaketune import joblog
from tests.support.repo import SNAKETUNE


def failed_job(tmp_path: Path, *args: str) -> tuple[Path, int]:
    """Run a real `snaketune` job that fails, its output into a log as the rules write it."""
    log = tmp_path / "job.log"
    with log.open("wb") as out:
        status = subprocess.run([SNAKETUNE, *args], stdout=out, stderr=subprocess.STDOUT).returncode
    return log, status


def test_a_user_error_shows_its_message_without_what_was_logged_before(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    settings = '{"url": "missing.txt", "sha256": "' + "0" * 64 + '"}'
    log, status = failed_job(
        tmp_path, "download", "--files", "files", "--manifest", "m.json", "--settings", settings
    )
    assert status == 1
    failure = joblog.report("download_dataset", str(log), status)
    assert failure.message.startswith("snaketune download: error: ")
    assert "missing.txt" in failure.message and "Traceback" not in failure.message
    assert joblog.failures() == [failure]
    assert "- download_dataset (log: " in joblog.summary()


def test_a_bug_shows_the_end_of_its_traceback():
    log_text = "\n".join(
        ["INFO step 1", "Traceback (most recent call last):"]
        + [f'  File "x.py", line {i}, in f' for i in range(30)]
        + ["ValueError: zip() argument 2 is shorter than argument 1"]
    )
    message = joblog.job_message(log_text, 1)
    assert message.endswith("ValueError: zip() argument 2 is shorter than argument 1")
    assert len(message.splitlines()) == joblog.TAIL_LINES


def test_a_killed_job_says_so_and_how_to_resume():
    message = joblog.job_message("INFO step 40 loss 2.1\n", 128 + 9)
    assert "killed by SIGKILL" in message and "Rerun snakemake to resume" in message


def test_the_command_exits_with_the_jobs_status_and_prints_the_log_path(tmp_path):
    log = tmp_path / "train.log"
    log.write_text("snaketune train: error: train.batch_size 0 ...\n")
    shown = subprocess.run(
        [sys.executable, "-m", "snaketune.joblog", "train_model", str(log), "3"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert shown.returncode == 3
    assert "snaketune: train_model failed (exit status 3)" in shown.stderr
    assert f"log: {log}" in shown.stderr


def test_a_job_retried_after_its_failure_is_not_listed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    log = tmp_path / "train.log"
    log.write_text("snaketune train: error: out of memory\n")
    joblog.report("train_model", str(log), 1)
    assert len(joblog.failures()) == 1
    later = time.time() + 5  # the next attempt rewrote the log and succeeded
    os.utime(log, (later, later))
    assert joblog.failures() == []
    joblog.clear()
    assert not list((tmp_path / joblog.FAILURES).glob("*.json"))
