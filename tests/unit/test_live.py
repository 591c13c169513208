"""snaketune.track.live against a real SQLite store: the stage's run while it works, its end status,
the same run for a rerun of the same computation, points never sent twice, and a stage that
never waits for (nor fails because of) a store that does not answer."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from mlflow.entities import Metric

from snaketune import cli
from snaketune.context import (
    ATTEMPT_VARIABLE,
    IN_PROCESS,
    LIVE_AFTER_S,
    LIVE_AFTER_VARIABLE,
    REPOSITORY_VARIABLE,
    TRACKING_VARIABLE,
    JobContext,
    environment_problems,
)
from snaketune.track import live, stage_log
from tests.support.mlflow_stores import new_store

EXPERIMENT = "live-unit"


def target_for(uri: str, tmp_path: Path) -> stage_log.Target:
    return stage_log.Target(
        "exp", EXPERIMENT, uri, str(tmp_path / "unused.db"), str(tmp_path), "cfg"
    )


@pytest.fixture
def store(tmp_path, empty_store_db):
    return new_store(tmp_path / "store", empty_store_db)


@pytest.fixture
def folder(tmp_path, store, monkeypatch) -> Path:
    """A tracking folder with a target, named to the stage jobs as the rules name it."""
    folder = tmp_path / "tracking"
    folder.mkdir()
    target_for(store.uri, tmp_path).write(folder)
    return folder


def run_stage(
    folder: Path,
    key: str,
    rows: list[dict],
    fail: BaseException | None = None,
    live_after_s: float = 0.0,  # these stages last milliseconds
) -> str | None:
    start = live.StageStart("train", key, time.time() - 5, {"lr": 0.1})
    with live.tracking(start, folder, live_after_s) as tracker:
        tracker.log_rows(rows)
        if fail is not None:
            raise fail
        tracker.end("FINISHED", start.started_at + 5)
    return tracker.run_id


def rows(steps) -> list[dict]:
    return [{"step": s, "loss": 1.0 / s, "timestamp": 1790000000.0 + s} for s in steps]


def test_the_first_writer_of_a_run_id_wins(tmp_path):
    ids = stage_log.RunIds(tmp_path, "sqlite:///x.db", "cfg")
    assert ids.claim("train-abc", "first") == "first"
    assert ids.claim("train-abc", "second") == "first"
    assert ids.get("train-abc") == "first"
    assert not [p for p in ids.folder.iterdir() if p.name.startswith(".")]  # no temporaries left


def test_a_stage_run_is_finished_with_its_times_params_and_points(folder, store):
    run_id = run_stage(folder, "k1", rows(range(1, 21)))
    run = store.client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "train"
    assert run.info.end_time - run.info.start_time == 5000
    assert run.data.params["lr"] == "0.1"
    assert run.data.tags[stage_log.RUN_KEY_TAG] == "k1"
    loss = store.client.get_metric_history(run_id, "train.loss")
    assert sorted(m.step for m in loss) == list(range(1, 21))
    assert {m.timestamp for m in loss} == {int((1790000000.0 + s) * 1000) for s in range(1, 21)}
    parent = store.client.get_run(run.data.tags["mlflow.parentRunId"])
    assert parent.info.status == "RUNNING"  # the track job ends it, once everything is there


@pytest.mark.parametrize(
    ("error", "status"), [(ValueError("bad"), "FAILED"), (SystemExit(1), "KILLED")]
)
def test_a_stage_that_fails_or_is_stopped_ends_its_run_so(folder, store, error, status):
    with pytest.raises(type(error)):
        run_stage(folder, "k2", rows(range(1, 3)), fail=error)
    (run,) = [r for r in store.client.search_runs([exp_id(store)]) if r.info.run_name == "train"]
    assert run.info.status == status
    parent = store.client.get_run(run.data.tags["mlflow.parentRunId"])
    assert parent.info.status == status  # the experiment stopped there


def test_a_sigterm_anywhere_in_a_job_ends_its_run_killed(folder, store):
    """Not only in the training loop: the CLI makes a SIGTERM an exit that unwinds the job
    (snaketune.cli.stopped_by_sigterm), where Python's default would end the process with its
    run RUNNING."""
    start = live.StageStart("train", "k5", time.time() - 5, {})
    with pytest.raises(SystemExit), cli.stopped_by_sigterm("train"):
        with live.tracking(start, folder, 0.0) as tracker:
            tracker.log_rows(rows(range(1, 3)))
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # not slept: the handler raises at once
    (run,) = [r for r in store.client.search_runs([exp_id(store)]) if r.info.run_name == "train"]
    assert run.info.status == "KILLED"


def exp_id(store) -> str:
    return store.client.get_experiment_by_name(EXPERIMENT).experiment_id


def test_a_rerun_of_the_same_computation_logs_into_the_same_run_once_per_step(folder, store):
    first = run_stage(folder, "k3", rows(range(1, 11)))
    again = run_stage(folder, "k3", rows(range(6, 21)))  # resumed from step 5: 6..10 come again
    assert again == first
    loss = store.client.get_metric_history(first, "train.loss")
    assert sorted(m.step for m in loss) == list(range(1, 21))
    other = run_stage(folder, "k4", rows(range(1, 3)))  # other inputs or settings: another run
    assert other != first


def test_points_already_there_are_not_sent_again(store):
    run_id = store.client.create_run(store.client.create_experiment("ledger")).info.run_id
    store.client.log_batch(run_id, metrics=[Metric("train.loss", 1.0, 0, 1)])
    store.client.log_batch(run_id, metrics=[Metric("system/cpu", 5.0, 1000, 0)])
    ledger = stage_log.Ledger(store.client, run_id, new_run=False)
    points = [
        Metric("train.loss", 1.0, 0, 1),
        Metric("train.loss", 0.5, 0, 2),
        Metric("system/cpu", 5.0, 1000, 0),
        Metric("system/cpu", 6.0, 2000, 0),  # sampled by time: a second sample is a new point
    ]
    assert [(m.key, m.step, m.timestamp) for m in ledger.missing(points)] == [
        ("train.loss", 2, 0),
        ("system/cpu", 0, 2000),
    ]
    assert ledger.missing(points) == []


def test_a_store_that_does_not_answer_never_holds_up_or_fails_the_stage(tmp_path, monkeypatch):
    folder = tmp_path / "tracking"
    folder.mkdir()
    target_for("http://127.0.0.1:9", tmp_path).write(folder)  # nothing listens on port 9
    monkeypatch.setattr(live, "QUEUE_SIZE", 1000)
    start = live.StageStart("train", "k5", time.time(), {})
    started = time.perf_counter()
    with live.tracking(start, folder, 0.0) as tracker:
        for step in range(1, 2001):
            tracker.log({"train.loss": 1.0}, step)
        logged = time.perf_counter() - started
        tracker.end("FINISHED")
    assert logged < 1.0  # 2000 points queued or dropped without waiting for anyone
    assert tracker.run_id is None and tracker.dropped >= 1000
    assert time.perf_counter() - started < live.END_WAIT_S + 5


def test_a_stage_done_before_live_after_s_never_connects(folder, store):
    started = time.perf_counter()
    assert run_stage(folder, "k6", rows(range(1, 4)), live_after_s=2.0) is None
    assert time.perf_counter() - started < 1.0  # the end did not wait for a connection
    assert store.client.get_experiment_by_name(EXPERIMENT) is None  # the track job records it
    with pytest.raises(ValueError):  # but a stage that stops early shows so at once
        run_stage(folder, "k7", rows(range(1, 4)), fail=ValueError("bad"), live_after_s=2.0)
    (failed,) = store.client.search_runs([exp_id(store)], "attributes.run_name = 'train'")
    assert failed.info.status == "FAILED"
    assert run_stage(folder, "k6", rows(range(1, 4))) is not None  # the same, connecting at once


def test_without_a_tracking_folder_there_is_no_tracking(tmp_path):
    start = live.StageStart("clean", "k", time.time(), {})
    with live.tracking(start, None, 0.0) as tracker:
        assert isinstance(tracker, live.Offline)
    with live.tracking(start, tmp_path, 0.0) as tracker:  # a folder the workflow gave no target
        assert isinstance(tracker, live.Offline)


def test_the_runs_table_url_opens_the_model_training_view_with_the_headline_columns():
    """MLflow 3.17's UI takes its mode from the URL (workflowType) and a runs table's columns
    from the saved view the viewStateShareKey names (an experiment tag the track job writes)."""
    url = stage_log.runs_table_url("http://127.0.0.1:5000/", {"experiment_id": "7"})
    assert url == (
        "http://127.0.0.1:5000/#/experiments/7/runs?workflowType=machine_learning"
        f"&viewStateShareKey={stage_log.RUNS_VIEW}"
    )


def test_run_links_open_the_model_training_view_relative_to_the_ui():
    assert (
        stage_log.run_link("7", "abc") == "#/experiments/7/runs/abc?workflowType=machine_learning"
    )


def test_a_views_columns_are_read_back_and_anything_else_has_none():
    view = stage_log.runs_view(["eval.perplexity", "eval.f1"], 1000)
    assert stage_log.view_metrics(view) == ["eval.perplexity", "eval.f1"]
    for other in (None, "", "{}", '{"state": "[]"}', "not json"):
        assert stage_log.view_metrics(other) == []


def test_counts_and_seconds_become_tags_of_single_values():
    manifest = {"counts": {"steps": 300, "test": {"rows": 5}, "stopped_early": False}}
    assert stage_log.count_tags({**manifest, "seconds": 1.5}) == {
        "counts.steps": "300",
        "counts.test.rows": "5",
        "counts.stopped_early": "False",
        "counts.seconds": "1.5",
    }


def test_the_environment_sets_how_long_a_stage_works_before_it_connects():
    environ = {LIVE_AFTER_VARIABLE: "0.5"}
    assert JobContext.from_environment(environ).live_after_s == 0.5
    assert environment_problems(environ) == []
    for bad in ("soon", "-1", "nan"):
        environ = {LIVE_AFTER_VARIABLE: bad}
        assert f"{LIVE_AFTER_VARIABLE}={bad!r}" in environment_problems(environ)[0]
        with pytest.raises(ValueError, match="expected seconds >= 0"):
            JobContext.from_environment(environ)
    assert JobContext.from_environment({}).live_after_s == LIVE_AFTER_S


def test_a_job_reads_its_context_from_the_environment_the_rules_set(tmp_path):
    context = JobContext.from_environment(
        {TRACKING_VARIABLE: str(tmp_path), ATTEMPT_VARIABLE: "3", REPOSITORY_VARIABLE: "/repo"}
    )
    assert context == JobContext(Path("/repo"), tmp_path, 3, LIVE_AFTER_S)
    assert JobContext.from_environment({}) == IN_PROCESS
    assert IN_PROCESS.tracking is None and IN_PROCESS.attempt == 1
    with pytest.raises(ValueError, match="SNAKETUNE_ATTEMPT='x'"):
        JobContext.from_environment({ATTEMPT_VARIABLE: "x"})


def test_a_new_sqlite_store_is_made_only_under_the_store_lock(tmp_path):
    """Two jobs making one new SQLite store at once collide in its migrations ("table
    _alembic_tmp_tags already exists", seen in a sweep: a track job and a training's live
    sender), so the sender makes its client, which creates the store, under the store's lock."""
    import threading

    db = tmp_path / "new" / "mlflow.db"
    uri = f"sqlite:///{db}"
    folder = tmp_path / "tracking"
    folder.mkdir()
    start = live.StageStart("train", "k-new", time.time(), {})
    connected = []
    worker = threading.Thread(
        target=lambda: connected.append(live._Connection(target_for(uri, tmp_path), folder, start))
    )
    with stage_log.store_lock(uri):
        worker.start()
        worker.join(timeout=5)
        assert worker.is_alive() and not db.exists()  # waiting for the lock, the store unmade
    worker.join(timeout=120)
    assert connected and db.exists()
