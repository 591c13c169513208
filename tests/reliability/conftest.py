"""Fixtures of the reliability scenarios: a tiny pipeline killed while training saves and then
recovered (its results are the starting point of the other workflow-level scenarios), and an
HTTP relay in front of the session's MLflow server."""

from __future__ import annotations

import subprocess

import pytest
import yaml

from tests.support.processes import kill_tree, wait_for
from tests.support.reliability import (
    EXPERIMENT,
    Interrupted,
    Relay,
    pipeline_config,
    run_snakemake,
)
from tests.support.servers import serving
from tests.support.workflow import snakemake_command


@pytest.fixture(scope="session")
def interrupted_pipeline(tmp_path_factory) -> Interrupted:
    """One experiment through the real workflow: killed the moment train_model's model folder
    appears (its history, plot and manifest still to come), then recovered. The finished
    results/ is the starting point of the other workflow-level scenarios."""
    workdir = tmp_path_factory.mktemp("pipeline")
    (workdir / "config.yaml").write_text(yaml.safe_dump(pipeline_config([EXPERIMENT])))
    exp = workdir / "results" / EXPERIMENT
    with (workdir / "killed.log").open("w") as log:
        first = subprocess.Popen(
            snakemake_command(workdir, "--cores", "2"), stdout=log, stderr=subprocess.STDOUT
        )
    wait_for(lambda: (exp / "train" / "model").exists() or first.poll() is not None, 600)
    assert first.poll() is None, (workdir / "killed.log").read_text()[-3000:]
    kill_tree(first.pid)
    first.wait()
    outputs = ["train/model", "train/history.jsonl", "train/manifest.json", "evaluate"]
    killed = {name: (exp / name).exists() for name in outputs}
    dry_run = run_snakemake(workdir, "--dry-run")
    run_snakemake(workdir, "--unlock")  # the killed run could not remove its lock
    recovery = run_snakemake(workdir, "--cores", "2", "--rerun-incomplete")
    assert recovery.returncode == 0, recovery.stdout[-3000:] + recovery.stderr[-3000:]
    return Interrupted(workdir, killed, dry_run, recovery)


@pytest.fixture
def relay(mlflow_server):
    """A relay in front of the session's MLflow server, passing everything through at first."""
    with serving(Relay(mlflow_server.uri)) as server:
        yield server
