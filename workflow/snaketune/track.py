"""Stage 8, track_experiment: mirror one experiment's results into MLflow.

Results on disk are the source of truth; this stage only reads them, so an MLflow outage never
loses anything: the rule fails with a message, and the next `snakemake` run uploads what is
missing. A parent run is keyed by a digest of every stage manifest; a finished run with the same
key is reused and an unfinished one is replaced, so uploads happen exactly once.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import platform
import re
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from snaketune.errors import TrackingError
from snaketune.fileio import read_json, write_json
from snaketune.manifest import package_versions
from snaketune.provenance import config_hash, git_state, invocation_tags

log = logging.getLogger(__name__)

STAGES = ("download", "clean", "split", "tokenizer", "tokenize", "train", "evaluate")
RUN_KEY_TAG = "snaketune.run_key"
MAX_PARAM_LENGTH = 500  # MLflow's limit is larger, but long values are unreadable in the UI
# MLflow refuses metric names with characters outside [/\w.\- :] and names that change under path
# normalisation ('a//b', 'a/../b'). Class labels come from the user's data and end up in metric
# names (eval.per_class.<label>.f1), so one label like 'billing & payments' would fail every retry
# of the upload. Such characters, '/' included (which rules out the path cases), become '_'.
_UNSAFE_IN_METRIC_NAME = re.compile(r"[^\w.\- :]")


@dataclass(frozen=True)
class TrackSettings:
    experiment: str
    """The experiment entry's name (the parent run's name)."""
    mlflow_experiment: str
    tracking_uri: str
    """The configured store; MLFLOW_TRACKING_URI, read here at run time, takes precedence (so a
    credential in it never lands in a job's command line or in Snakemake's logs)."""
    artifact_location: str | None
    """Where a newly created MLflow experiment stores artifacts (local stores only)."""
    config: dict[str, Any]
    """The experiment's resolved config, logged as flattened params."""
    provenance: str | None = None
    """provenance.json of the snakemake invocation (its command line becomes a tag)."""


@dataclass(frozen=True)
class StageFiles:
    """One stage's files to mirror: its manifest and the artifacts worth browsing."""

    name: str
    manifest: Path
    artifacts: tuple[Path, ...] = ()


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


def check_reachable(uri: str) -> None:
    if not uri.startswith(("http://", "https://")):
        return
    parts = urlsplit(uri)
    netloc = parts.hostname + (f":{parts.port}" if parts.port else "")
    health = urlunsplit(parts._replace(netloc=netloc)).rstrip("/") + "/health"
    request = urllib.request.Request(health)
    if parts.username is not None:  # urllib takes credentials as a header, not in the URL
        token = base64.b64encode(f"{parts.username}:{parts.password or ''}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            response.read()
    except OSError as err:
        raise TrackingError(
            f"MLflow tracking server {redact(uri)} is unreachable ({err}). Every result is "
            "complete under results/; start the server (or fix MLFLOW_TRACKING_URI / "
            "mlflow.tracking_uri) and rerun snakemake to upload them."
        ) from err


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


def find_parent(client, experiment_id: str, key: str):
    runs = client.search_runs([experiment_id], f"tags.`{RUN_KEY_TAG}` = '{key}'")
    for run in runs:
        if run.info.status == "FINISHED":
            return run
        client.delete_run(run.info.run_id)  # an upload cut short: replace it
        for child in client.search_runs(
            [experiment_id], f"tags.`mlflow.parentRunId` = '{run.info.run_id}'"
        ):
            client.delete_run(child.info.run_id)
    return None


def experiment_id_for(client, settings: TrackSettings, uri: str) -> str:
    existing = client.get_experiment_by_name(settings.mlflow_experiment)
    if existing is not None:
        return existing.experiment_id
    # A tracking server decides where artifacts go; a local store keeps them under results/.
    remote = uri.startswith(("http://", "https://"))
    location = None if remote else settings.artifact_location
    return client.create_experiment(settings.mlflow_experiment, artifact_location=location)


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


def track_experiment(
    settings: TrackSettings, stages: list[StageFiles], history: Path, metrics: Path, runs_path: Path
) -> dict[str, str]:
    from mlflow import MlflowClient

    uri = effective_tracking_uri(settings.tracking_uri)
    check_reachable(uri)
    # MLflow's default is 7 retries with growing waits: minutes before a dead server is reported.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")
    key = run_key(settings, stages)
    train_manifest = read_json(next(s.manifest for s in stages if s.name == "train"))
    tags = {
        **git_state(),
        **invocation_tags(settings.provenance),
        "snaketune.experiment": settings.experiment,
        "snaketune.config_hash": config_hash(settings.config),
        "host": platform.node(),
        "device": train_manifest.get("device", "unknown"),
        **{f"version.{k}": v for k, v in package_versions().items()},
    }
    with store_lock(uri):
        client = MlflowClient(tracking_uri=uri)
        try:
            experiment_id = experiment_id_for(client, settings, uri)
            parent = find_parent(client, experiment_id, key)
            if parent is not None:
                log.info(
                    "runs for %s are already in MLflow (%s)",
                    settings.experiment,
                    parent.info.run_id,
                )
                ids = json.loads(parent.data.tags.get("snaketune.child_runs", "{}"))
                ids["parent"] = parent.info.run_id
            else:
                ids = _upload(client, experiment_id, settings, stages, history, metrics, tags, key)
        except Exception as err:
            # MLflow raises its own exceptions, except that an HTTP artifact store answering an
            # upload with an error status (a proxy's 413 for a large model, say) raises requests'
            # HTTPError; both mean the store could not be written, not that results are wrong.
            if not type(err).__module__.startswith(("mlflow", "requests")):
                raise
            raise TrackingError(
                f"writing to MLflow at {redact(uri)} failed: {err}. Results on disk "
                "are complete; rerun snakemake to retry the upload."
            ) from err
    write_json(
        runs_path,
        {
            "tracking_uri": redact(uri),
            "experiment_id": experiment_id,
            "run_key": key,
            "runs": ids,
        },
    )
    return ids


def _upload(
    client,
    experiment_id: str,
    settings: TrackSettings,
    stages: list[StageFiles],
    history: Path,
    metrics_path: Path,
    tags: dict,
    key: str,
) -> dict[str, str]:
    from mlflow.entities import Metric, Param

    parent = client.create_run(
        experiment_id, run_name=settings.experiment, tags={**tags, RUN_KEY_TAG: key}
    )
    parent_id = parent.info.run_id
    params = [Param(k, v) for k, v in as_params(settings.config).items()]
    eval_metrics = [
        Metric(f"eval.{k}", v, 0, 0) for k, v in numeric_metrics(read_json(metrics_path)).items()
    ]
    _log_batched(client, parent_id, params=params, metrics=eval_metrics)
    client.log_text(parent_id, json.dumps(settings.config, indent=2), "config.json")
    ids = {}
    for stage in stages:
        ids[stage.name] = log_stage(client, experiment_id, parent_id, stage, tags)
    _log_batched(client, ids["train"], metrics=history_metrics(history))
    _log_batched(client, ids["evaluate"], metrics=eval_metrics)
    client.set_tag(parent_id, "snaketune.child_runs", json.dumps(ids))
    for run_id in ids.values():
        client.set_terminated(run_id)
    client.set_terminated(parent_id)  # last: a FINISHED parent means the upload is complete
    return {"parent": parent_id, **ids}


def default_tracking_uri(results_dir: Path) -> str:
    return f"sqlite:///{Path(results_dir).resolve() / 'mlflow.db'}"


def configured_tracking_uri(configured: str | None, results_dir: Path) -> str:
    """The config's mlflow.tracking_uri, or SQLite in results/."""
    return configured or default_tracking_uri(results_dir)


def effective_tracking_uri(configured: str) -> str:
    """MLFLOW_TRACKING_URI wins over the config."""
    return os.environ.get("MLFLOW_TRACKING_URI") or configured


def redact(uri: str) -> str:
    """The URI without credentials (user:password@ or a token in the userinfo part)."""
    parts = urlsplit(uri)
    if parts.username is None and parts.password is None:
        return uri
    host = parts.hostname or ""
    netloc = f"***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))
