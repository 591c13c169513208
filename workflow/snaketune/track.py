"""Stage 8, track_experiment: mirror one experiment's results into MLflow.

Results on disk are the source of truth; this stage only reads them, so an MLflow outage never
loses anything: the rule fails with a message, and the next `snakemake` run uploads what is
missing. A parent run is keyed by a digest of every stage manifest; a finished run with the same
key is reused and an unfinished one is replaced (with any model version it registered), so
uploads and model versions happen exactly once.

What lands where: the parent holds the config as params and the eval metrics; each stage's child
run its manifest's params and counts and its artifacts; the train run the per-step history, the
system metrics sampled during training, its dataset inputs (train and val splits) and the logged
model; the evaluate run the test split and the eval metrics, linked to that model. The model is
registered as a version of the configured name (snaketune.registry).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import platform
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from snaketune import lineage, registry
from snaketune.errors import TrackingError
from snaketune.fileio import read_json, write_json
from snaketune.manifest import package_versions, recorded_paths
from snaketune.provenance import config_hash, git_state, invocation_tags
from snaketune.settings import TrackSettings
from snaketune.stages import (
    OUTPUT,
    TRACKED,
    EvaluatePaths,
    TrackPaths,
    TrainPaths,
    path_fields,
    tracked_stage,
)
from snaketune.system_metrics import read_samples
from snaketune.tracking_uri import (
    check_usable,
    effective_tracking_uri,
    redact,
    store_uri,
    write_failed,
)

log = logging.getLogger(__name__)

STAGES = TRACKED
RUN_KEY_TAG = "snaketune.run_key"
# Without it MLflow 3's UI guesses the experiment's kind and may open it on GenAI traces instead
# of the runs table.
EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}
MAX_PARAM_LENGTH = 500  # MLflow's limit is larger, but long values are unreadable in the UI
# MLflow refuses metric names with characters outside [/\w.\- :] and names that change under path
# normalisation ('a//b', 'a/../b'). Class labels come from the user's data and end up in metric
# names (eval.per_class.<label>.f1), so one label like 'billing & payments' would fail every retry
# of the upload. Such characters, '/' included (which rules out the path cases), become '_'.
_UNSAFE_IN_METRIC_NAME = re.compile(r"[^\w.\- :]")


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


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, sub in value.items():
            out.update(flatten(sub, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): value}


def as_params(config: dict[str, Any]) -> dict[str, str]:
    params = {}
    for key, value in flatten(config).items():
        text = json.dumps(value) if isinstance(value, list | dict) else str(value)
        if len(text) > MAX_PARAM_LENGTH:
            text = text[: MAX_PARAM_LENGTH - 40] + "... (full value in config.json artifact)"
        params[key] = text
    return params


def numeric_metrics(values: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Every finite-or-infinite number in a nested dict, keyed by its dotted path (with the
    characters MLflow refuses in a metric name replaced by '_')."""
    return {
        _UNSAFE_IN_METRIC_NAME.sub("_", key): float(v)
        for key, v in flatten(values, prefix).items()
        if isinstance(v, int | float) and not isinstance(v, bool)
    }


@contextlib.contextmanager
def store_lock(uri: str) -> Iterator[None]:
    """Serialize writers of one SQLite store (parallel jobs would hit 'database is locked')."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    lock_path = Path(uri[len("sqlite:///") :]).with_suffix(".lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def run_key(settings: TrackSettings, stages: list[StageFiles]) -> str:
    digest = hashlib.sha256(settings.experiment.encode())
    for stage in stages:
        digest.update(stage.manifest.read_bytes())
    return digest.hexdigest()[:24]


def find_parent(client, experiment_id: str, key: str, registry_used: bool = False):
    runs = client.search_runs([experiment_id], f"tags.`{RUN_KEY_TAG}` = '{key}'")
    for run in runs:
        if run.info.status == "FINISHED":
            return run
        client.delete_run(run.info.run_id)  # an upload cut short: replace it
        for child in client.search_runs(
            [experiment_id], f"tags.`mlflow.parentRunId` = '{run.info.run_id}'"
        ):
            client.delete_run(child.info.run_id)
            if registry_used:  # a version it registered goes too: the new upload registers one
                registry.delete_models_of(client, experiment_id, child.info.run_id)
    return None


def experiment_id_for(client, name: str, uri: str, artifact_location: str | None) -> str:
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode

    existing = client.get_experiment_by_name(name)
    if existing is not None:
        return existing.experiment_id
    # A tracking server decides where artifacts go; a local store keeps them under results/.
    remote = uri.startswith(("http://", "https://"))
    location = None if remote else artifact_location
    try:
        return client.create_experiment(name, artifact_location=location, tags=EXPERIMENT_TAGS)
    except MlflowException as err:
        # Another experiment's track job, running at the same time, created it first.
        if err.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
            raise
        return client.get_experiment_by_name(name).experiment_id


def log_stage(client, experiment_id: str, parent_id: str, stage: StageFiles, tags: dict) -> str:
    from mlflow.entities import Metric, Param

    manifest = read_json(stage.manifest)
    run = client.create_run(
        experiment_id,
        run_name=stage.name,
        tags={**tags, "mlflow.parentRunId": parent_id, "snaketune.stage": stage.name},
    )
    run_id = run.info.run_id
    params = [Param(k, v) for k, v in as_params(manifest.get("params", {})).items()]
    metrics = [Metric(k, v, 0, 0) for k, v in numeric_metrics(manifest.get("counts", {})).items()]
    metrics.append(Metric("seconds", float(manifest.get("seconds", 0.0)), 0, 0))
    _log_batched(client, run_id, params=params, metrics=metrics)
    client.log_artifact(run_id, str(stage.manifest))
    for artifact in stage.artifacts:
        if artifact.is_dir():
            client.log_artifacts(run_id, str(artifact), artifact_path=artifact.name)
        elif artifact.exists():
            client.log_artifact(run_id, str(artifact))
    return run_id


def _log_batched(client, run_id: str, params=(), metrics=()) -> None:
    """MLflow accepts at most 100 params and 1000 metrics per log_batch call."""
    params, metrics = list(params), list(metrics)
    for i in range(0, len(params), 100):
        client.log_batch(run_id, params=params[i : i + 100])
    for i in range(0, len(metrics), 1000):
        client.log_batch(run_id, metrics=metrics[i : i + 1000])


def history_metrics(history_path: Path) -> list:
    from mlflow.entities import Metric

    out = []
    for line in Path(history_path).read_text().splitlines():
        row = json.loads(line)
        for key, value in row.items():
            if key != "step":
                out.append(Metric(f"train.{key}", float(value), 0, int(row["step"])))
    return out


def sampled_metrics(samples_path: Path | None) -> list:
    """The samples taken during training under MLflow's system/ names, at their wall times."""
    from mlflow.entities import Metric

    if samples_path is None or not Path(samples_path).exists():
        return []
    out = []
    for step, row in enumerate(read_samples(samples_path)):
        timestamp = int(row["timestamp"] * 1000)
        for key, value in row.items():
            if key not in ("timestamp", "elapsed_s"):
                out.append(Metric(f"system/{key}", float(value), timestamp, step))
    return out


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
        )

    def manifest(self, stage: str) -> dict[str, Any]:
        return next((read_json(s.manifest) for s in self.stages if s.name == stage), {})


@dataclass(frozen=True)
class Store:
    client: Any
    uri: str
    experiment_id: str


def track_experiment(paths: TrackPaths, settings: TrackSettings) -> dict[str, str]:
    """Mirror the experiment's stages (found through their manifests) into MLflow; write the run
    ids to paths.runs."""
    files = UploadFiles.recorded(paths)
    artifacts = Path(paths.artifacts).resolve().as_uri()
    return upload(
        settings, files, store_uri(settings.tracking_uri, paths.store), artifacts, paths.runs
    )


def upload(
    settings: TrackSettings,
    files: UploadFiles,
    configured_uri: str,
    artifacts: str,
    runs_path: Path,
) -> dict[str, str]:
    from mlflow import MlflowClient

    uri = effective_tracking_uri(configured_uri)
    check_usable(uri)
    # MLflow's default is 7 retries with growing waits: minutes before a dead server is reported.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")
    # MLflow's usage telemetry calls out to the internet from a thread that, when that fails (as
    # offline), edits os.environ while this job's HTTP requests read it: an upload then fails at
    # random with KeyError '_MLFLOW_TELEMETRY_SESSION_ID'. Off unless the user turned it on.
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    # MLflow prints "View run ... at: <tracking URI>" to stdout, which the track rule logs: a
    # credential in the URI would land in the log.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    key = run_key(settings, files.stages)
    with store_lock(uri):
        try:
            client = MlflowClient(tracking_uri=uri)
            experiment_id = experiment_id_for(client, settings.mlflow_experiment, uri, artifacts)
            registering = settings.registered_model_name is not None
            parent = find_parent(client, experiment_id, key, registering)
            if parent is not None:
                log.info(
                    "runs for %s are already in MLflow (%s)",
                    settings.experiment,
                    parent.info.run_id,
                )
                ids = json.loads(parent.data.tags.get("snaketune.child_runs", "{}"))
                ids["parent"] = parent.info.run_id
                model = registry.recorded(parent.data.tags)
            else:
                store = Store(client, uri, experiment_id)
                ids, model = _upload(store, settings, files, run_tags(settings, files), key)
        except Exception as err:
            # MLflow raises its own exceptions, except that an HTTP artifact store answering an
            # upload with an error status (a proxy's 413 for a large model, say) raises requests'
            # HTTPError; both mean the store could not be written, not that results are wrong.
            if not type(err).__module__.startswith(("mlflow", "requests")):
                raise
            raise TrackingError(write_failed(uri, err)) from err
    write_json(
        runs_path,
        {
            "tracking_uri": redact(uri),
            "experiment_id": experiment_id,
            "run_key": key,
            "runs": ids,
            "model": model,
        },
    )
    return ids


def run_tags(settings: TrackSettings, files: UploadFiles) -> dict[str, str]:
    return {
        **git_state(),
        **invocation_tags(files.provenance),
        "snaketune.experiment": settings.experiment,
        "snaketune.config_hash": config_hash(settings.config),
        "host": platform.node(),
        "device": files.manifest("train").get("device", "unknown"),
        **{f"version.{k}": v for k, v in package_versions().items()},
    }


def _upload(
    store: Store, settings: TrackSettings, files: UploadFiles, tags: dict, key: str
) -> tuple[dict[str, str], dict[str, str] | None]:
    from mlflow.entities import Metric, Param

    client = store.client
    parent = client.create_run(
        store.experiment_id, run_name=settings.experiment, tags={**tags, RUN_KEY_TAG: key}
    )
    parent_id = parent.info.run_id
    params = [Param(k, v) for k, v in as_params(settings.config).items()]
    eval_values = read_json(files.metrics)
    eval_metrics = [Metric(f"eval.{k}", v, 0, 0) for k, v in numeric_metrics(eval_values).items()]
    _log_batched(client, parent_id, params=params, metrics=eval_metrics)
    client.log_text(parent_id, json.dumps(settings.config, indent=2), "config.json")
    ids = {}
    for stage in files.stages:
        ids[stage.name] = log_stage(client, store.experiment_id, parent_id, stage, tags)
    # Before the history: mlflow copies the run's step-0 metrics (the train counts) onto the
    # logged model, and the system metrics' first sample is step 0 too.
    info = _log_model(store, settings, files, ids["train"])
    train_metrics = history_metrics(files.history) + sampled_metrics(files.system_metrics)
    _log_batched(client, ids["train"], metrics=train_metrics)
    test_split = _log_datasets(client, settings, files, ids)
    model_id = info.model_id if info is not None else None
    linked = registry.linked_metrics(eval_metrics, model_id, test_split)
    _log_batched(client, ids["evaluate"], metrics=linked)
    model = None
    if info is not None:
        model = _register(client, settings, info, eval_values, {"parent": parent_id, **ids})
        client.set_tag(parent_id, registry.MODEL_TAG, json.dumps(model))
    client.set_tag(parent_id, "snaketune.child_runs", json.dumps(ids))
    for run_id in ids.values():
        client.set_terminated(run_id)
    client.set_terminated(parent_id)  # last: a FINISHED parent means the upload is complete
    return {"parent": parent_id, **ids}, model


def _log_model(store: Store, settings: TrackSettings, files: UploadFiles, train_id: str):
    if settings.registered_model_name is None or files.model_dir is None:
        return None
    if not registry.servable(files.model_dir):
        log.info("%s is not a transformers model; not registered", files.model_dir)
        return None
    task = settings.config["task"]
    config = registry.inference_config(task, settings.config.get("evaluate", {}))
    return registry.log_model(store.uri, train_id, files.model_dir, task, config)


def _register(client, settings: TrackSettings, info, eval_values: dict, ids: dict) -> dict:
    record = registry.VersionRecord(
        settings.experiment, settings.config, config_hash(settings.config), eval_values, ids
    )
    return registry.register(client, settings.registered_model_name, info, record).as_dict()


def _log_datasets(client, settings: TrackSettings, files: UploadFiles, ids: dict[str, str]):
    """Dataset inputs on the train and evaluate runs; returns the test split (or None)."""
    datasets = lineage.split_datasets(
        settings.config.get("dataset", settings.experiment),
        redact(str(files.manifest("download").get("params", {}).get("url", ""))),
        files.manifest("split"),
    )
    for stage in lineage.RUN_SPLITS:
        inputs = lineage.dataset_inputs(datasets, stage)
        if inputs and stage in ids:
            client.log_inputs(ids[stage], datasets=inputs)
    return datasets.get("test")
