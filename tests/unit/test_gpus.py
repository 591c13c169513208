"""snaketune.gpus on a machine with a declared device list (no GPU needs to exist): jobs that
run at once get disjoint CUDA_VISIBLE_DEVICES, a job that finds too few free devices says so,
and a finished (or killed) job's devices are free again."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from snaketune.gpus import DEVICES_VARIABLE


@pytest.fixture
def machine(tmp_path) -> dict[str, str]:
    """The environment of a machine with GPUs 0, 1, 2 and its own lock folder (not inside a
    SLURM job, which hands out GPUs itself)."""
    inherited = {
        k: v for k, v in os.environ.items() if k not in ("SLURM_JOB_ID", "CUDA_VISIBLE_DEVICES")
    }
    return {**inherited, DEVICES_VARIABLE: "0,1,2", "TMPDIR": str(tmp_path)}


def holding(
    count: int, env: dict[str, str], seen: Path, until: Path | None = None
) -> subprocess.Popen:
    """A job asking for `count` GPUs that writes what it sees, then holds them until the file
    `until` exists (None: it exits at once)."""
    wait = f"while [ ! -e {until} ]; do sleep 0.05; done" if until else "true"
    script = f'echo "$CUDA_VISIBLE_DEVICES" > {seen}; {wait}'
    command = [sys.executable, "-m", "snaketune.gpus", str(count), "--", "sh", "-c", script]
    return subprocess.Popen(
        command, env=env, stderr=subprocess.PIPE, text=True, start_new_session=True
    )


def wait_for_files(*paths: Path) -> None:
    deadline = time.monotonic() + 30
    while not all(p.exists() and p.read_text() for p in paths) and time.monotonic() < deadline:
        time.sleep(0.05)


def test_jobs_running_at_once_get_disjoint_devices(machine, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    release = tmp_path / "release"
    jobs = [holding(1, machine, one, release), holding(2, machine, two, release)]
    try:
        wait_for_files(one, two)
        first, second = (set(p.read_text().strip().split(",")) for p in (one, two))
        assert len(first) == 1 and len(second) == 2 and not first & second
        assert first | second == {"0", "1", "2"}

        crowded = holding(1, machine, tmp_path / "three")  # every device is held now
        assert crowded.wait(timeout=30) != 0
        assert "needs 1 GPU(s), but only 0 of this machine's devices" in crowded.stderr.read()
    finally:
        release.touch()
    for job in jobs:
        assert job.wait(timeout=30) == 0

    again = holding(3, machine, tmp_path / "four")  # released when the jobs exited
    assert again.wait(timeout=30) == 0
    assert (tmp_path / "four").read_text().strip() == "0,1,2"


def test_a_killed_jobs_devices_are_free_again(machine, tmp_path):
    seen = tmp_path / "seen"
    job = holding(3, machine, seen, tmp_path / "never")
    wait_for_files(seen)
    os.killpg(job.pid, signal.SIGKILL)  # the job and what it started, as a killed job goes
    job.wait(timeout=30)
    after = holding(3, machine, tmp_path / "after")
    assert after.wait(timeout=30) == 0


def test_no_gpu_asked_leaves_the_environment_alone(machine, tmp_path):
    seen = tmp_path / "seen"
    job = holding(0, {**machine, "CUDA_VISIBLE_DEVICES": "7"}, seen)
    assert job.wait(timeout=30) == 0
    assert seen.read_text().strip() == "7"
