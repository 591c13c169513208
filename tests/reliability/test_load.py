"""Scenario 23: fifty experiments in one config on two cores, under a low open-file limit, all
tracked into one SQLite MLflow store.

Running all 50 x 7 stage jobs would spend about ten minutes on process start-up alone (each job
imports torch or MLflow), so the load that the scenario is about is produced cheaply and for
real: a dry run plans the whole 50-experiment DAG, and a real run executes the 50 track jobs -
the ones that share a resource (the store) - two at a time, against upstream results that are
copies of one tiny experiment's."""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import subprocess

import pytest
import yaml
from mlflow import MlflowClient

from tests.support.reliability import EXPERIMENT, pipeline_config, workdir_with
from tests.support.workflow import snakemake_command

EXPERIMENTS = [f"exp-{i:02d}" for i in range(50)]
STAGE_RULES = [
    "clean_corpus",
    "split_corpus",
    "prepare_tokenizer",
    "gather_shards",
    "train_model",
    "evaluate_model",
    "track_experiment",
]
OPEN_FILES = 128  # a low `ulimit -n`: leaked handles would run out long before 50 experiments


def job_counts(output: str) -> dict[str, int]:
    """Snakemake's "Job stats" table as {rule: count}."""
    table = output[output.index("Job stats:") :].split("\n\n")[0]
    return {m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, re.M)}


@pytest.mark.slow
def test_fifty_experiments_plan_every_stage_once(tmp_path):
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(pipeline_config(EXPERIMENTS)))
    result = subprocess.run(
        snakemake_command(tmp_path, "--dry-run", "--cores", "2"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    counts = job_counts(result.stdout)
    assert counts.pop("download_dataset") == 1 and counts.pop("all") == 1  # one shared download
    counts.pop("total")
    assert set(STAGE_RULES) <= set(counts)
    # Fifty experiments on the same data settings: one job per data stage, shared by all of
    # them (snaketune.sharing); then each trains, evaluates and tracks its own.
    shared = {
        "clean_corpus",
        "split_corpus",
        "prepare_tokenizer",
        "plan_partitions",
        "gather_shards",
    }
    assert {rule: counts[rule] for rule in shared} == dict.fromkeys(shared, 1), counts
    assert {rule: n for rule, n in counts.items() if rule not in shared} == dict.fromkeys(
        set(STAGE_RULES) - shared, 50
    ), counts


def _low_open_file_limit() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (OPEN_FILES, OPEN_FILES))


@pytest.mark.slow
def test_fifty_track_jobs_share_one_sqlite_store_and_every_run_lands_once(
    interrupted_pipeline, tmp_path
):
    workdir = workdir_with(interrupted_pipeline.results, tmp_path, EXPERIMENTS)
    results = workdir / "results"
    for name in EXPERIMENTS:  # hard links keep the mtimes, so upstream outputs stay up to date
        shutil.copytree(results / EXPERIMENT, results / name, symlinks=True, copy_function=os.link)
        shutil.rmtree(results / name / "track")
    shutil.rmtree(results / EXPERIMENT)
    shutil.rmtree(results / "mlartifacts")
    (results / "mlflow.db").unlink()

    run = subprocess.run(
        snakemake_command(workdir, "--cores", "2"),
        capture_output=True,
        text=True,
        timeout=900,
        preexec_fn=_low_open_file_limit,
    )

    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert job_counts(run.stdout + run.stderr) == {"track_experiment": 50, "all": 1, "total": 51}
    client = MlflowClient(tracking_uri=f"sqlite:///{results / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("snaketune-reliability")
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    parents = {r.info.run_id: r for r in runs if "mlflow.parentRunId" not in r.data.tags}
    assert sorted(r.info.run_name for r in parents.values()) == EXPERIMENTS  # each exactly once
    assert all(r.info.status == "FINISHED" for r in runs)
    for parent_id, parent in parents.items():
        children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent_id]
        assert len(children) == 7, parent.info.run_name
        written = json.loads((results / parent.info.run_name / "track" / "runs.json").read_text())
        assert written["runs"]["parent"] == parent_id
    assert len(runs) == 50 * 8
