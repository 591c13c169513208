"""Recovery without hand surgery: what a user deletes by hand from a finished results folder
comes back on the next run, even one with nothing else to do."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from snaketune.track.stage_log import HISTORY_PREFIX
from tests.support.reliability import EXPERIMENT, run_snakemake, workdir_with

pytestmark = pytest.mark.slow


def test_an_experiment_link_deleted_by_hand_comes_back_on_a_run_with_nothing_to_do(
    interrupted_pipeline, tmp_path
):
    workdir = workdir_with(interrupted_pipeline.results, tmp_path, [EXPERIMENT])
    links = {stage: workdir / "results" / EXPERIMENT / stage for stage in ("clean", "tokenize")}
    targets = {stage: os.readlink(link) for stage, link in links.items()}
    for link in links.values():
        link.unlink()
    run = run_snakemake(workdir, "--cores", "1")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Nothing to be done" in run.stdout + run.stderr  # no hook ran: no job started
    for stage, link in links.items():
        assert link.is_symlink() and os.readlink(link) == targets[stage]
        assert (link / "manifest.json").exists()


def test_a_store_that_lost_its_runs_gets_them_again_from_a_forced_track_job(
    interrupted_pipeline, tmp_path
):
    """The store came back empty at the same URI (here: the default SQLite store deleted): the
    runs recorded under results/<experiment>/tracking/ are no longer there. The track job
    forgets them and uploads the results on disk to new runs; it used to fail on 'run not
    found' on every try."""
    from mlflow import MlflowClient

    workdir = workdir_with(interrupted_pipeline.results, tmp_path, [EXPERIMENT])
    results = workdir / "results"
    (results / "mlflow.db").unlink()
    shutil.rmtree(results / "mlartifacts", ignore_errors=True)
    run = run_snakemake(workdir, "--cores", "1", "--forcerun", "track_experiment")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    runs = json.loads((results / EXPERIMENT / "track" / "runs.json").read_text())["runs"]
    client = MlflowClient(f"sqlite:///{results / 'mlflow.db'}")
    for name, run_id in runs.items():
        got = client.get_run(run_id)
        assert got.info.status == "FINISHED", name
    train = client.get_run(runs["train"])
    loss = f"{HISTORY_PREFIX}loss"
    assert client.get_metric_history(train.info.run_id, loss), "the history uploaded again"


def test_a_shared_stage_folder_deleted_by_hand_is_made_again_by_the_next_run(
    interrupted_pipeline, tmp_path
):
    workdir = workdir_with(interrupted_pipeline.results, tmp_path, [EXPERIMENT])
    link = workdir / "results" / EXPERIMENT / "split"
    shared = link.resolve()
    shutil.rmtree(shared)
    run = run_snakemake(workdir, "--cores", "2")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "split_corpus" in run.stdout + run.stderr
    assert (shared / "manifest.json").exists() and link.resolve() == shared
