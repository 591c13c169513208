"""The final model in the Model Registry: logged as the served pyfunc model on the train run,
registered once per upload with the eval metrics as tags, its metrics linked to the test split,
and no new version when the track rule runs again."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import mlflow
import pytest

from snaketune.track.registry import MODEL_TAG, SERVING_PACKAGES, pip_requirements, servable
from snaketune.track.settings import MlflowSettings, TrackSettings, registered_model_name
from tests.support.mlflow_stores import (
    EXPERIMENT,
    METRICS,
    MLFLOW_EXPERIMENT,
    SPLIT_SHA,
    StageInputs,
    Store,
    all_runs,
    new_store,
    settings_for,
    track,
    write_stage_files,
    write_tiny_model,
)

NAME = "snaketune-tests.demo-lm"


def test_registered_name_defaults_to_experiment_and_entry_names():
    mlflow_config = MlflowSettings(experiment_name="snaketune-demo", register_models=True)
    entry = {"name": "demo-lm", "registered_model_name": ""}
    assert registered_model_name(mlflow_config, entry) == "snaketune-demo.demo-lm"
    named = {**entry, "registered_model_name": "support-agent"}
    assert registered_model_name(mlflow_config, named) == "support-agent"
    assert registered_model_name(replace(mlflow_config, register_models=False), named) is None


def test_pip_requirements_pin_the_installed_versions_without_local_tags():
    requirements = pip_requirements()
    assert [r.split("==")[0] for r in requirements] == list(SERVING_PACKAGES)
    assert f"mlflow=={mlflow.__version__}" in requirements
    assert all("+" not in r for r in requirements)  # torch's '+cpu' is not on PyPI


def test_a_folder_of_no_known_model_is_kept_as_an_artifact_and_not_registered(store, tmp_path):
    """Neither a transformers config nor the LSTM's (which is served as a pyfunc model: see
    tests/integration/test_serving.py)."""
    inputs = write_stage_files(tmp_path / "results")
    (inputs.model_dir / "config.json").unlink()
    assert not servable(inputs.model_dir)
    (inputs.model_dir / "snaketune_lstm.json").write_text("{}")
    assert servable(inputs.model_dir)
    (inputs.model_dir / "snaketune_lstm.json").unlink()
    settings = settings_for(store.uri, NAME)
    runs_path = tmp_path / "runs.json"
    track(settings, inputs, runs_path, store.artifact_dir)
    assert json.loads(runs_path.read_text())["model"] is None
    assert store.client.search_registered_models() == []


# --- a real tiny model, registered (slow: importing transformers' pipelines takes ~20 s) --------


@dataclass(frozen=True)
class Registered:
    store: Store
    settings: TrackSettings
    inputs: StageInputs
    runs_path: Path
    ids: dict[str, str]

    @property
    def model(self) -> dict[str, str]:
        return json.loads(self.runs_path.read_text())["model"]


def register_tiny_lm(root: Path, empty_db: Path, lm_data: dict) -> Registered:
    store = new_store(root / "store", empty_db)
    inputs = write_stage_files(root / "results")
    write_tiny_model(lm_data, inputs.model_dir, "causal_lm")
    settings = settings_for(store.uri, NAME)
    runs_path = root / "results" / "runs.json"
    ids = track(settings, inputs, runs_path, store.artifact_dir)
    return Registered(store, settings, inputs, runs_path, ids)


@pytest.fixture(scope="module")
def registered(tmp_path_factory, empty_store_db, lm_data) -> Registered:
    return register_tiny_lm(tmp_path_factory.mktemp("registered"), empty_store_db, lm_data)


@pytest.mark.slow
def test_model_is_logged_on_the_train_run_and_registered(registered):
    client = registered.store.client
    model = registered.model
    assert model["name"] == NAME and model["version"] == "1"
    assert model["uri"] == f"models:/{NAME}/1"
    version = client.get_model_version(NAME, "1")
    assert version.run_id == registered.ids["train"]
    assert version.source == f"models:/{model['model_id']}"
    logged = client.get_logged_model(model["model_id"])
    assert logged.source_run_id == registered.ids["train"]
    parent = client.get_run(registered.ids["parent"])
    assert json.loads(parent.data.tags[MODEL_TAG]) == model
    assert parent.info.status == "FINISHED"


@pytest.mark.slow
def test_model_version_carries_the_eval_metrics_and_its_runs(registered):
    version = registered.store.client.get_model_version(NAME, "1")
    assert version.tags["eval.perplexity"] == str(METRICS["perplexity"])
    assert version.tags["eval.accuracy"] == str(METRICS["accuracy"])
    assert "eval.per_class.billing.f1" not in version.tags  # headline numbers only
    for name in ("parent", "train", "evaluate"):
        assert version.tags[f"snaketune.{name}_run_id"] == registered.ids[name]
    assert version.tags["snaketune.task"] == "causal_lm"
    assert registered.ids["evaluate"] in version.description
    assert METRICS["protocol"] in version.description
    card = registered.runs_path.with_name("model_card.md").read_text()
    assert card in version.description  # the model card is the version's description


@pytest.mark.slow
def test_the_registered_model_and_its_version_open_with_what_the_model_is(registered):
    client = registered.store.client
    about = client.get_registered_model(NAME).description
    assert about.startswith("`causal_lm` models of experiment")
    version = client.get_model_version(NAME, "1")
    card = registered.runs_path.with_name("model_card.md").read_text()
    assert version.description.startswith(card)  # the card's title and summary first


@pytest.mark.slow
def test_the_logged_model_holds_the_model_card_as_its_readme(registered, tmp_path):
    client = registered.store.client
    names = {a.path for a in client.list_logged_model_artifacts(registered.model["model_id"])}
    assert "README.md" in names


@pytest.mark.slow
def test_eval_metrics_are_linked_to_the_logged_model_and_the_test_split(registered):
    logged = registered.store.client.get_logged_model(registered.model["model_id"])
    linked = {m.key: m for m in logged.metrics if m.key.startswith("eval.")}
    assert linked["eval.perplexity"].value == METRICS["perplexity"]
    assert linked["eval.perplexity"].run_id == registered.ids["evaluate"]
    assert linked["eval.perplexity"].dataset_name == "support-demo/test"
    assert linked["eval.perplexity"].dataset_digest == SPLIT_SHA["test"][:16]
    assert linked["eval.per_class.billing.f1"].value == 0.88


@pytest.mark.slow
def test_logged_model_pins_its_requirements_and_answers(registered, monkeypatch):
    model_id = registered.model["model_id"]
    artifacts = registered.store.artifact_dir / "models" / model_id / "artifacts"
    assert (artifacts / "requirements.txt").read_text().split() == pip_requirements()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registered.store.uri)
    model = mlflow.pyfunc.load_model(registered.model["uri"])
    answers = model.predict(["Customer: hi"])
    assert len(answers) == 1 and answers[0].startswith("Customer: hi")


@pytest.mark.slow
def test_logged_model_is_named_after_the_experiment_and_declares_its_params(
    registered, monkeypatch
):
    """The generation params a request may send are in the model's signature (MLflow's UI and
    `mlflow models predict` show them); the logged model is the experiment's, not `pipeline`."""
    logged = registered.store.client.get_logged_model(registered.model["model_id"])
    assert logged.name == EXPERIMENT
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registered.store.uri)  # models:/ goes by it
    info = mlflow.models.get_model_info(f"models:/{logged.model_id}")
    params = {spec.name: spec.default for spec in info.signature.params.params}
    assert params == dict.fromkeys(
        ["max_new_tokens", "decoding", "do_sample", "temperature", "top_k", "top_p"]
    )


@pytest.mark.slow
def test_rerun_with_unchanged_results_registers_no_new_version(registered):
    first = registered.model
    again = track(
        registered.settings, registered.inputs, registered.runs_path, registered.store.artifact_dir
    )
    assert again == registered.ids
    assert registered.model == first
    versions = registered.store.client.search_model_versions(f"name = '{NAME}'")
    assert [str(v.version) for v in versions] == ["1"]


@pytest.mark.slow
def test_an_upload_cut_short_after_registering_is_completed_with_its_version(
    tmp_path, empty_store_db, lm_data
):
    """A parent left unfinished (the job died after registering, before the model tag and the
    end): the rerun completes the same runs and keeps that version and logged model, registering
    and logging nothing again."""
    cut = register_tiny_lm(tmp_path, empty_store_db, lm_data)
    client = cut.store.client
    client.update_run(cut.ids["parent"], status="RUNNING")
    client.delete_tag(cut.ids["parent"], MODEL_TAG)
    ids = track(cut.settings, cut.inputs, cut.runs_path, cut.store.artifact_dir)
    assert ids == cut.ids
    assert client.get_run(ids["parent"]).info.status == "FINISHED"
    versions = client.search_model_versions(f"name = '{NAME}'")
    assert [str(v.version) for v in versions] == ["1"] and versions[0].run_id == ids["train"]
    assert json.loads(cut.runs_path.read_text())["model"] == cut.model
    experiment = client.get_experiment_by_name(MLFLOW_EXPERIMENT)
    models = client.search_logged_models([experiment.experiment_id])
    assert [m.source_run_id for m in models] == [ids["train"]]
    assert len(all_runs(client)) == len(ids)


def test_a_sweep_points_name_becomes_a_name_mlflow_allows_for_a_logged_model():
    from mlflow.utils.validation import _validate_logged_model_name

    from snaketune.track.registry import logged_model_name

    assert logged_model_name("demo-lm") == "demo-lm"
    assert logged_model_name("lm.lr-0.001.n_layer-2") == "lm-lr-0-001-n_layer-2"
    _validate_logged_model_name(logged_model_name("lm.lr-0.001"))  # raises on a refused name
