"""What a stage logs to MLflow, and where: one model for the live tracker (snaketune.track.live)
and the track job that reconciles MLflow with results/ afterwards (snaketune.track.reconcile).

A stage's run is found or created by what it computes (`run_key`: its inputs' digests and its
params), under the experiment's parent run, its id kept in the experiment's tracking folder
(`RunIds`: the first writer wins). Its params are its settings (`as_params`), its counts tags
(`count_tags`), its values `Point`s under the names below (`history_points`, `sample_points`,
`value_points`); `send_points` logs those the run does not have yet (`Ledger`), in batches. The
live tracker sends them as they are measured; the track job sends, from the files, whatever
never arrived.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

from snaketune.fileio import read_json, write_json
from snaketune.settings import config_hash
from snaketune.track.settings import TrackSettings
from snaketune.track.tracking_uri import effective_tracking_uri, redact, store_uri

TARGET = "target.json"


PARENT = "parent"


STAGE_TAG = "snaketune.stage"


RUN_KEY_TAG = "snaketune.run_key"


SWEEP_TAG = "snaketune.track.sweep"
"""On every MLflow run of a sweep's point, and on the sweep's own run: the sweep's name."""


# MLflow 3 UIs before 3.17 open an experiment by this tag (3.17 reads the URL: TRAINING_VIEW).
EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}


COUNTS_PREFIX = "counts."
"""A stage manifest's counts (and its seconds) as tags of its run."""


SHARED_VIEW_PREFIX = "mlflow.sharedViewState."
"""Experiment tags holding the runs table's saved views (the UI's viewStateShareKey)."""


RUNS_VIEW = "snaketune-headline"


RUNS_VIEW_NAME = "snaketune: headline metrics"


HISTORY_PREFIX = "train."
"""The training history's values (history.jsonl) as metrics of the train run."""


EVAL_PREFIX = "eval."
"""The evaluation's metrics (metrics.json) on the evaluate run and the parent."""


SYSTEM_PREFIX = "system/"
"""System metrics, under MLflow's own names so the UI groups them the same way."""


BATCH = 1000  # MLflow's most metrics per log_batch call


MAX_PARAM_LENGTH = 500  # MLflow's limit is larger, but long values are unreadable in the UI


# MLflow refuses metric names with characters outside [/\w.\- :] and names that change under path
# normalisation ('a//b', 'a/../b'). Class labels come from the user's data and end up in metric
# names (eval.per_class.<label>.f1), so one label like 'billing & payments' would fail every retry
# of the upload. Such characters, '/' included (which rules out the path cases), become '_'.
_UNSAFE_IN_METRIC_NAME = re.compile(r"[^\w.\- :]")


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


def history_values(row: dict[str, Any]) -> dict[str, float]:
    """A history.jsonl row's values under their metric names (its step and timestamp say where
    and when they go)."""
    return {f"{HISTORY_PREFIX}{k}": v for k, v in row.items() if k not in ("step", "timestamp")}


def sample_values(sample: dict[str, float]) -> dict[str, float]:
    """A system sample's values under MLflow's system/ names (its timestamp says when)."""
    return {
        f"{SYSTEM_PREFIX}{k}": v for k, v in sample.items() if k not in ("timestamp", "elapsed_s")
    }


def run_key(inputs: dict[str, dict], params: dict[str, Any]) -> str:
    """What a stage computes: its inputs' digests and its parameters."""
    identity = {"inputs": {k: v["sha256"] for k, v in inputs.items()}, "params": params}
    text = json.dumps(identity, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def count_tags(manifest: dict[str, Any]) -> dict[str, str]:
    """A stage's counts and duration as run tags: single values describing the run, which as
    metrics would open its charts with a bar chart each; tags, not params, because a stage run
    again with the same inputs and settings (same run) may count other seconds or retries."""
    counts = {f"{COUNTS_PREFIX}{k}": v for k, v in flatten(manifest.get("counts", {})).items()}
    counts[f"{COUNTS_PREFIX}seconds"] = float(manifest.get("seconds", 0.0))
    return {k: str(v) for k, v in counts.items() if not isinstance(v, dict | list)}


# MLflow 3.17's UI shows an experiment in its GenAI mode unless the page's URL says
# workflowType=machine_learning (or the browser kept that choice from its sidebar switch): it
# no longer reads the experiment's mlflow.experimentKind tag. Every link we make says it.
TRAINING_VIEW = "workflowType=machine_learning"


def run_link(experiment_id: str, run_id: str) -> str:
    """A run's page in the UI's model-training mode, relative to the UI's address (a Markdown
    description's link then works on whichever server shows it)."""
    return f"#/experiments/{experiment_id}/runs/{run_id}?{TRAINING_VIEW}"


def runs_table_url(ui: str, runs: dict[str, Any]) -> str:
    """The MLflow UI's runs table of the experiment a track job's runs.json names, in its
    model-training mode, with the headline metrics as columns (the saved view RUNS_VIEW)."""
    experiment = runs["experiment_id"]
    view = f"viewStateShareKey={RUNS_VIEW}"
    return f"{ui.rstrip('/')}/#/experiments/{experiment}/runs?{TRAINING_VIEW}&{view}"


def runs_view(metrics: list[str], now_ms: int) -> str:
    """The saved view of the runs table (an experiment tag's value, in the envelope the 3.17 UI
    lists under Views): these metrics as columns beside the registered models."""
    columns = ["attributes.`Models`", *(f"metrics.`{m}`" for m in metrics)]
    state = json.dumps({"selectedColumns": columns})
    view = {"name": RUNS_VIEW_NAME, "createdAt": now_ms, "updatedAt": now_ms, "state": state}
    return json.dumps(view)


def view_metrics(view: str | None) -> list[str]:
    """The metric columns of a saved view (none if there is no view or it is not ours)."""
    try:
        columns = json.loads(json.loads(view)["state"])["selectedColumns"]
    except (TypeError, ValueError, KeyError):
        return []
    return [c[len("metrics.`") : -1] for c in columns if c.startswith("metrics.`")]


def share_runs_view(client, experiment_id: str, metrics: list[str]) -> None:
    """Add these metrics to the experiment's runs view (the experiments a store holds may have
    other tasks: each track job adds its own columns and keeps the others')."""
    tag = f"{SHARED_VIEW_PREFIX}{RUNS_VIEW}"
    had = view_metrics(client.get_experiment(experiment_id).tags.get(tag))
    columns = had + [m for m in metrics if m not in had]
    if columns != had or not had:
        client.set_experiment_tag(experiment_id, tag, runs_view(columns, ms(time.time())))


def ms(seconds: float) -> int:
    return int(seconds * 1000)


@dataclass(frozen=True)
class Target:
    """Where one experiment's runs go, written by each snakemake invocation before its jobs."""

    experiment: str
    mlflow_experiment: str
    tracking_uri: str
    """The configured store (empty: the SQLite store); MLFLOW_TRACKING_URI wins at run time."""
    store: str
    artifacts: str
    config_hash: str

    @classmethod
    def of(cls, settings: TrackSettings, store: Path, artifacts: Path) -> Target:
        """The target of the experiment whose track job has these settings."""
        return cls(
            settings.experiment,
            settings.mlflow_experiment,
            settings.tracking_uri,
            str(Path(store).resolve()),
            str(Path(artifacts).resolve()),
            config_hash(settings.config),
        )

    def uri(self) -> str:
        return effective_tracking_uri(store_uri(self.tracking_uri, Path(self.store)))

    def write(self, folder: Path) -> None:
        path = Path(folder) / TARGET
        if not path.exists() or read_json(path) != asdict(self):
            write_json(path, asdict(self))

    @classmethod
    def read(cls, folder: Path) -> Target | None:
        path = Path(folder) / TARGET
        return cls(**read_json(path)) if path.exists() else None


def store_key(uri: str) -> str:
    """Short name of a store: runs in another store are other runs."""
    return hashlib.sha256(redact(uri).encode()).hexdigest()[:8]


class RunIds:
    """The run ids of one experiment's runs in one store for one config: one file per run,
    written once by whoever creates the run first."""

    def __init__(self, folder: Path, uri: str, config_hash: str):
        self.folder = Path(folder) / f"{store_key(uri)}-{config_hash}"

    def path(self, name: str) -> Path:
        return self.folder / f"{name}.json"

    def get(self, name: str) -> str | None:
        path = self.path(name)
        return read_json(path)["run_id"] if path.exists() else None

    def forget(self, name: str, run_id: str) -> None:
        """Drop the record of a run the store no longer has (unless another job replaced it)."""
        if self.get(name) == run_id:
            self.path(name).unlink(missing_ok=True)

    def claim(self, name: str, run_id: str) -> str:
        """Record run_id under name unless another job recorded one first; the recorded id."""
        self.folder.mkdir(parents=True, exist_ok=True)
        final = self.path(name)
        tmp = final.with_name(f".{final.name}.{os.getpid()}.{threading.get_ident()}")
        tmp.write_text(json.dumps({"run_id": run_id}) + "\n")
        try:
            os.link(tmp, final)  # atomic, and refuses to replace: the first writer wins
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
        return self.get(name)


def store_has_run(client, run_id: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(run_id)
    except MlflowException as err:
        if err.error_code == "RESOURCE_DOES_NOT_EXIST":
            return False
        raise
    return run.info.lifecycle_stage != "deleted"  # deleted in the UI: logging to it fails


def stage_name(stage: str, key: str) -> str:
    return f"{stage}-{key}"


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


def quiet_mlflow() -> None:
    """Settings for any MLflow client of ours, before it is made."""
    # MLflow's usage telemetry calls out to the internet from a thread that, when that fails (as
    # offline), edits os.environ while this job's HTTP requests read it: a call then fails at
    # random with KeyError '_MLFLOW_TELEMETRY_SESSION_ID'. Off unless the user turned it on.
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    # MLflow prints "View run ... at: <tracking URI>" to stdout, which the rules log: a
    # credential in the URI would land in the log.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")


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
        # Another job, running at the same time, created it first.
        if err.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
            raise
        return client.get_experiment_by_name(name).experiment_id


def found_or_created(client, ids: RunIds, name: str, create) -> tuple[str, bool]:
    """The run recorded under name, or a new one from create(); and whether it is new. A
    recorded run the store no longer has (a server that came back empty at the same URI) is
    forgotten and made again: the results on disk are uploaded to the new run."""
    recorded = ids.get(name)
    if recorded is not None and store_has_run(client, recorded):
        return recorded, False
    if recorded is not None:
        ids.forget(name, recorded)
    run_id = create()
    winner = ids.claim(name, run_id)
    if winner != run_id:  # a parallel job created it too: keep the recorded one
        client.delete_run(run_id)
        return winner, False
    return run_id, True


def parent_run(
    client, ids: RunIds, experiment_id: str, name: str, tags: dict[str, str], started_ms: int
) -> str:
    def create() -> str:
        run = client.create_run(experiment_id, start_time=started_ms, tags=tags, run_name=name)
        return run.info.run_id

    run_id, _ = found_or_created(client, ids, PARENT, create)
    return run_id


def stage_run(
    client, ids: RunIds, experiment_id: str, parent_id: str, stage: str, key: str, started_ms: int
) -> tuple[str, bool]:
    def create() -> str:
        tags = {"mlflow.parentRunId": parent_id, STAGE_TAG: stage, RUN_KEY_TAG: key}
        run = client.create_run(experiment_id, start_time=started_ms, tags=tags, run_name=stage)
        return run.info.run_id

    return found_or_created(client, ids, stage_name(stage, key), create)


class Ledger:
    """The points a run already has, read from the store once per key: a point is sent only if
    its key and step (for system metrics, its timestamp) are not there yet."""

    def __init__(self, client, run_id: str, new_run: bool):
        self.client, self.run_id, self.new_run = client, run_id, new_run
        self.seen: dict[str, set[int]] = {}

    @staticmethod
    def identity(metric) -> int:
        return metric.timestamp if metric.key.startswith(SYSTEM_PREFIX) else metric.step

    def _seen(self, key: str) -> set[int]:
        if key not in self.seen:
            history = [] if self.new_run else self.client.get_metric_history(self.run_id, key)
            self.seen[key] = {self.identity(m) for m in history}
        return self.seen[key]

    def missing(self, metrics: list) -> list:
        out = []
        for metric in metrics:
            seen = self._seen(metric.key)
            if self.identity(metric) not in seen:
                seen.add(self.identity(metric))
                out.append(metric)
        return out


def log_batched(client, run_id: str, params=(), metrics=()) -> None:
    """MLflow accepts at most 100 params and 1000 metrics per log_batch call."""
    params, metrics = list(params), list(metrics)
    for i in range(0, len(params), 100):
        client.log_batch(run_id, params=params[i : i + 100])
    for i in range(0, len(metrics), BATCH):
        client.log_batch(run_id, metrics=metrics[i : i + BATCH])


def missing_params(client, run_id: str, params: dict[str, str]) -> list:
    """The params the run does not have yet (MLflow refuses to change a logged one)."""
    from mlflow.entities import Param

    have = client.get_run(run_id).data.params
    return [Param(k, v) for k, v in params.items() if k not in have]


class Point(NamedTuple):
    """One metric value as the stage logs it (MLflow's Metric is made in the sender, so that the
    stage never imports mlflow)."""

    key: str
    value: float
    timestamp: int
    step: int


def value_points(values: dict[str, float], step: int, when_ms: int) -> list[Point]:
    return [Point(key, float(value), when_ms, int(step)) for key, value in values.items()]


def history_points(rows: Iterable[dict[str, Any]], fallback_ms: int | None = None) -> list[Point]:
    """Training history rows, each at its step and the time it was read (`fallback_ms` for
    rows written before rows had a timestamp; None: now)."""
    points = []
    for row in rows:
        when = ms(row["timestamp"]) if "timestamp" in row else fallback_ms
        when = ms(time.time()) if when is None else when
        points += value_points(history_values(row), row["step"], when)
    return points


def sample_points(samples: Iterable[dict[str, float]], first: int = 0) -> list[Point]:
    """System samples under MLflow's system/ names, at their wall times; step: their index."""
    points = []
    for index, sample in enumerate(samples, start=first):
        points += value_points(sample_values(sample), index, ms(sample["timestamp"]))
    return points


def as_metrics(points: Iterable[Point]) -> list:
    from mlflow.entities import Metric

    return [Metric(*point) for point in points]


def send_points(client, run_id: str, ledger: Ledger, points: list[Point], lock=None) -> int:
    """Log the points the run does not have yet (`lock` held while writing); how many."""
    metrics = ledger.missing(as_metrics(points))
    with lock if lock is not None else contextlib.nullcontext():
        log_batched(client, run_id, metrics=metrics)
    return len(metrics)
