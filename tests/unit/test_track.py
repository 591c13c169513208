"""The MLflow stage against a real embedded SQLite store: one parent run per experiment with one
child run per stage, params, per-step metrics, artifacts and tags, and uploads that happen
exactly once however often the rule runs."""

from __future__ import annotations

import json
import platform
from dataclasses import dataclass, replace
from pathlib import Path

import mlflow
import pytest
from mlflow.entities import Metric, ViewType
from mlflow.utils.validation import _validate_metric_name

import snaketune
from snaketune.errors import TrackingError
from snaketune.settings import config_hash
from snaketune.track import reconcile as track_module
from snaketune.track import stage_log
from snaketune.track.reconcile import STAGES
from snaketune.track.settings import TrackSettings
from snaketune.track.stage_log import (
    MAX_PARAM_LENGTH,
    RUN_KEY_TAG,
    as_params,
    experiment_id_for,
    flatten,
    numeric_metrics,
)
from snaketune.track.tracking_uri import redact
from tests.support.mlflow_stores import (
    CONFIG,
    DOWNLOAD_URL,
    EVAL_METRIC_NAMES,
    EXPERIMENT,
    HISTORY,
    METRICS,
    MLFLOW_EXPERIMENT,
    PROMPTS,
    SPLIT_ROWS,
    SPLIT_SHA,
    SYSTEM_SAMPLES,
    TRUNCATION_NOTE,
    StageInputs,
    Store,
    all_runs,
    artifact_paths,
    download,
    expected_git_commit,
    new_store,
    settings_for,
    track,
    write_stage_files,
)


@dataclass(frozen=True)
class Tracked:
    store: Store
    settings: TrackSettings
    inputs: StageInputs
    runs_path: Path
    ids: dict[str, str]

    def run(self, name: str):
        return self.store.client.get_run(self.ids[name])


@pytest.fixture(scope="module")
def tracked(tmp_path_factory, empty_store_db) -> Tracked:
    """One upload of a complete experiment; the tests below only read what it wrote."""
    root = tmp_path_factory.mktemp("tracked")
    store = new_store(root / "store", empty_store_db)
    settings = settings_for(store.uri)
    inputs = write_stage_files(root / "results")
    runs_path = root / "results" / EXPERIMENT / "track" / "runs.json"
    ids = track(settings, inputs, runs_path, store.artifact_dir)
    return Tracked(store, settings, inputs, runs_path, ids)


# --- pure helpers -------------------------------------------------------------------------------


def test_flatten_joins_nested_keys_with_dots():
    assert flatten({"a": 1, "b": {"c": 2, "d": {"e": "x"}}}) == {"a": 1, "b.c": 2, "b.d.e": "x"}


def test_flatten_keeps_lists_and_none_as_leaves():
    assert flatten({"p": [1, {"q": 2}], "n": None}) == {"p": [1, {"q": 2}], "n": None}


def test_flatten_applies_the_prefix():
    assert flatten({"a": {"b": 1}}, "eval.") == {"eval.a.b": 1}


def test_as_params_stringifies_scalars_and_json_encodes_lists():
    params = as_params({"lr": 0.003, "dedup": True, "path": None, "prompts": ["a", "b"]})
    assert params == {"lr": "0.003", "dedup": "True", "path": "None", "prompts": '["a", "b"]'}


def test_as_params_truncates_long_values_with_a_note():
    long_text = "x" * (MAX_PARAM_LENGTH + 1)
    params = as_params({"short": "y" * MAX_PARAM_LENGTH, "long": long_text})
    assert params["short"] == "y" * MAX_PARAM_LENGTH
    assert len(params["long"]) == MAX_PARAM_LENGTH
    assert params["long"].endswith(TRUNCATION_NOTE)
    assert params["long"].startswith("x" * (MAX_PARAM_LENGTH - len(TRUNCATION_NOTE)))


def test_numeric_metrics_keeps_numbers_and_drops_everything_else():
    values = {
        "acc": 0.5,
        "rows": 110,
        "ok": True,
        "name": "billing",
        "matrix": [[1, 2]],
        "missing": None,
        "per_class": {"billing": {"f1": 0.8}},
    }
    metrics = numeric_metrics(values, "eval.")
    assert metrics == {"eval.acc": 0.5, "eval.rows": 110.0, "eval.per_class.billing.f1": 0.8}
    assert all(type(value) is float for value in metrics.values())


def test_numeric_metrics_keeps_infinite_values():
    assert numeric_metrics({"perplexity": float("inf")}) == {"perplexity": float("inf")}


def test_numeric_metrics_names_are_ones_mlflow_accepts():
    """Labels come from the user's data; MLflow rejects names with characters such as '&'."""
    labels = {"billing & payments": {"f1": 0.8}, "a+b/c": 1, "x//y": 2, "n/../a": 3}
    metrics = numeric_metrics({"per_class": labels})
    assert metrics == {
        "per_class.billing _ payments.f1": 0.8,
        "per_class.a_b_c": 1.0,
        "per_class.x__y": 2.0,
        "per_class.n_.._a": 3.0,
    }
    for name in metrics:
        _validate_metric_name(name)  # MLflow's own check: raises on a name it would refuse


def test_config_hash_ignores_key_order_and_follows_values():
    assert config_hash({"a": 1, "b": 2}) == config_hash({"b": 2, "a": 1})
    assert config_hash({"a": 1, "b": 2}) != config_hash({"a": 1, "b": 3})
    assert len(config_hash(CONFIG)) == 16


def test_a_stage_run_key_follows_its_inputs_and_params_not_its_timings(tmp_path):
    inputs = {"corpus": {"path": "a", "sha256": "1" * 64}}
    key = stage_log.run_key(inputs, {"lr": 0.1})
    assert stage_log.run_key({"corpus": {"path": "moved", "sha256": "1" * 64}}, {"lr": 0.1}) == key
    assert stage_log.run_key({"corpus": {"path": "a", "sha256": "2" * 64}}, {"lr": 0.1}) != key
    assert stage_log.run_key(inputs, {"lr": 0.2}) != key
    stage_files = write_stage_files(tmp_path)
    manifest = json.loads(stage_files.manifests["split"].read_text())
    assert manifest["run_key"] == stage_log.run_key(manifest["inputs"], manifest["params"])


# --- one upload ---------------------------------------------------------------------------------


def test_parent_run_is_named_after_the_experiment_and_finished(tracked):
    parent = tracked.run("parent")
    assert parent.info.run_name == EXPERIMENT
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["snaketune.config_hash"] == config_hash(tracked.settings.config)


def test_every_run_starts_and_ends_when_its_stage_did(tracked):
    """Durations in the UI are the stages' own: a run's start and end are its manifest's
    started_at and started_at + seconds; the parent spans them all."""
    manifests = {n: json.loads(p.read_text()) for n, p in tracked.inputs.manifests.items()}
    for name in STAGES:
        run, manifest = tracked.run(name), manifests[name]
        assert run.info.start_time == int(manifest["started_at"] * 1000)
        assert run.info.end_time == int((manifest["started_at"] + manifest["seconds"]) * 1000)
        assert run.data.tags[RUN_KEY_TAG] == manifest["run_key"]
    parent = tracked.run("parent")
    assert parent.info.start_time == tracked.run("download").info.start_time
    assert parent.info.end_time == tracked.run("evaluate").info.end_time


def test_metric_points_carry_the_time_they_were_measured(tracked):
    evaluate = json.loads(tracked.inputs.manifests["evaluate"].read_text())
    ended = int((evaluate["started_at"] + evaluate["seconds"]) * 1000)
    accuracy = tracked.store.client.get_metric_history(tracked.ids["parent"], "eval.accuracy")
    assert [m.timestamp for m in accuracy] == [ended]
    loss = tracked.store.client.get_metric_history(tracked.ids["train"], "train.loss")
    assert sorted(m.timestamp for m in loss) == [int(r["timestamp"] * 1000) for r in HISTORY]


def test_one_finished_child_run_per_stage_under_the_parent(tracked):
    assert set(tracked.ids) == {"parent", *STAGES}
    runs = all_runs(tracked.store.client)
    assert len(runs) == 1 + len(STAGES)
    parent_id = tracked.ids["parent"]
    children = [run for run in runs if run.info.run_id != parent_id]
    assert sorted(run.info.run_name for run in children) == sorted(STAGES)
    for run in children:
        assert run.data.tags["mlflow.parentRunId"] == parent_id
        assert run.data.tags["snaketune.stage"] == run.info.run_name
        assert run.info.run_id == tracked.ids[run.info.run_name]
        assert run.info.status == "FINISHED"


def test_parent_params_are_the_flattened_config(tracked):
    params = tracked.run("parent").data.params
    assert set(params) == set(flatten(CONFIG))
    assert params["train.lr"] == "0.003"
    assert params["model.n_layer"] == "1"
    assert params["clean.dedup"] == "True"
    assert params["tokenizer.name_or_path"] == "None"
    assert params["split.salt"] == ""
    assert params["text_template"] == CONFIG["text_template"]


def test_long_config_values_are_truncated_with_a_note(tracked):
    prompts = tracked.run("parent").data.params["evaluate.prompts"]
    assert len(json.dumps(PROMPTS)) > MAX_PARAM_LENGTH
    assert len(prompts) == MAX_PARAM_LENGTH
    assert prompts.endswith(TRUNCATION_NOTE)
    assert prompts.startswith(json.dumps(PROMPTS)[: MAX_PARAM_LENGTH - len(TRUNCATION_NOTE)])


def test_full_config_is_a_parent_artifact(tracked, tmp_path):
    path = download(tracked.store.uri, tracked.ids["parent"], "config.json", tmp_path)
    assert json.loads(path.read_text()) == CONFIG


def test_child_params_and_counts_come_from_its_manifest(tracked):
    """Counts and seconds are tags: single values, which as metrics would open the run's charts
    with a bar chart each."""
    tokenize = tracked.run("tokenize").data
    assert tokenize.params == {"block_size": "32", "max_length": "32", "task": "causal_lm"}
    assert tokenize.metrics == {}
    counts = {k: v for k, v in tokenize.tags.items() if k.startswith(stage_log.COUNTS_PREFIX)}
    assert counts == {
        "counts.train.documents": "2491",
        "counts.train.rows": "855",
        "counts.train.tokens": "109440",
        "counts.test.documents": "319",
        "counts.test.rows": "110",
        "counts.test.tokens": "14080",
        "counts.seconds": "2.25",
    }
    clean = tracked.run("clean").data
    assert clean.params["clean.dedup"] == "True"
    assert clean.params["member"] == "None"
    assert clean.tags["counts.pii_redacted.email"] == "104" and clean.metrics == {}


def test_a_count_that_changes_on_a_rerun_of_the_same_run_is_updated(tracked, tmp_path):
    """A stage run again with the same inputs and settings logs into the same run: its counts
    (seconds, retries) are tags, which take the new value, where a param would keep the old."""
    client, run_id = tracked.store.client, tracked.ids["tokenize"]
    store = track_module.Store(client, tracked.store.uri, "", None)
    stage = next(s for s in tracked.inputs.stages if s.name == "tokenize")
    manifest = {**json.loads(stage.manifest.read_text()), "seconds": 3.5}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(stage_log, "stage_run", lambda *args: (run_id, False))
        track_module.complete_stage(store, tracked.ids["parent"], stage, manifest, {})
    assert client.get_run(run_id).data.tags["counts.seconds"] == "3.5"
    client.set_tag(run_id, "counts.seconds", "2.25")  # as the other tests read it


def test_train_child_has_the_per_step_history(tracked):
    client, train_id = tracked.store.client, tracked.ids["train"]
    loss = sorted(client.get_metric_history(train_id, "train.loss"), key=lambda m: m.step)
    assert [(m.step, m.value) for m in loss] == [(row["step"], row["loss"]) for row in HISTORY]
    lr = sorted(client.get_metric_history(train_id, "train.lr"), key=lambda m: m.step)
    assert [m.value for m in lr] == pytest.approx([row["lr"] for row in HISTORY])
    val = sorted(client.get_metric_history(train_id, "train.val_loss"), key=lambda m: m.step)
    assert [(m.step, m.value) for m in val] == [(3, 7.1), (5, 6.9)]
    metrics = tracked.run("train").data.metrics
    assert metrics["train.loss"] == 7.03  # the latest value is the last step's
    assert "train.step" not in metrics
    # The charts are the history and the system metrics: no single-value counts among them.
    assert {key.split(".")[0].split("/")[0] for key in metrics} == {"train", "system"}
    tags = tracked.run("train").data.tags
    assert tags["counts.parameters"] == "624384" and tags["counts.seconds"] == "88.804"


def test_eval_metrics_are_on_the_parent(tracked):
    metrics = tracked.run("parent").data.metrics
    assert set(metrics) == EVAL_METRIC_NAMES
    assert metrics["eval.perplexity"] == 1.633
    assert metrics["eval.accuracy"] == 0.889
    assert metrics["eval.per_class.shipping.recall"] == 0.89
    assert metrics["eval.test_rows"] == 110.0


def test_the_parent_run_has_a_description_of_the_task_data_metrics_and_stage_runs(tracked):
    note = tracked.run("parent").data.tags["mlflow.note.content"]  # the UI's run description
    assert note.startswith(f"A `{CONFIG['task']}` model trained by snaketune")
    assert "| perplexity | 1.633 |" in note and "| accuracy | 0.889 |" in note
    assert f"`{CONFIG['dataset']}` ({SPLIT_ROWS['train']} train" in note
    experiment = tracked.store.client.get_experiment_by_name(MLFLOW_EXPERIMENT).experiment_id
    link = f"#/experiments/{experiment}/runs/{tracked.ids['train']}?workflowType=machine_learning"
    assert f"[train]({link})" in note


def test_the_runs_table_view_shows_the_headline_metrics_as_columns(tracked):
    experiment = tracked.store.client.get_experiment_by_name(MLFLOW_EXPERIMENT)
    view = json.loads(experiment.tags[f"mlflow.sharedViewState.{stage_log.RUNS_VIEW}"])
    assert view["name"] == stage_log.RUNS_VIEW_NAME and isinstance(view["createdAt"], int)
    columns = json.loads(view["state"])["selectedColumns"]
    assert columns == [
        "attributes.`Models`",
        "metrics.`eval.perplexity`",
        "metrics.`eval.accuracy`",
        "metrics.`eval.macro_f1`",
    ]


def test_another_tasks_upload_adds_its_columns_to_the_view_and_keeps_the_others(store):
    client = store.client
    experiment = client.create_experiment("views")
    stage_log.share_runs_view(client, experiment, ["eval.perplexity"])
    stage_log.share_runs_view(client, experiment, ["eval.accuracy", "eval.perplexity"])
    tag = client.get_experiment(experiment).tags[f"mlflow.sharedViewState.{stage_log.RUNS_VIEW}"]
    assert stage_log.view_metrics(tag) == ["eval.perplexity", "eval.accuracy"]


def test_eval_metrics_are_also_on_the_evaluate_child(tracked):
    metrics = tracked.run("evaluate").data.metrics
    assert EVAL_METRIC_NAMES <= set(metrics)
    assert metrics["eval.per_class.billing.f1"] == 0.88
    assert "test_rows" not in metrics  # the manifest's counts are tags
    assert tracked.run("evaluate").data.tags["counts.test_rows"] == "110"


def test_every_child_has_its_manifest_as_an_artifact(tracked, tmp_path):
    for stage in tracked.inputs.stages:
        run_id = tracked.ids[stage.name]
        assert "manifest.json" in artifact_paths(tracked.store.client, run_id)
        copy = download(tracked.store.uri, run_id, "manifest.json", tmp_path / stage.name)
        assert copy.read_bytes() == stage.manifest.read_bytes()


def test_stage_artifacts_are_logged(tracked):
    client = tracked.store.client
    assert artifact_paths(client, tracked.ids["clean"]) == {"manifest.json", "report.json"}
    assert artifact_paths(client, tracked.ids["train"]) == {
        "manifest.json",
        "history.jsonl",
        "system_metrics.jsonl",
        "model",
    }
    assert artifact_paths(client, tracked.ids["evaluate"]) == {
        "manifest.json",
        "metrics.json",
        "samples.csv",
        "samples.json",  # the same rows as an MLflow table
    }
    assert artifact_paths(client, tracked.ids["download"]) == {"manifest.json"}


def test_artifact_directories_are_logged_with_their_files(tracked, tmp_path):
    client = tracked.store.client
    assert artifact_paths(client, tracked.ids["train"], "model") == {
        "model/config.json",
        "model/model.safetensors",
        "model/README.md",  # the model card
    }
    assert artifact_paths(client, tracked.ids["tokenizer"], "tokenizer") == {
        "tokenizer/tokenizer.json",
        "tokenizer/tokenizer_config.json",
    }
    weights = download(tracked.store.uri, tracked.ids["train"], "model/model.safetensors", tmp_path)
    assert weights.read_bytes() == bytes(range(256)) * 4


def test_artifacts_are_stored_under_the_artifact_location(tracked):
    experiment = tracked.store.client.get_experiment_by_name(MLFLOW_EXPERIMENT)
    assert experiment.artifact_location == tracked.store.artifact_location
    stored = {
        p.relative_to(tracked.store.artifact_dir) for p in tracked.store.artifact_dir.rglob("*")
    }
    assert Path(tracked.ids["train"], "artifacts", "model", "model.safetensors") in stored
    assert Path(tracked.ids["parent"], "artifacts", "config.json") in stored


def test_the_experiment_is_marked_for_model_training_so_the_ui_opens_on_its_runs(tracked):
    experiment = tracked.store.client.get_experiment_by_name(MLFLOW_EXPERIMENT)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"


def test_every_run_carries_git_config_and_version_tags(tracked):
    for name in tracked.ids:
        tags = tracked.run(name).data.tags
        assert tags["git.commit"] == expected_git_commit()
        assert tags["git.dirty"] in {"true", "false"}
        assert tags["snaketune.config_hash"] == config_hash(CONFIG)
        assert tags["snaketune.experiment"] == EXPERIMENT
        assert tags["version.mlflow"] == mlflow.__version__
        assert tags["version.python"] == platform.python_version()
        assert tags["version.snaketune"] == snaketune.__version__
        assert tags["device"] == "cpu"  # from the train manifest


def test_runs_json_records_the_run_ids(tracked):
    written = json.loads(tracked.runs_path.read_text())
    experiment = tracked.store.client.get_experiment_by_name(MLFLOW_EXPERIMENT)
    assert written == {
        "tracking_uri": tracked.store.uri,
        "experiment_id": experiment.experiment_id,
        "runs": tracked.ids,
        "model": None,  # no registered_model_name: no model logged
    }


def test_train_child_has_the_system_metrics_at_their_sample_times(tracked):
    client, train_id = tracked.store.client, tracked.ids["train"]
    cpu = client.get_metric_history(train_id, "system/cpu_utilization_percentage")
    assert sorted((m.step, m.timestamp, m.value) for m in cpu) == [
        (i, int(row["timestamp"] * 1000), row["cpu_utilization_percentage"])
        for i, row in enumerate(SYSTEM_SAMPLES)
    ]
    metrics = tracked.run("train").data.metrics
    assert metrics["system/process_rss_megabytes"] == SYSTEM_SAMPLES[-1]["process_rss_megabytes"]
    assert {"system/system_memory_usage_megabytes", "system/system_memory_usage_percentage"} <= set(
        metrics
    )
    assert not any(name.startswith(("system/timestamp", "system/elapsed")) for name in metrics)


def test_train_and_evaluate_runs_name_the_splits_they_read(tracked):
    seen = {}
    for stage in ("train", "evaluate"):
        for item in tracked.run(stage).inputs.dataset_inputs:
            tags = {tag.key: tag.value for tag in item.tags}
            seen[item.dataset.name] = (stage, tags["mlflow.data.context"], item.dataset)
            split = item.dataset.name.split("/")[-1]
            assert item.dataset.digest == SPLIT_SHA[split][:16]
            assert tags["snaketune.sha256"] == SPLIT_SHA[split]
            assert json.loads(item.dataset.profile) == {"num_rows": SPLIT_ROWS[split]}
            assert json.loads(item.dataset.source) == {"uri": DOWNLOAD_URL}
    assert {name: value[:2] for name, value in seen.items()} == {
        "support-demo/train": ("train", "training"),
        "support-demo/val": ("train", "validation"),
        "support-demo/test": ("evaluate", "test"),
    }
    assert tracked.run("parent").inputs.dataset_inputs == []


def test_dataset_source_is_the_download_url_without_credentials_or_query(store, tmp_path):
    url = "https://reader:s3cret@data.example.org/support.jsonl.gz?X-Amz-Signature=abc#part"
    inputs = write_stage_files(tmp_path / "results", url=url)
    ids = track(settings_for(store.uri), inputs, tmp_path / "runs.json")
    dataset = store.client.get_run(ids["train"]).inputs.dataset_inputs[0].dataset
    assert dataset.source_type == "http"
    assert json.loads(dataset.source) == {"url": "https://***@data.example.org/support.jsonl.gz"}


# --- exactly once -------------------------------------------------------------------------------


def test_second_call_creates_no_new_runs_and_returns_the_same_ids(store, tmp_path):
    settings = settings_for(store.uri)
    inputs = write_stage_files(tmp_path / "results")
    runs_path = tmp_path / "runs.json"
    first = track(settings, inputs, runs_path)
    runs_path.unlink()
    second = track(settings, inputs, runs_path)
    assert second == first
    assert len(all_runs(store.client)) == 1 + len(STAGES)
    assert json.loads(runs_path.read_text())["runs"] == first
    loss = store.client.get_metric_history(first["train"], "train.loss")
    assert len(loss) == len(HISTORY)  # nothing logged twice into the reused runs


def test_runs_left_running_by_live_logging_are_completed_not_duplicated(store, tmp_path):
    """What a killed workflow leaves: the parent and the train run RUNNING (made by the stage
    jobs, their ids under results/), with the first two steps logged. The track job completes
    those very runs: every step once, every run FINISHED, nothing else created."""
    settings = settings_for(store.uri)
    inputs = write_stage_files(tmp_path / "results")
    client = store.client
    experiment_id = client.create_experiment(
        MLFLOW_EXPERIMENT, artifact_location=store.artifact_location
    )
    ids = stage_log.RunIds(inputs.tracking, store.uri, config_hash(settings.config))
    parent = stage_log.parent_run(client, ids, experiment_id, EXPERIMENT, {}, 0)
    train_key = json.loads(inputs.manifests["train"].read_text())["run_key"]
    train, new = stage_log.stage_run(client, ids, experiment_id, parent, "train", train_key, 0)
    assert new
    early = [Metric("train.loss", r["loss"], 0, r["step"]) for r in HISTORY[:2]]
    client.log_batch(train, metrics=early)
    uploaded = track(settings, inputs, tmp_path / "runs.json")
    assert (uploaded["parent"], uploaded["train"]) == (parent, train)
    loss = client.get_metric_history(train, "train.loss")
    assert sorted(m.step for m in loss) == [r["step"] for r in HISTORY]
    active = client.search_runs([experiment_id], run_view_type=ViewType.ACTIVE_ONLY)
    assert {run.info.run_id for run in active} == set(uploaded.values())
    assert {run.info.status for run in active} == {"FINISHED"}
    assert track(settings, inputs, tmp_path / "runs.json") == uploaded


def test_a_changed_config_is_a_new_parent_and_the_old_one_is_kept(store, tmp_path):
    settings = settings_for(store.uri)
    inputs = write_stage_files(tmp_path / "results")
    first = track(settings, inputs, tmp_path / "runs.json")
    changed = replace(settings, config={**CONFIG, "train": {**CONFIG["train"], "lr": 0.001}})
    second = track(changed, inputs, tmp_path / "runs.json")
    assert set(second.values()).isdisjoint(first.values())
    assert len(all_runs(store.client)) == 2 * (1 + len(STAGES))
    assert store.client.get_run(first["parent"]).info.status == "FINISHED"  # kept, not replaced


def test_a_stage_computed_again_from_other_inputs_replaces_its_run(store, tmp_path):
    settings = settings_for(store.uri)
    inputs = write_stage_files(tmp_path / "results")
    first = track(settings, inputs, tmp_path / "runs.json")
    evaluate = inputs.manifests["evaluate"]
    manifest = json.loads(evaluate.read_text())
    manifest["inputs"]["input"]["sha256"] = "f" * 64
    manifest["run_key"] = stage_log.run_key(manifest["inputs"], manifest["params"])
    evaluate.write_text(json.dumps(manifest))
    second = track(settings, inputs, tmp_path / "runs.json")
    assert second["parent"] == first["parent"]
    assert second["evaluate"] != first["evaluate"]
    assert {k: v for k, v in second.items() if k != "evaluate"} == {
        k: v for k, v in first.items() if k != "evaluate"
    }
    assert store.client.get_run(first["evaluate"]).info.lifecycle_stage == "deleted"


# --- awkward inputs and failures ----------------------------------------------------------------


def test_labels_with_characters_mlflow_rejects_are_uploaded(store, tmp_path):
    metrics = {"accuracy": 0.9, "per_class": {"billing & payments": {"f1": 0.8}}}
    inputs = write_stage_files(tmp_path / "results", metrics=metrics)
    ids = track(settings_for(store.uri), inputs, tmp_path / "runs.json")
    parent = store.client.get_run(ids["parent"])
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics == {
        "eval.accuracy": 0.9,
        "eval.per_class.billing _ payments.f1": 0.8,
    }


def test_history_longer_than_one_metrics_batch_is_logged_in_full(store, tmp_path):
    rows = [
        {"step": step, "loss": 1.0 / step, "lr": 0.001, "grad_norm": 1.0, "tokens_per_s": 1e3}
        for step in range(1, 301)
    ]
    inputs = write_stage_files(tmp_path / "results", history=rows)  # 1200 metrics > 1000
    ids = track(settings_for(store.uri), inputs, tmp_path / "runs.json")
    loss = store.client.get_metric_history(ids["train"], "train.loss")
    assert sorted(m.step for m in loss) == list(range(1, 301))
    assert len(store.client.get_metric_history(ids["train"], "train.tokens_per_s")) == 300


def test_store_error_becomes_a_tracking_error_and_writes_no_runs_json(store, tmp_path):
    # A deleted experiment with the same name cannot take new runs.
    store.client.delete_experiment(store.client.create_experiment(MLFLOW_EXPERIMENT))
    inputs = write_stage_files(tmp_path / "results")
    runs_path = tmp_path / "runs.json"
    with pytest.raises(TrackingError) as caught:
        track(settings_for(store.uri), inputs, runs_path)
    assert store.uri in str(caught.value)
    assert "complete" in str(caught.value)
    assert not runs_path.exists()


def test_redact_hides_credentials_and_keeps_everything_else():
    assert redact("https://alice:s3cret@mlflow.example.org:8443/path") == (
        "https://***@mlflow.example.org:8443/path"
    )
    assert redact("http://token@127.0.0.1:5000") == "http://***@127.0.0.1:5000"
    assert redact("sqlite:////tmp/x/mlflow.db") == "sqlite:////tmp/x/mlflow.db"


def test_environment_uri_is_read_at_run_time_and_wins_over_the_config(
    tmp_path, empty_store_db, monkeypatch
):
    configured = new_store(tmp_path / "configured", empty_store_db)
    from_env = new_store(tmp_path / "env", empty_store_db)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", from_env.uri)
    settings = settings_for(configured.uri)
    ids = track(settings, write_stage_files(tmp_path / "results"), tmp_path / "runs.json")
    assert {r.info.run_id for r in all_runs(from_env.client)} == set(ids.values())
    assert configured.client.get_experiment_by_name(MLFLOW_EXPERIMENT) is None


def test_experiment_created_by_a_parallel_track_job_is_used(store):
    """Two experiments' track jobs against one server: the other job creates the MLflow
    experiment between this job's lookup and its create."""

    class CreatedMeanwhile:
        def __init__(self, client):
            self.client, self.looked_up = client, False

        def get_experiment_by_name(self, name):
            if not self.looked_up:
                self.looked_up = True
                self.client.create_experiment(name)  # the other job, just now
                return None
            return self.client.get_experiment_by_name(name)

        def create_experiment(self, *args, **kwargs):
            return self.client.create_experiment(*args, **kwargs)

    settings = settings_for(store.uri)
    experiment_id = experiment_id_for(
        CreatedMeanwhile(store.client), settings.mlflow_experiment, store.uri, None
    )
    assert experiment_id == store.client.get_experiment_by_name(MLFLOW_EXPERIMENT).experiment_id


def test_the_model_card_names_the_data_its_digest_the_metrics_and_the_limits(tracked, tmp_path):
    card = tracked.runs_path.with_name("model_card.md").read_text()
    assert card.startswith(f"# {EXPERIMENT}\n\nA `{CONFIG['task']}` model")
    # What the model is, then its metrics, then how they were measured and the data's details.
    order = ["- Model: `gpt2` trained from scratch", "| perplexity | 1.633 |", "Protocol: "]
    positions = [card.index(needle) for needle in [*order, "## Data"]]
    assert positions == sorted(positions)
    for needle in (SPLIT_SHA["train"], SPLIT_SHA["test"], DOWNLOAD_URL, "perplexity | 1.633"):
        assert needle in card
    assert METRICS["protocol"] in card and "## Intended use and limits" in card
    assert "`billing`, `shipping`" in card  # the labels it can answer with
    logged = download(tracked.store.uri, tracked.ids["train"], "model/README.md", tmp_path)
    assert logged.read_text() == card


def test_a_csv_artifact_is_also_an_mlflow_table_logged_once(tmp_path, empty_store_db):
    import pandas as pd

    from snaketune.track.reconcile import log_table

    store = new_store(tmp_path / "store", empty_store_db)
    client = store.client
    run_id = client.create_run(client.create_experiment("tables")).info.run_id
    samples = tmp_path / "samples.csv"
    rows = pd.DataFrame({"prompt": ["Q: a\nA:", "Q: b"], "generated": ["x", ""], "f1": [1.0, 0.5]})
    rows.to_csv(samples, index=False)
    log_table(client, run_id, samples)
    log_table(client, run_id, samples)  # a retried upload appends nothing
    logged = json.loads(
        Path(client.download_artifacts(run_id, "samples.json", tmp_path)).read_text()
    )
    assert logged["columns"] == ["prompt", "generated", "f1"]
    assert logged["data"] == [["Q: a\nA:", "x", 1.0], ["Q: b", "", 0.5]]
