"""The MLflow stage against a real `mlflow server` on 127.0.0.1: runs, params, metric history and
proxied artifacts arrive over HTTP; an unreachable server is a clear error, and the upload after
an outage happens exactly once."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from mlflow import MlflowClient

from snaketune.errors import TrackingError
from snaketune.track import MAX_PARAM_LENGTH, RUN_KEY_TAG, STAGES, TrackSettings, run_key
from tests.unit.test_track import (
    EVAL_METRIC_NAMES,
    EXPERIMENT,
    HISTORY,
    all_runs,
    artifact_paths,
    settings_for,
    track,
    write_stage_files,
)

MLFLOW = Path(sys.executable).parent / "mlflow"
STARTUP_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Server:
    uri: str
    artifacts: Path
    """Where the server stores the artifacts clients upload through it."""


def free_port() -> int:
    """A loopback port nothing listens on (the OS picked it and it is closed again)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_healthy(uri: str, process: subprocess.Popen, log_path: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"mlflow server exited with {process.returncode}:\n{log_path.read_text()}")
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass  # not listening yet
        time.sleep(0.25)
    pytest.fail(f"mlflow server not healthy after {STARTUP_TIMEOUT_S} s:\n{log_path.read_text()}")


def stop(process: subprocess.Popen) -> None:
    """SIGTERM the server's process group (it runs uvicorn and a job runner as children), then
    SIGKILL whatever is left after 15 s."""
    for sig, wait_s in ((signal.SIGTERM, 15), (signal.SIGKILL, 15)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    artifacts = root / "artifacts"
    log_path = root / "server.log"
    command = [
        str(MLFLOW),
        "server",
        "--backend-store-uri",
        f"sqlite:///{root}/mlflow.db",
        # New experiments get proxied artifacts: clients upload them over HTTP to the server,
        # which stores them under --artifacts-destination.
        "--default-artifact-root",
        "mlflow-artifacts:/",
        "--artifacts-destination",
        str(artifacts),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    # Lets a test create an experiment whose artifact location is an http URL (on this loopback
    # server); the server refuses such locations by default.
    env["MLFLOW_ALLOWED_HOST_ADDRESSED_ARTIFACT_SCHEMES"] = "http"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, cwd=root, env=env, start_new_session=True
        )
    try:
        wait_until_healthy(uri, process, log_path)
        yield Server(uri, artifacts)
    finally:
        stop(process)


def server_settings(uri: str, mlflow_experiment: str) -> TrackSettings:
    # As the workflow does for an http(s) URI: the server decides where artifacts go.
    return replace(settings_for(uri, None), mlflow_experiment=mlflow_experiment)


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
    assert artifact_paths(client, ids["train"]) == {"manifest.json", "history.jsonl", "model"}
    assert artifact_paths(client, ids["train"], "model") == {
        "model/config.json",
        "model/model.safetensors",
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
def test_unfinished_parent_on_the_server_is_replaced(mlflow_server, tmp_path):
    inputs = write_stage_files(tmp_path / "results")
    settings = server_settings(mlflow_server.uri, "server-cut-short")
    client = MlflowClient(tracking_uri=mlflow_server.uri)
    experiment_id = client.create_experiment("server-cut-short")
    stale = client.create_run(
        experiment_id, run_name=EXPERIMENT, tags={RUN_KEY_TAG: run_key(settings, inputs.stages)}
    )
    ids = track(settings, inputs, tmp_path / "runs.json")
    assert ids["parent"] != stale.info.run_id
    assert client.get_run(stale.info.run_id).info.lifecycle_stage == "deleted"
    assert client.get_run(ids["parent"]).info.status == "FINISHED"
    active = client.search_runs([experiment_id])
    assert {run.info.run_id for run in active} == set(ids.values())


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
