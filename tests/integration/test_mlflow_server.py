"""The MLflow stage against a real `mlflow server` on 127.0.0.1: runs, params, metric history and
proxied artifacts arrive over HTTP; an unreachable server is a clear error, and the upload after
an outage happens exactly once."""

from __future__ import annotations

import json
import re
import subprocess
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from snaketune.errors import TrackingError
from snaketune.settings import config_hash
from snaketune.track import stage_log
from snaketune.track.reconcile import STAGES
from snaketune.track.stage_log import MAX_PARAM_LENGTH
from tests.support.mlflow_stores import (
    EVAL_METRIC_NAMES,
    EXPERIMENT,
    HISTORY,
    all_runs,
    artifact_paths,
    server_settings,
    track,
    write_stage_files,
)
from tests.support.servers import free_port, start_server, stop
from tests.support.workflow import snakemake, tiny_config


@pytest.mark.slow
def test_runs_params_and_metric_history_arrive_on_the_server(mlflow_server, tmp_path):
    settings = server_settings(mlflow_server.uri, "server-upload")
    ids = track(settings, write_stage_files(tmp_path / "results"), tmp_path / "runs.json")
    client = MlflowClient(tracking_uri=mlflow_server.uri)
    runs = all_runs(client, "server-upload")
    assert {run.info.run_id for run in runs} == set(ids.values())
    assert all(run.info.status == "FINISHED" for run in runs)
    parent = client.get_run(ids["parent"])
    assert parent.info.run_name == EXPERIMENT
    assert parent.data.params["train.lr"] == "0.003"
    assert len(parent.data.params["evaluate.prompts"]) == MAX_PARAM_LENGTH
    assert set(parent.data.metrics) == EVAL_METRIC_NAMES
    for stage in STAGES:
        assert client.get_run(ids[stage]).data.tags["mlflow.parentRunId"] == ids["parent"]
    loss = sorted(client.get_metric_history(ids["train"], "train.loss"), key=lambda m: m.step)
    assert [(m.step, m.value) for m in loss] == [(row["step"], row["loss"]) for row in HISTORY]


@pytest.mark.slow
def test_artifacts_are_uploaded_through_the_server(mlflow_server, tmp_path):
    settings = server_settings(mlflow_server.uri, "server-artifacts")
    ids = track(settings, write_stage_files(tmp_path / "results"), tmp_path / "runs.json")
    client = MlflowClient(tracking_uri=mlflow_server.uri)
    experiment = client.get_experiment_by_name("server-artifacts")
    assert experiment.artifact_location.startswith("mlflow-artifacts:")
    assert artifact_paths(client, ids["parent"]) == {"config.json"}
    assert artifact_paths(client, ids["train"]) == {
        "manifest.json",
        "history.jsonl",
        "system_metrics.jsonl",
        "model",
    }
    assert artifact_paths(client, ids["train"], "model") == {
        "model/config.json",
        "model/model.safetensors",
        "model/README.md",  # the model card
    }
    for stage in STAGES:
        assert "manifest.json" in artifact_paths(client, ids[stage])
    stored = mlflow_server.artifacts / experiment.experiment_id / ids["train"] / "artifacts"
    assert (stored / "model" / "model.safetensors").read_bytes() == bytes(range(256)) * 4


@pytest.mark.slow
def test_unreachable_server_is_a_tracking_error_naming_the_uri(tmp_path):
    dead = f"http://127.0.0.1:{free_port()}"
    runs_path = tmp_path / "runs.json"
    with pytest.raises(TrackingError) as caught:
        track(server_settings(dead, "never"), write_stage_files(tmp_path / "results"), runs_path)
    message = str(caught.value)
    assert dead in message
    assert "unreachable" in message
    assert "complete" in message and "rerun" in message
    assert not runs_path.exists()


@pytest.mark.slow
def test_upload_after_an_outage_happens_exactly_once(mlflow_server, tmp_path):
    inputs = write_stage_files(tmp_path / "results")
    runs_path = tmp_path / "runs.json"
    dead = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(TrackingError):
        track(server_settings(dead, "server-outage"), inputs, runs_path)
    assert not runs_path.exists()

    settings = server_settings(mlflow_server.uri, "server-outage")
    ids = track(settings, inputs, runs_path)
    assert json.loads(runs_path.read_text())["runs"] == ids
    again = track(settings, inputs, runs_path)
    assert again == ids
    client = MlflowClient(tracking_uri=mlflow_server.uri)
    assert len(all_runs(client, "server-outage")) == 1 + len(STAGES)
    assert len(client.get_metric_history(ids["train"], "train.loss")) == len(HISTORY)


@pytest.mark.slow
def test_runs_left_running_on_the_server_are_completed(mlflow_server, tmp_path):
    """A workflow killed mid-way leaves its parent RUNNING on the server, its id under
    results/: the track job finishes that parent instead of making another."""
    inputs = write_stage_files(tmp_path / "results")
    settings = server_settings(mlflow_server.uri, "server-cut-short")
    client = MlflowClient(tracking_uri=mlflow_server.uri)
    experiment_id = client.create_experiment("server-cut-short")
    ids = stage_log.RunIds(inputs.tracking, mlflow_server.uri, config_hash(settings.config))
    parent = stage_log.parent_run(client, ids, experiment_id, EXPERIMENT, {}, 0)
    uploaded = track(settings, inputs, tmp_path / "runs.json")
    assert uploaded["parent"] == parent
    assert client.get_run(parent).info.status == "FINISHED"
    active = client.search_runs([experiment_id])
    assert {run.info.run_id for run in active} == set(uploaded.values())


@pytest.mark.slow
def test_refused_artifact_upload_is_a_tracking_error(mlflow_server, tmp_path):
    # An HTTP artifact store that answers uploads with an error status, as a proxy in front of
    # the server does for a body over its size limit (413): here a path that is not an endpoint.
    client = MlflowClient(tracking_uri=mlflow_server.uri)
    client.create_experiment(
        "server-refusing", artifact_location=f"{mlflow_server.uri}/not-an-artifact-endpoint"
    )
    settings = server_settings(mlflow_server.uri, "server-refusing")
    runs_path = tmp_path / "runs.json"
    with pytest.raises(TrackingError) as caught:
        track(settings, write_stage_files(tmp_path / "results"), runs_path)
    assert mlflow_server.uri in str(caught.value)
    assert "rerun" in str(caught.value)
    assert not runs_path.exists()


@pytest.mark.slow
def test_credentials_in_the_tracking_uri_never_reach_results_or_runs(
    mlflow_server, tmp_path, monkeypatch
):
    secret = "tok-5d1e4f0b9c"
    host = mlflow_server.uri.removeprefix("http://")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://ci:{secret}@{host}")
    settings = server_settings("sqlite:////nonexistent/configured.db", "server-secret")
    results = tmp_path / "results"
    ids = track(settings, write_stage_files(results), tmp_path / "runs.json")
    written = [p.read_text(errors="replace") for p in tmp_path.rglob("*") if p.is_file()]
    assert written and not any(secret in text for text in written)
    client = MlflowClient(tracking_uri=mlflow_server.uri)
    for run_id in ids.values():
        data = client.get_run(run_id).data
        assert secret not in json.dumps([data.params, data.tags])


# --- the workflow through an outage -------------------------------------------------------------
# One tiny pipeline run against a real server that goes down before the track jobs: the run fails
# in those jobs alone, and the next `snakemake`, with the server back on the same store, uploads
# everything exactly once. The checks of what the server then holds (run tree, params, per-step
# metrics, artifacts, dataset inputs, model versions) read that final state.

OUTAGE_EXPERIMENTS = ("demo-lm", "demo-intent")
OUTAGE_STEPS = 10
SERVER_DOWN_TIMEOUT_S = 600


def outage_config() -> dict:
    config = tiny_config()
    config["mlflow"]["experiment_name"] = "snaketune-outage"
    for entry in config["experiments"]:
        entry["train"].update(max_steps=OUTAGE_STEPS, eval_every=5, checkpoint_every=OUTAGE_STEPS)
    return config


def stop_when_training_is_done(results: Path, pipeline: Future, process: subprocess.Popen) -> None:
    """Take the server down once the first model is trained, before any track job can start
    (each waits for its evaluate job)."""
    deadline = time.monotonic() + SERVER_DOWN_TIMEOUT_S
    while not list(results.glob("*/train/manifest.json")) and not pipeline.done():
        assert time.monotonic() < deadline, "no model trained in time"
        time.sleep(0.5)
    stop(process)


def jobs_left(dry_run: subprocess.CompletedProcess) -> dict[str, int]:
    """The 'Job stats' table of a dry run, as {rule: count}."""
    jobs = {}
    for line in dry_run.stdout.splitlines():
        match = re.fullmatch(r"(\w+)\s+(\d+)", line.strip())
        if match and match[1] != "total":
            jobs[match[1]] = int(match[2])
    return jobs


@dataclass(frozen=True)
class Outage:
    results: Path
    uri: str
    failed: subprocess.CompletedProcess
    failed_logs: dict[str, str]
    """Each experiment's track.log after the failed invocation (the rerun rewrites it)."""
    left: dict[str, int]
    rerun: subprocess.CompletedProcess
    client: MlflowClient
    seconds: float

    def runs(self) -> list:
        return all_runs(self.client, "snaketune-outage")

    def tree(self, experiment: str) -> tuple:
        """(parent, {stage: child}) of one experiment."""
        runs = self.runs()
        parent = next(r for r in runs if r.info.run_name == experiment)
        children = {
            r.info.run_name: r
            for r in runs
            if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id
        }
        return parent, children


@pytest.fixture(scope="module")
def outage(tmp_path_factory):
    started = time.monotonic()
    root = tmp_path_factory.mktemp("outage")
    workdir = root / "workdir"
    workdir.mkdir()
    (workdir / "config.yaml").write_text(yaml.safe_dump(outage_config()))
    results = workdir / "results"
    port = free_port()
    server, process = start_server(root / "server", port)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MLFLOW_TRACKING_URI", server.uri)
        try:
            with ThreadPoolExecutor(1) as pool:
                pipeline = pool.submit(snakemake, workdir)
                stop_when_training_is_done(results, pipeline, process)
                failed = pipeline.result()
            logs = {
                name: (results / name / "track" / "track.log").read_text()
                for name in OUTAGE_EXPERIMENTS
            }
            left = jobs_left(snakemake(workdir, "--dry-run"))
            server, process = start_server(root / "server", port)  # same store, same address
            rerun = snakemake(workdir)
            assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
            client = MlflowClient(tracking_uri=server.uri)
            seconds = time.monotonic() - started
            yield Outage(results, server.uri, failed, logs, left, rerun, client, seconds)
        finally:
            stop(process)


@pytest.mark.slow
def test_an_outage_fails_only_the_track_jobs_and_says_what_to_do(outage):
    output = outage.failed.stdout + outage.failed.stderr
    assert outage.failed.returncode != 0
    assert re.findall(r"Error in rule (\w+):", output) == ["track_experiment"] * 2
    for message in outage.failed_logs.values():
        assert f"MLflow tracking server {outage.uri} is unreachable" in message
        assert "Every result is complete under results/" in message
        assert "rerun snakemake" in message
        assert "Traceback" not in message


@pytest.mark.slow
def test_after_the_outage_every_other_result_is_complete(outage):
    # A dry run after the failed invocation: only the uploads (and the target rule) are left.
    assert outage.left == {"all": 1, "track_experiment": 2}


@pytest.mark.slow
def test_the_rerun_uploads_every_run_and_model_version_exactly_once(outage):
    runs = outage.runs()  # deleted runs included: a second upload would show here
    assert len(runs) == len(OUTAGE_EXPERIMENTS) * (1 + len(STAGES))
    assert all(r.info.status == "FINISHED" and r.info.lifecycle_stage == "active" for r in runs)
    for experiment in OUTAGE_EXPERIMENTS:
        runs_json = json.loads((outage.results / experiment / "track" / "runs.json").read_text())
        parent, children = outage.tree(experiment)
        assert runs_json["runs"] == {
            "parent": parent.info.run_id,
            **{name: run.info.run_id for name, run in children.items()},
        }
        name = f"snaketune-outage.{experiment}"
        versions = outage.client.search_model_versions(f"name = '{name}'")
        assert [str(v.version) for v in versions] == ["1"]
        assert runs_json["model"]["uri"] == f"models:/{name}/1"
        models = outage.client.search_logged_models([parent.info.experiment_id])
        assert sum(m.source_run_id == children["train"].info.run_id for m in models) == 1
    print(f"outage test: pipeline, outage and rerun took {outage.seconds:.0f} s")


@pytest.mark.slow
def test_server_holds_the_run_tree_and_params(outage):
    for experiment in OUTAGE_EXPERIMENTS:
        parent, children = outage.tree(experiment)
        assert sorted(children) == sorted(STAGES)
        assert parent.data.params["name"] == experiment
        assert parent.data.params["train.max_steps"] == str(OUTAGE_STEPS)
        assert children["train"].data.params["train.max_steps"] == str(OUTAGE_STEPS)
        assert children["split"].data.params["train"] == "0.8"
        assert "--configfile" in parent.data.tags["snakemake.command"]
        assert parent.data.tags["git.commit"] and parent.data.tags["device"] == "cpu"


@pytest.mark.slow
def test_server_holds_per_step_history_data_counts_and_system_metrics(outage):
    for experiment in OUTAGE_EXPERIMENTS:
        parent, children = outage.tree(experiment)
        train_id = children["train"].info.run_id
        for name in ("train.loss", "train.lr", "train.grad_norm", "train.tokens_per_s"):
            history = outage.client.get_metric_history(train_id, name)
            assert sorted(m.step for m in history) == list(range(1, OUTAGE_STEPS + 1)), name
        val = outage.client.get_metric_history(train_id, "train.val_loss")
        assert sorted(m.step for m in val) == [5, 10]
        cpu = outage.client.get_metric_history(train_id, "system/cpu_utilization_percentage")
        assert cpu and all(m.timestamp > 1e12 for m in cpu)  # wall-clock milliseconds
        assert "system/process_rss_megabytes" in children["train"].data.metrics
        # Counts are tags of their stage's run (single values, not charts).
        clean = children["clean"].data.tags
        assert int(clean["counts.input_records"]) > int(clean["counts.output_records"]) > 0
        tokenize = children["tokenize"].data.tags
        assert int(tokenize["counts.train.documents"]) > 0 < int(tokenize["counts.test.rows"])
        assert not children["clean"].data.metrics and not children["tokenize"].data.metrics
        eval_names = set(parent.data.metrics)
        assert {"eval.perplexity"} <= eval_names or {"eval.accuracy", "eval.macro_f1"} <= eval_names


@pytest.mark.slow
def test_server_holds_the_artifacts_and_dataset_inputs(outage):
    for experiment in OUTAGE_EXPERIMENTS:
        _, children = outage.tree(experiment)
        train_id = children["train"].info.run_id
        assert artifact_paths(outage.client, train_id) == {
            "manifest.json",
            "history.jsonl",
            "loss_curve.png",
            "system_metrics.jsonl",
            "model",
        }
        assert "model/model.safetensors" in artifact_paths(outage.client, train_id, "model")
        contexts = {
            stage: {
                (i.dataset.name, {t.key: t.value for t in i.tags}["mlflow.data.context"])
                for i in children[stage].inputs.dataset_inputs
            }
            for stage in ("train", "evaluate")
        }
        assert contexts == {
            "train": {("support-demo/train", "training"), ("support-demo/val", "validation")},
            "evaluate": {("support-demo/test", "test")},
        }
        test_input = children["evaluate"].inputs.dataset_inputs[0]
        assert json.loads(test_input.dataset.source)["uri"].endswith("support.jsonl.gz")


@pytest.mark.slow
def test_server_holds_a_model_version_per_experiment_with_its_metrics(outage):
    for experiment in OUTAGE_EXPERIMENTS:
        parent, children = outage.tree(experiment)
        version = outage.client.get_model_version(f"snaketune-outage.{experiment}", "1")
        assert version.run_id == children["train"].info.run_id
        assert version.tags["snaketune.evaluate_run_id"] == children["evaluate"].info.run_id
        headline = "eval.perplexity" if experiment == "demo-lm" else "eval.accuracy"
        assert float(version.tags[headline]) == parent.data.metrics[headline]
        logged = outage.client.get_logged_model(version.source.removeprefix("models:/"))
        linked = {m.key: m for m in logged.metrics}
        assert linked[headline].dataset_name == "support-demo/test"
