"""Live tracking: each stage's MLflow run exists while the stage works, and its metrics arrive as
they are measured.

A stage job started by the workflow (its rule sets SNAKETUNE_TRACKING to the experiment's
tracking folder) gets a `Tracker`: a background thread that finds or creates the experiment's
parent run and the stage's run, marks them RUNNING with the stage's real start time, sends the
metrics the stage logs in batches, and ends the run FINISHED, FAILED or KILLED with the stage's
real end time. The stage only ever puts values on a bounded queue (a full queue drops them and
counts them), so no step waits for the server; results on disk stay the source of truth, and the
track job (snaketune.track.reconcile) uploads whatever never arrived.

Run ids live under results/<experiment>/tracking/<store>-<config>/, one file per run, written once
(the first writer wins, atomically), so every later job of the stage (a rerun, a resume, a retry,
a SLURM requeue) logs into the same run. A stage's run is keyed by what it computes: the digests
of its inputs and its parameters (`run_key`, recorded in its manifest). Points already on the
server are never sent twice: a metric point is identified by its key and step (system metrics,
sampled by time, by their timestamp).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import queue
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

from snaketune.fileio import read_json, write_json
from snaketune.settings import config_hash
from snaketune.track.settings import TrackSettings
from snaketune.track.tracking_uri import effective_tracking_uri, redact, store_uri

log = logging.getLogger(__name__)

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
QUEUE_SIZE = 100_000
"""Points waiting to be sent; beyond it points are dropped (the track job uploads them later)."""
FLUSH_S = 1.0
"""How long points gather before a batch goes out."""
RETRY_S = 10.0
"""How long after a failed call the sender tries the server again."""
END_WAIT_S = 10.0
"""How long a finished stage waits for its last batch and its run's end to reach the server."""
BATCH = 1000  # MLflow's most metrics per log_batch call
MAX_PARAM_LENGTH = 500  # MLflow's limit is larger, but long values are unreadable in the UI
# MLflow refuses metric names with characters outside [/\w.\- :] and names that change under path
# normalisation ('a//b', 'a/../b'). Class labels come from the user's data and end up in metric
# names (eval.per_class.<label>.f1), so one label like 'billing & payments' would fail every retry
# of the upload. Such characters, '/' included (which rules out the path cases), become '_'.
_UNSAFE_IN_METRIC_NAME = re.compile(r"[^\w.\- :]")


# --- names and values MLflow accepts ---------------------------------------------------------


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


# --- where runs are and which ids they have -------------------------------------------------


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


# --- talking to the store ----------------------------------------------------------------------


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


# --- the live tracker --------------------------------------------------------------------------


@dataclass(frozen=True)
class StageStart:
    stage: str
    run_key: str
    started_at: float
    params: dict[str, Any]


class Point(NamedTuple):
    """One metric value as the stage logs it (MLflow's Metric is made in the sender, so that the
    stage never imports mlflow)."""

    key: str
    value: float
    timestamp: int
    step: int


@dataclass(frozen=True)
class _End:
    status: str
    ended_at: float


class _Connection:
    """The client, the stage's run and its ledger, once the store has answered."""

    def __init__(self, target: Target, folder: Path, start: StageStart):
        from mlflow import MlflowClient

        self.uri = target.uri()
        with store_lock(self.uri):
            # Under the lock: a client's first use of a new SQLite store creates its tables,
            # and two jobs doing that at once collide ("table _alembic_tmp_tags already exists").
            self.client = MlflowClient(tracking_uri=self.uri)
            experiment_id = experiment_id_for(
                self.client, target.mlflow_experiment, self.uri, Path(target.artifacts).as_uri()
            )
            ids = RunIds(folder, self.uri, target.config_hash)
            started_ms = ms(start.started_at)
            tags = {
                "snaketune.experiment": target.experiment,
                "snaketune.config_hash": target.config_hash,
            }
            self.parent_id = parent_run(
                self.client, ids, experiment_id, target.experiment, tags, started_ms
            )
            self.run_id, new = stage_run(
                self.client,
                ids,
                experiment_id,
                self.parent_id,
                start.stage,
                start.run_key,
                started_ms,
            )
            for run_id in (self.parent_id, self.run_id):
                self.client.update_run(run_id, status="RUNNING")
            params = missing_params(self.client, self.run_id, as_params(start.params))
            log_batched(self.client, self.run_id, params=params)
        self.ledger = Ledger(self.client, self.run_id, new)

    def send(self, points: list[Point]) -> None:
        from mlflow.entities import Metric

        metrics = self.ledger.missing([Metric(*p) for p in points])
        with store_lock(self.uri):
            log_batched(self.client, self.run_id, metrics=metrics)

    def end(self, end: _End) -> None:
        with store_lock(self.uri):
            self.client.set_terminated(self.run_id, end.status, ms(end.ended_at))
            if end.status != "FINISHED":  # the experiment stopped here; a rerun resumes it
                self.client.set_terminated(self.parent_id, end.status, ms(end.ended_at))


class Tracker:
    """A stage's live run. log() and end() never raise and never wait for the server (end waits
    at most END_WAIT_S for the last batch)."""

    def __init__(self, target: Target, folder: Path, start: StageStart, live_after_s: float):
        self.target, self.folder, self.start = target, Path(folder), start
        self.live_after_s = live_after_s
        """How long the stage works before the sender connects (snaketune.context)."""
        self.queue: queue.Queue = queue.Queue(maxsize=QUEUE_SIZE)
        self.dropped = 0
        self.sent = 0
        self.cpu_s = 0.0
        """CPU seconds the sender thread used (measured when it ends)."""
        self.run_id: str | None = None
        self._warned = False
        self._thread = threading.Thread(target=self._work, name="live-tracking", daemon=True)
        self._thread.start()

    # -- the stage's side --

    def log(self, values: dict[str, float], step: int, timestamp: float | None = None) -> None:
        when = ms(time.time() if timestamp is None else timestamp)
        for key, value in values.items():
            self._put(Point(key, float(value), when, int(step)))

    def log_rows(self, rows: list[dict]) -> None:
        """Training history rows, each at its step and the time it was read."""
        for row in rows:
            self.log(history_values(row), row["step"], row.get("timestamp"))

    def log_sample(self, index: int, sample: dict[str, float]) -> None:
        self.log(sample_values(sample), index, sample["timestamp"])

    def end(self, status: str, ended_at: float | None = None) -> None:
        self._put(_End(status, time.time() if ended_at is None else ended_at), force=True)
        self._thread.join(END_WAIT_S)
        if self._thread.is_alive():
            log.warning(
                "live tracking: the %s run did not reach MLflow within %.0f s; the track job "
                "uploads what is missing",
                self.start.stage,
                END_WAIT_S,
            )
        if self.run_id is None and not self._warned:
            log.info(
                "live tracking: the stage ended within %.0f s, before it connected; the track "
                "job records its run",
                self.live_after_s,
            )
        else:
            log.info(
                "live tracking: %d points sent, %.2f s of CPU in the sender",
                self.sent,
                self.cpu_s,
            )
        if self.dropped:
            log.warning(
                "live tracking: %d points were not sent live; the track job uploads them",
                self.dropped,
            )

    def _put(self, item, force: bool = False) -> None:
        try:
            self.queue.put_nowait(item)
        except queue.Full:
            if force:  # the end must get through: make room
                with contextlib.suppress(queue.Empty):
                    self.queue.get_nowait()
                    self.dropped += 1
                self.queue.put_nowait(item)
            else:
                self.dropped += 1

    # -- the sender's side --

    def _work(self) -> None:
        try:
            self._send_until_the_end()
        finally:
            self.cpu_s = time.thread_time()

    def _send_until_the_end(self) -> None:
        # A dead or slow server must cost this thread seconds, not the minutes of MLflow's
        # default retries; the track job retries later with its own patience.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        connection, pending, retry_at = None, [], time.monotonic() + self.live_after_s
        tried = False
        while True:
            if connection is None and time.monotonic() >= retry_at:
                connection, tried = self._connect(), True
                retry_at = time.monotonic() + RETRY_S
            end = self._gather(pending)
            if end is not None and connection is None and not tried and end.status != "FINISHED":
                connection = self._connect()  # a stage that stopped early: show it now
            if connection is not None and (pending or end):
                try:
                    connection.send(pending)
                    self.sent += len(pending)
                    pending.clear()
                    if end is not None:
                        connection.end(end)
                except Exception as err:  # noqa: BLE001 - an outage must never reach the stage
                    self._warn(err)
                    connection, retry_at = None, time.monotonic() + RETRY_S
            if end is not None:
                return
            if len(pending) > QUEUE_SIZE:  # the server is away: the oldest wait for the track job
                self.dropped += len(pending) - QUEUE_SIZE
                del pending[: len(pending) - QUEUE_SIZE]

    def _connect(self) -> _Connection | None:
        try:
            quiet_mlflow()
            connection = _Connection(self.target, self.folder, self.start)
        except Exception as err:  # noqa: BLE001 - an outage must never reach the stage
            self._warn(err)
            return None
        self.run_id = connection.run_id
        return connection

    def _gather(self, pending: list) -> _End | None:
        """Points for FLUSH_S (or until the end arrives); the end, if it did."""
        deadline = time.monotonic() + FLUSH_S
        while (left := deadline - time.monotonic()) > 0:
            try:
                item = self.queue.get(timeout=left)
            except queue.Empty:
                return None
            if isinstance(item, _End):
                return item
            pending.append(item)
        return None

    def _warn(self, err: Exception) -> None:
        if not self._warned:
            log.warning(
                "live tracking to %s paused (%s); the stage goes on, and the track job uploads "
                "what is missing",
                redact(self.target.uri()),
                str(err).splitlines()[0] if str(err) else repr(err),
            )
            self._warned = True


class Offline:
    """No live tracking (a job run outside the workflow): every call does nothing."""

    run_id = None

    def log(self, values: dict[str, float], step: int, timestamp: float | None = None) -> None:
        pass

    def log_rows(self, rows: list[dict]) -> None:
        pass

    def log_sample(self, index: int, sample: dict[str, float]) -> None:
        pass

    def end(self, status: str, ended_at: float | None = None) -> None:
        pass


def status_of(err: BaseException) -> str:
    """KILLED for a stop asked from outside (SIGTERM, Ctrl-C), FAILED for anything else."""
    return "KILLED" if isinstance(err, KeyboardInterrupt | SystemExit) else "FAILED"


@contextlib.contextmanager
def tracking(
    start: StageStart, folder: Path | None, live_after_s: float
) -> Iterator[Tracker | Offline]:
    """The stage's tracker while its body runs: live when the job was given a tracking folder
    (JobContext.tracking) with a target in it, else Offline. The body's exit ends the run (see
    Tracker.end's callers)."""
    target = Target.read(Path(folder)) if folder else None
    tracker: Tracker | Offline = (
        Offline() if target is None else Tracker(target, folder, start, live_after_s)
    )
    try:
        yield tracker
    except BaseException as err:
        tracker.end(status_of(err))
        raise
