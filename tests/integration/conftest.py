"""The demo workflow run once for the whole session: test_workflow checks it, and test_slurm
compares a cluster run of the same config with it. The MLflow UI tests' headless browser."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.support.ui import browser  # noqa: F401 - a fixture of the UI tests


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """(results folder, completed snakemake) of test_workflow's tiny config run with --cores 2."""
    from tests.support.workflow import run_in_new_workdir

    return run_in_new_workdir(tmp_path_factory)
