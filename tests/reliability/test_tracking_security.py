"""Reliability scenarios 18-22: MLflow outages and slowness never cost a result or hold up
training, uploads happen exactly once, and nothing runs or leaks that should not. A real
`mlflow server` on 127.0.0.1 sits behind a relay that can be made slow or go down."""

from __future__ import annotations

import json
import logging
import pickle
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient
from mlflow.entities import ViewType

from snaketune.config import SCHEMA
from snaketune.data.download import download_dataset
from snaketune.data.paths import DownloadPaths
from snaketune.data.settings import DownloadSettings
from snaketune.errors import DownloadError, ModelError, TrackingError, TrainingError
from snaketune.fileio import sha256_tree
from snaketune.track.reconcile import STAGES
from snaketune.train.checkpoint import CHECKPOINT, load_checkpoint
from snaketune.train.models import build_model, load_trained
from snaketune.train.settings import ModelSettings, TrainSettings
from tests.support.mlflow_stores import HISTORY, server_settings, track, write_stage_files
from tests.support.reliability import TINY_MODEL
from tests.support.stage_data import run_training


def runs_of(server, experiment: str, view=ViewType.ACTIVE_ONLY) -> list:
    client = MlflowClient(tracking_uri=server.uri)
    found = client.get_experiment_by_name(experiment)
    return client.search_runs([found.experiment_id], run_view_type=view)


@pytest.fixture
def fail_fast(monkeypatch):
    """No retries inside MLflow's client: a refused request fails the upload at once."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")


def results_without_run_ids(results: Path) -> dict[str, str]:
    return {
        str(path): sha256_tree(path)
        for path in sorted(results.rglob("*"))
        if path.is_file() and "tracking" not in path.relative_to(results).parts
    }


# --- 18. MLflow down at start or mid-run ---------------------------------------------------------


@pytest.mark.slow
def test_mlflow_down_at_start_then_mid_upload_loses_nothing_and_uploads_once(
    mlflow_server, relay, fail_fast, tmp_path
):
    inputs = write_stage_files(tmp_path / "results")
    on_disk = results_without_run_ids(tmp_path / "results")
    settings = server_settings(relay.uri, "reliability-outage")
    runs_path = tmp_path / "runs.json"

    relay.down_after = 0  # down before the first request
    with pytest.raises(TrackingError, match="unreachable"):
        track(settings, inputs, runs_path)
    relay.down_after = len(relay.seen) + 12  # up again, then down in the middle of the upload
    with pytest.raises(TrackingError, match="rerun snakemake to retry the upload"):
        track(settings, inputs, runs_path)
    cut_short = runs_of(mlflow_server, "reliability-outage")
    assert cut_short and all(run.info.status == "RUNNING" for run in cut_short)
    assert not runs_path.exists()
    assert (tmp_path / "results").exists()

    relay.down_after = None  # back for good: the next two syncs
    ids = track(settings, inputs, runs_path)
    assert track(settings, inputs, runs_path) == ids

    active = runs_of(mlflow_server, "reliability-outage")
    assert {run.info.run_id for run in active} == set(ids.values())  # one parent, one per stage
    assert len(active) == 1 + len(STAGES) and all(r.info.status == "FINISHED" for r in active)
    # The runs the cut-short upload made are the ones completed (their ids are under results/),
    # and no point arrived twice.
    assert {r.info.run_id for r in cut_short} <= set(ids.values())
    every = runs_of(mlflow_server, "reliability-outage", ViewType.ALL)
    assert len(every) == len(active)
    client = MlflowClient(tracking_uri=mlflow_server.uri)
    assert len(client.get_metric_history(ids["train"], "train.loss")) == len(HISTORY)
    # The outage touched no result (the run ids the uploads recorded are MLflow's bookkeeping).
    assert results_without_run_ids(tmp_path / "results") == on_disk


# --- 19. MLflow slow ----------------------------------------------------------------------------


@pytest.mark.slow
def test_slow_mlflow_server_never_holds_up_training_and_tracking_waits_it_out(
    mlflow_server, relay, lm_data, tmp_path, monkeypatch
):
    relay.delay_s = 3.0  # answers three seconds late
    monkeypatch.setenv("MLFLOW_TRACKING_URI", relay.uri)
    settings = TrainSettings(max_steps=20, batch_size=8, warmup_steps=2, eval_every=10)

    history = run_training(lm_data, tmp_path / "train", "causal_lm", TINY_MODEL, settings)

    assert len(history) == 20 and (tmp_path / "train" / "model").exists()
    assert relay.seen == []  # training never called MLflow: nothing to wait for
    relay.delayed = 2  # the track stage waits out a server seconds late to answer, and uploads
    ids = track(
        server_settings(relay.uri, "reliability-slow"),
        write_stage_files(tmp_path / "results"),
        tmp_path / "runs.json",
    )
    assert relay.seen and {r.info.run_id for r in runs_of(mlflow_server, "reliability-slow")} == (
        set(ids.values())
    )


# --- 20. no unpickling of arbitrary objects ------------------------------------------------------


class _Exploit:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_planted_pickle_in_the_checkpoint_is_refused_not_run(tmp_path):
    marker = tmp_path / "pwned"
    (tmp_path / "state").mkdir()
    with (tmp_path / "state" / CHECKPOINT).open("wb") as fh:
        pickle.dump({"step": 3, "payload": _Exploit(marker)}, fh)
    with pytest.raises(TrainingError, match="refusing to load"):
        load_checkpoint(tmp_path / "state", "any")
    assert not marker.exists()


def test_a_planted_pickle_in_a_model_folder_is_refused_not_run(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    model = tmp_path / "model"
    GPT2LMHeadModel(
        GPT2Config(vocab_size=64, n_positions=8, n_embd=8, n_layer=1, n_head=2)
    ).save_pretrained(model)
    (model / "model.safetensors").unlink()  # weights only as a pickle, as old checkpoints ship
    marker = tmp_path / "pwned"
    with (model / "pytorch_model.bin").open("wb") as fh:
        pickle.dump({"transformer.wte.weight": _Exploit(marker)}, fh)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        load_trained(model, "causal_lm")
    assert not marker.exists()


# --- 21. trust_remote_code off unless enabled; URL schemes ---------------------------------------


def model_with_its_own_code(root: Path, marker: Path) -> Path:
    """A model folder whose config names Python code shipped beside it, as hub repos can."""
    model = root / "custom-model"
    model.mkdir()
    auto_map = {"AutoConfig": "configuration_custom.CustomConfig"}
    (model / "config.json").write_text(json.dumps({"model_type": "custom", "auto_map": auto_map}))
    code = f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n"
    (model / "configuration_custom.py").write_text(code + "raise RuntimeError('custom code ran')\n")
    return model


def test_code_shipped_with_a_model_runs_only_with_trust_remote_code(tmp_path):
    marker = tmp_path / "ran"
    model = model_with_its_own_code(tmp_path, marker)
    settings = ModelSettings(init="pretrained", name_or_path=str(model))

    with pytest.raises(ModelError, match=r"only with model\.trust_remote_code: true"):
        build_model(settings, "causal_lm", 64, 8, 0, 0, [])
    assert not marker.exists()

    trusted = ModelSettings(init="pretrained", name_or_path=str(model), trust_remote_code=True)
    with pytest.raises(RuntimeError, match="custom code ran"):
        build_model(trusted, "causal_lm", 64, 8, 0, 0, [])
    assert marker.exists()


def test_trust_remote_code_defaults_to_off():
    schema = yaml.safe_load(Path(SCHEMA).read_text())
    experiment = schema["properties"]["experiments"]["items"]["properties"]
    for section in ("tokenizer", "model"):
        assert experiment[section]["properties"]["trust_remote_code"]["default"] is False
    assert ModelSettings().trust_remote_code is False


@pytest.mark.parametrize("url", ["ftp://example.org/data.txt", "gopher://x/y", "s3://bucket/key"])
def test_unsupported_url_schemes_are_refused(tmp_path, url):
    settings = DownloadSettings(url=url, sha256="0" * 64)
    with pytest.raises(DownloadError, match="supported are http, https, file"):
        download_dataset(DownloadPaths(tmp_path / "files", tmp_path / "manifest.json"), settings)
    assert not (tmp_path / "files").exists()


# --- 22. credentials stay out of logs, results and MLflow ----------------------------------------


@pytest.mark.slow
def test_tracking_credentials_never_reach_logs_results_or_runs(
    mlflow_server, relay, fail_fast, tmp_path, monkeypatch, capfd, caplog
):
    secret = "s3cr3t-5d1e4f0b"
    host = relay.uri.removeprefix("http://")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://ci:{secret}@{host}")
    caplog.set_level(logging.DEBUG)
    settings = server_settings("sqlite:////nonexistent/configured.db", "reliability-secret")
    results = tmp_path / "results"

    ids = track(settings, write_stage_files(results), tmp_path / "runs.json")
    relay.down_after = len(relay.seen)  # and when the server is down, the error message
    with pytest.raises(TrackingError) as caught:
        track(settings, write_stage_files(tmp_path / "again"), tmp_path / "runs-again.json")

    assert any(auth for _, _, auth in relay.seen)  # the credentials were used...
    out, err = capfd.readouterr()
    logs = out + err + caplog.text + str(caught.value)  # ...and never written anywhere
    assert "***@" in str(caught.value) and secret not in logs
    written = [p.read_text(errors="replace") for p in tmp_path.rglob("*") if p.is_file()]
    assert written and not any(secret in text for text in written)
    client = MlflowClient(tracking_uri=mlflow_server.uri)
    for run_id in ids.values():
        data = client.get_run(run_id).data
        assert secret not in json.dumps([data.params, data.tags, data.metrics])
