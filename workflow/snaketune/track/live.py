"""Live tracking: each stage's MLflow run exists while the stage works, and its metrics arrive as
they are measured.

A stage job given a tracking folder (JobContext.tracking: the rule sets SNAKETUNE_TRACKING, the
CLI reads it) gets a `Tracker` from `tracking()`, which its manifest (snaketune.manifest) starts:
a background thread that finds or creates the experiment's parent run and the stage's run, marks
them RUNNING with the stage's real start time, sends the metrics the stage logs in batches, and
ends the run FINISHED, FAILED or KILLED with the stage's real end time. The stage only ever puts
values on a bounded queue (a full queue drops them and counts them), so no step waits for the
server; results on disk stay the source of truth, and the track job (snaketune.track.reconcile)
uploads whatever never arrived.

Which run, under which names, and which points a run has already: snaketune.track.stage_log,
the one model of what a stage logs that this module and the track job share.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from snaketune.track.stage_log import (
    EVAL_PREFIX,
    Ledger,
    Point,
    RunIds,
    Target,
    as_params,
    experiment_id_for,
    history_points,
    log_batched,
    missing_params,
    ms,
    numeric_metrics,
    parent_run,
    quiet_mlflow,
    sample_points,
    send_points,
    stage_run,
    store_lock,
    value_points,
)
from snaketune.track.tracking_uri import redact

log = logging.getLogger(__name__)


QUEUE_SIZE = 100_000
"""Points waiting to be sent; beyond it points are dropped (the track job uploads them later)."""


FLUSH_S = 1.0
"""How long points gather before a batch goes out."""


RETRY_S = 10.0
"""How long after a failed call the sender tries the server again."""


END_WAIT_S = 10.0
"""How long a finished stage waits for its last batch and its run's end to reach the server."""


@dataclass(frozen=True)
class StageStart:
    stage: str
    run_key: str
    started_at: float
    params: dict[str, Any]


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

        send_points(self.client, self.run_id, self.ledger, points, store_lock(self.uri))

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
        self._put_all(
            value_points(values, step, ms(time.time() if timestamp is None else timestamp))
        )

    def log_rows(self, rows: list[dict]) -> None:
        """Training history rows, each at its step and the time it was read."""
        self._put_all(history_points(rows))

    def log_sample(self, index: int, sample: dict[str, float]) -> None:
        self._put_all(sample_points([sample], first=index))

    def log_evaluation(self, metrics: dict[str, Any]) -> None:
        """The evaluation's numbers, nested as metrics.json holds them, at step 0."""
        self.log(numeric_metrics(metrics, EVAL_PREFIX), step=0)

    def _put_all(self, points: list[Point]) -> None:
        for point in points:
            self._put(point)

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

    def log_evaluation(self, metrics: dict[str, Any]) -> None:
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
