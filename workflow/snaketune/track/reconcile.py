"""Stage 8, track_experiment: the reconciler between results/ and MLflow.

The stage jobs log live (snaketune.track.live): their runs exist while they work and their metrics
arrive as they are measured, as far as the store answered. This job makes MLflow agree with the
results, whatever live logging missed: it finds each stage's run (or creates it, with the stage's
own start time), adds the params, counts, history points and artifacts it lacks (a point is
identified by its key and step, so nothing arrives twice), logs and registers the model once,
and ends every run FINISHED at its stage's own end time, the parent last: a FINISHED parent means
the upload is complete. Results on disk are the source of truth and are only read here, so an
MLflow outage fails this job alone, and the next `snakemake` run uploads what is missing.

What lands where: the parent holds the config as params, the eval metrics and a description (task,
data, headline metrics beside the baselines); each stage's child run its manifest's params, its
counts and seconds as tags (single values, not metrics to chart) and its artifacts; the train run
the per-step history, the system metrics sampled during training, its dataset inputs (train and
val splits) and the logged model; the evaluate run the test split and the eval metrics, linked to
that model. The model is registered as a version of the configured name (snaketune.track.registry),
and the experiment gets a runs view with the headline metrics as columns (stage_log.runs_table_url).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from snaketune.context import IN_PROCESS, JobContext
from snaketune.errors import TrackingError
from snaketune.evaluate.paths import EvaluatePaths
from snaketune.fileio import atomic_path, read_json, sha256_file, write_json
from snaketune.manifest import package_versions, recorded_paths
from snaketune.paths import OUTPUT, path_fields
from snaketune.provenance import git_state, invocation_tags
from snaketune.settings import config_hash
from snaketune.stages import TRACKED, tracked_stage
from snaketune.tasks import task_of
from snaketune.track import lineage, registry, stage_log
from snaketune.track.model_card import FILE_NAME as CARD_FILE_NAME
from snaketune.track.model_card import HEADLINE, experiment_note, model_card
from snaketune.track.paths import TrackPaths
from snaketune.track.settings import SWEPT, TrackSettings
from snaketune.track.stage_log import (
    EVAL_PREFIX,
    SWEEP_TAG,
    Ledger,
    RunIds,
    as_metrics,
    as_params,
    experiment_id_for,
    history_points,
    log_batched,
    missing_params,
    ms,
    numeric_metrics,
    sample_points,
    send_points,
    store_lock,
    value_points,
)
from snaketune.track.tracking_uri import (
    check_usable,
    effective_tracking_uri,
    redact,
    store_uri,
    write_failed,
)
from snaketune.train.paths import TrainPaths
from snaketune.train.system_metrics import read_samples

log = logging.getLogger(__name__)

STAGES = TRACKED
UPLOADED_TAG = "snaketune.uploaded"
"""Set on a run once its artifacts (and, for the train run, its datasets) are uploaded."""
CHILD_RUNS_TAG = "snaketune.child_runs"
NOTE_TAG = "mlflow.note.content"
"""A run's description in the MLflow UI (Markdown)."""
MODEL_CARD_TAG = "snaketune.track.model_card"
"""The sha256 of the model card last logged on the train run."""
SNAKEMAKE_MARKERS = (".snakemake_timestamp",)
"""Files Snakemake keeps in output folders: bookkeeping, not artifacts."""


@dataclass(frozen=True)
class StageFiles:
    """One stage's files to mirror: its manifest and the artifacts worth browsing."""

    name: str
    manifest: Path
    artifacts: tuple[Path, ...] = ()

    @classmethod
    def recorded(cls, name: str, manifest: Path) -> StageFiles:
        """The stage's manifest and the outputs its job marks as artifacts, where the manifest
        says they were written."""
        written = recorded_paths(manifest)
        fields = path_fields(tracked_stage(name).paths, OUTPUT)
        artifacts = tuple(written[f.name] for f in fields if f.metadata["artifact"])
        return cls(name, Path(manifest), artifacts)


def history_rows(history_path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(history_path).read_text().splitlines()]


def system_samples(samples_path: Path | None) -> list[dict[str, float]]:
    if samples_path is None or not Path(samples_path).exists():
        return []
    return list(read_samples(samples_path))


@dataclass(frozen=True)
class UploadFiles:
    """What the upload reads: the stage files and the outputs that get special treatment."""

    stages: list[StageFiles]
    history: Path
    metrics: Path
    model_dir: Path | None = None
    """The trained model (results/<exp>/train/model), logged and registered as an MLflow model."""
    system_metrics: Path | None = None
    provenance: Path | None = None
    """provenance.json of the snakemake invocation (its command line becomes a tag)."""
    model_card: Path | None = None
    """The model card written from these files (snaketune.track.model_card)."""

    @classmethod
    def recorded(cls, paths: TrackPaths) -> UploadFiles:
        """Every tracked stage's files, found through its manifest."""
        stages = [StageFiles.recorded(name, getattr(paths, name)) for name in TRACKED]
        train = TrainPaths(**recorded_paths(paths.train))
        evaluate = EvaluatePaths(**recorded_paths(paths.evaluate))
        return cls(
            stages,
            train.history,
            evaluate.metrics,
            train.model,
            train.system_metrics,
            paths.provenance,
            paths.model_card,
        )

    def manifest(self, stage: str) -> dict[str, Any]:
        return next((read_json(s.manifest) for s in self.stages if s.name == stage), {})


@dataclass(frozen=True)
class Store:
    client: Any
    uri: str
    experiment_id: str
    ids: RunIds


@dataclass(frozen=True)
class StageTimes:
    """When a stage ran, from its manifest: its MLflow run's start and end."""

    started_ms: int
    ended_ms: int

    @classmethod
    def of(cls, manifest: dict[str, Any]) -> StageTimes:
        started = manifest.get("started_at", time.time() - manifest.get("seconds", 0.0))
        return cls(ms(started), ms(started + manifest.get("seconds", 0.0)))


def track_experiment(
    paths: TrackPaths, settings: TrackSettings, context: JobContext = IN_PROCESS
) -> dict[str, str]:
    """Make MLflow agree with the experiment's stages (found through their manifests); write
    the run ids to paths.runs."""
    files = UploadFiles.recorded(paths)
    write_model_card(settings, files)
    artifacts = Path(paths.artifacts).resolve().as_uri()
    uri = store_uri(settings.tracking_uri, paths.store)
    return upload(settings, files, uri, artifacts, paths.runs, paths.tracking)


def upload(
    settings: TrackSettings,
    files: UploadFiles,
    configured_uri: str,
    artifacts: str,
    runs_path: Path,
    tracking: Path,
) -> dict[str, str]:
    with opened_store(configured_uri, settings.mlflow_experiment, artifacts) as (
        client,
        uri,
        experiment_id,
    ):
        ids = RunIds(tracking, uri, config_hash(settings.config))
        store = Store(client, uri, experiment_id, ids)
        run_ids, model = reconcile(store, settings, files, run_tags(settings, files))
    write_json(
        runs_path,
        {
            "tracking_uri": redact(uri),
            "experiment_id": experiment_id,
            "runs": run_ids,
            "model": model,
        },
    )
    return run_ids


@contextlib.contextmanager
def opened_store(configured_uri: str, mlflow_experiment: str, artifacts: str):
    """(client, uri, experiment id) of the store, under its lock; what MLflow raises inside
    becomes a TrackingError that says what to do."""
    from mlflow import MlflowClient

    uri = effective_tracking_uri(configured_uri)
    check_usable(uri)
    # MLflow's default is 7 retries with growing waits: minutes before a dead server is reported.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")
    stage_log.quiet_mlflow()
    with store_lock(uri):
        try:
            client = MlflowClient(tracking_uri=uri)
            yield client, uri, experiment_id_for(client, mlflow_experiment, uri, artifacts)
        except Exception as err:
            # MLflow raises its own exceptions, except that an HTTP artifact store answering an
            # upload with an error status (a proxy's 413 for a large model, say) raises requests'
            # HTTPError; both mean the store could not be written, not that results are wrong.
            if not type(err).__module__.startswith(("mlflow", "requests")):
                raise
            raise TrackingError(write_failed(uri, err)) from err


def write_model_card(settings: TrackSettings, files: UploadFiles) -> None:
    manifests = {stage.name: read_json(stage.manifest) for stage in files.stages}
    card = model_card(settings.experiment, settings.config, manifests, read_json(files.metrics))
    with atomic_path(files.model_card) as tmp:
        tmp.write_text(card)


def log_model_card(client, train_id: str, info, files: UploadFiles) -> None:
    """The card as README.md in the train run's model folder and in the logged model, once per
    version of the card."""
    if files.model_card is None or files.model_dir is None:
        return
    card = Path(files.model_card)
    digest = sha256_file(card)
    if client.get_run(train_id).data.tags.get(MODEL_CARD_TAG) == digest:
        return
    with tempfile.TemporaryDirectory() as tmp:
        readme = Path(tmp) / CARD_FILE_NAME
        shutil.copyfile(card, readme)
        client.log_artifact(train_id, str(readme), artifact_path=Path(files.model_dir).name)
        if info is not None:
            client.log_model_artifact(info.model_id, str(readme))
    client.set_tag(train_id, MODEL_CARD_TAG, digest)


def run_tags(settings: TrackSettings, files: UploadFiles) -> dict[str, str]:
    return {
        **git_state(),
        **invocation_tags(files.provenance),
        "snaketune.experiment": settings.experiment,
        "snaketune.config_hash": config_hash(settings.config),
        **({SWEEP_TAG: settings.config[SWEPT]["of"]} if settings.config.get(SWEPT) else {}),
        "host": platform.node(),
        "device": files.manifest("train").get("device", "unknown"),
        **{f"version.{k}": v for k, v in package_versions().items()},
    }


def set_tags(client, run_id: str, tags: dict[str, str]) -> None:
    from mlflow.entities import RunTag

    client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])


def reconcile(
    store: Store, settings: TrackSettings, files: UploadFiles, tags: dict[str, str]
) -> tuple[dict[str, str], dict[str, str] | None]:
    """Every run of the experiment complete and FINISHED; the run ids and the model version."""
    client = store.client
    manifests = {stage.name: read_json(stage.manifest) for stage in files.stages}
    times = {name: StageTimes.of(m) for name, m in manifests.items()}
    first = min(t.started_ms for t in times.values())
    parent_id = stage_log.parent_run(
        client, store.ids, store.experiment_id, settings.experiment, tags, first
    )
    complete_parent(client, parent_id, settings, files, tags)
    ids = {}
    for stage in files.stages:
        ids[stage.name] = complete_stage(store, parent_id, stage, manifests[stage.name], tags)
    remove_superseded(client, store.experiment_id, parent_id, ids)
    ledgers = {name: Ledger(client, run_id, new_run=False) for name, run_id in ids.items()}
    # Before the history: mlflow copies the run's step-0 metrics onto the logged model, and the
    # system metrics' first sample is step 0.
    info = _log_model(store, settings, files, ids["train"])
    log_model_card(client, ids["train"], info, files)
    fallback = times["train"].ended_ms
    # The points the live tracker logs, from the files: those it did not send go now.
    train_points = history_points(history_rows(files.history), fallback)
    train_points += sample_points(system_samples(files.system_metrics))
    send_points(client, ids["train"], ledgers["train"], train_points)
    test_split = _log_datasets(client, settings, files, ids)
    eval_values = read_json(files.metrics)
    eval_metrics = eval_points(eval_values, times["evaluate"].ended_ms)
    log_batched(client, parent_id, metrics=Ledger(client, parent_id, False).missing(eval_metrics))
    model_id = info.model_id if info is not None else None
    linked = registry.linked_metrics(eval_metrics, model_id, test_split)
    log_batched(client, ids["evaluate"], metrics=ledgers["evaluate"].missing(linked))
    model = registry.recorded(client.get_run(parent_id).data.tags)
    if info is not None and model is None:
        card = Path(files.model_card).read_text() if files.model_card else ""
        run_ids = {"parent": parent_id, **ids}
        model = _register(client, settings, info, eval_values, run_ids, card)
        client.set_tag(parent_id, registry.MODEL_TAG, json.dumps(model))
    client.set_tag(parent_id, CHILD_RUNS_TAG, json.dumps(ids))
    describe(store, settings, parent_id, manifests, eval_values, ids)
    for name, run_id in ids.items():
        client.set_terminated(run_id, "FINISHED", times[name].ended_ms)
    last = max(t.ended_ms for t in times.values())
    client.set_terminated(parent_id, "FINISHED", last)  # last: FINISHED means complete
    return {"parent": parent_id, **ids}, model


def describe(
    store: Store,
    settings: TrackSettings,
    parent_id: str,
    manifests: dict[str, dict],
    eval_values: dict[str, Any],
    ids: dict[str, str],
) -> None:
    """The parent run's description (MLflow shows the note tag as the run's description) and
    the experiment's runs view with this task's headline metrics as columns."""
    links = {name: stage_log.run_link(store.experiment_id, run_id) for name, run_id in ids.items()}
    config = settings.config
    note = experiment_note(settings.experiment, config, manifests, eval_values, links)
    store.client.set_tag(parent_id, NOTE_TAG, note)
    columns = [f"{EVAL_PREFIX}{name}" for name in HEADLINE if name in eval_values]
    stage_log.share_runs_view(store.client, store.experiment_id, columns)


def eval_points(values: dict[str, Any], measured_ms: int) -> list:
    """The evaluation's metrics as MLflow metrics at step 0 (as the evaluate stage logs them)."""
    return as_metrics(value_points(numeric_metrics(values, EVAL_PREFIX), 0, measured_ms))


def complete_parent(
    client, parent_id: str, settings: TrackSettings, files: UploadFiles, tags: dict
) -> None:
    set_tags(client, parent_id, tags)
    params = missing_params(client, parent_id, as_params(settings.config))
    log_batched(client, parent_id, params=params)
    if client.get_run(parent_id).data.tags.get(UPLOADED_TAG) is None:
        client.log_text(parent_id, json.dumps(settings.config, indent=2), "config.json")
        client.set_tag(parent_id, UPLOADED_TAG, "true")


def complete_stage(store: Store, parent_id: str, stage: StageFiles, manifest: dict, tags) -> str:
    """The stage's run (the live one, or a new one with the stage's start time) with its params,
    counts (as tags) and artifacts."""
    client, times = store.client, StageTimes.of(manifest)
    key = manifest["run_key"]
    run_id, new = stage_log.stage_run(
        client, store.ids, store.experiment_id, parent_id, stage.name, key, times.started_ms
    )
    set_tags(client, run_id, {**tags, **stage_log.count_tags(manifest)})
    log_batched(
        client, run_id, params=missing_params(client, run_id, as_params(manifest["params"]))
    )
    if new or client.get_run(run_id).data.tags.get(UPLOADED_TAG) is None:
        log_artifacts(client, run_id, stage)
        client.set_tag(run_id, UPLOADED_TAG, "true")
    return run_id


TABLE_SUFFIX = ".csv"
"""Artifacts that are tables, logged also with log_table (see log_table)."""


def log_artifacts(client, run_id: str, stage: StageFiles) -> None:
    client.log_artifact(run_id, str(stage.manifest))
    for artifact in stage.artifacts:
        if artifact.is_dir():
            for path in sorted(artifact.rglob("*")):
                if path.is_file() and path.name not in SNAKEMAKE_MARKERS:
                    folder = path.parent.relative_to(artifact.parent).as_posix()
                    client.log_artifact(run_id, str(path), artifact_path=folder)
        elif artifact.exists():
            client.log_artifact(run_id, str(artifact))
            if artifact.suffix == TABLE_SUFFIX:
                log_table(client, run_id, artifact)


def log_table(client, run_id: str, table: Path) -> None:
    """A CSV artifact (the samples) again as an MLflow table, which the UI shows as one. Only
    once: log_table appends to a table already there, and an upload may be a retry."""
    import pandas as pd

    name = f"{table.stem}.json"
    if name not in {entry.path for entry in client.list_artifacts(run_id)}:
        client.log_table(run_id, data=pd.read_csv(table, keep_default_na=False), artifact_file=name)


def remove_superseded(client, experiment_id: str, parent_id: str, ids: dict[str, str]) -> None:
    """Runs of this parent for a stage whose results have since been computed again (other
    inputs or settings): the current ones replace them."""
    current = set(ids.values())
    children = client.search_runs([experiment_id], f"tags.`mlflow.parentRunId` = '{parent_id}'")
    for child in children:
        if child.info.run_id not in current:
            client.delete_run(child.info.run_id)


def _log_model(store: Store, settings: TrackSettings, files: UploadFiles, train_id: str):
    if settings.registered_model_name is None or files.model_dir is None:
        return None
    if not registry.servable(files.model_dir):
        log.info("%s is not a transformers model; not registered", files.model_dir)
        return None
    logged = registry.logged_model_of(store.client, store.experiment_id, train_id)
    if logged is not None:  # an earlier upload, cut short after it logged the model
        return logged
    task, config = settings.config["task"], settings.config
    rows = files.manifest("tokenize").get("params", {}).get("tokenize", {})
    return registry.log_model(
        store.uri,
        train_id,
        files.model_dir,
        task,
        config.get("evaluate", {}),
        files.manifest("clean").get("instruction", {}).get("serving_template"),
        context=rows.get(task_of(task).row_limit, 0),
        name=settings.experiment,
    )


def _register(
    client, settings: TrackSettings, info, eval_values: dict, ids: dict, card: str
) -> dict:
    record = registry.VersionRecord(
        settings.experiment, settings.config, config_hash(settings.config), eval_values, ids, card
    )
    name = settings.registered_model_name
    version = registry.version_of(client, name, ids["train"])
    if version is None:
        version = registry.register(client, name, info, record)
    return version.as_dict()


def _log_datasets(client, settings: TrackSettings, files: UploadFiles, ids: dict[str, str]):
    """Dataset inputs on the train and evaluate runs; returns the test split (or None)."""
    datasets = lineage.split_datasets(
        settings.config.get("dataset", settings.experiment),
        redact(str(files.manifest("download").get("params", {}).get("url", ""))),
        files.manifest("split"),
    )
    for stage in lineage.RUN_SPLITS:
        inputs = lineage.dataset_inputs(datasets, stage)
        if inputs and stage in ids and not client.get_run(ids[stage]).inputs.dataset_inputs:
            client.log_inputs(ids[stage], datasets=inputs)
    return datasets.get("test")
