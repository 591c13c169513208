"""Live tracking against a real `mlflow server` on 127.0.0.1: stage runs that exist while their
stage works, loss points on the server while train_model is still running, the same train run
across a SIGKILL and a SIGTERM (requeue) and their reruns, a slow server that training never
waits for, and after each workflow one point per step and the stages' own durations.

The data stages run once (`prepared`); each scenario copies their results into a workdir of its
own and points it at a fresh server, so its upstream runs are the track job's (made from the
manifests, with the stages' times) and its train and evaluate runs are live."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import yaml
from mlflow import MlflowClient

from snaketune.context import LIVE_AFTER_VARIABLE
from snaketune.train.resume import RECORD
from tests.support.mlflow_stores import all_runs
from tests.support.processes import kill_tree, paused, wait_for
from tests.support.reliability import Relay, pipeline_config
from tests.support.servers import crash, free_port, serving, start_server, stop
from tests.support.ui import SCREENSHOTS, open_page, text_once_it_shows
from tests.support.workflow import snakemake_command, stage_folder

pytestmark = pytest.mark.slow

EXPERIMENT = "live-lm"
MLFLOW_EXPERIMENT = "snaketune-live"
STEPS = 1200
TRAIN = {
    "max_steps": STEPS,
    "batch_size": 8,
    "warmup_steps": 2,
    "eval_every": 200,
    "eval_rows": 32,
    "checkpoint_every": 100,
    "log_every": 10,
}
TIMEOUT_S = 300


def live_config() -> dict:
    config = pipeline_config([EXPERIMENT])
    config["mlflow"]["experiment_name"] = MLFLOW_EXPERIMENT
    config["experiments"][0]["train"] = TRAIN
    return config


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """A workdir whose data stages are done (tracked to no server: their runs come later)."""
    workdir = tmp_path_factory.mktemp("prepared")
    (workdir / "config.yaml").write_text(yaml.safe_dump(live_config()))
    target = str(stage_folder(live_config(), EXPERIMENT, "tokenize") / "manifest.json")
    done = subprocess.run(
        workflow(workdir, target), capture_output=True, text=True, timeout=TIMEOUT_S
    )
    assert done.returncode == 0, done.stderr[-3000:]
    shutil.rmtree(workdir / "results" / EXPERIMENT / "tracking")
    return workdir


def workflow(workdir: Path, *args: str) -> list[str]:
    return snakemake_command(workdir, "--cores", "2", *args)


def copy_of(prepared: Path, where: Path) -> Path:
    shutil.copytree(prepared, where, symlinks=True)
    return where


def start(workdir: Path, uri: str) -> subprocess.Popen:
    # Senders connect at once: the checks below need training still running once its points
    # are on the server, and a fast machine trains these 1,200 steps in a few seconds.
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, LIVE_AFTER_VARIABLE: "0"}
    return subprocess.Popen(
        workflow(workdir),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
        text=True,
    )


def finish(process: subprocess.Popen) -> str:
    out, _ = process.communicate(timeout=TIMEOUT_S)
    return out


def train_process(workdir: Path) -> psutil.Process | None:
    for proc in psutil.process_iter(["cmdline", "cwd"]):
        cmdline = proc.info["cmdline"] or []
        if "train" in cmdline and "snaketune.cli" in cmdline[:3]:
            if proc.info["cwd"] == str(workdir):
                return proc
    return None


def runs_by_stage(client: MlflowClient) -> dict[str, list]:
    out: dict[str, list] = {}
    for run in all_runs(client, MLFLOW_EXPERIMENT):
        if run.info.lifecycle_stage == "active":
            out.setdefault(run.data.tags.get("snaketune.stage", "parent"), []).append(run)
    return out


def live_train_run(client: MlflowClient):
    """The train run while it is RUNNING with loss points on the server, else None."""
    if client.get_experiment_by_name(MLFLOW_EXPERIMENT) is None:
        return None
    for run in runs_by_stage(client).get("train", []):
        if run.info.status == "RUNNING" and client.get_metric_history(
            run.info.run_id, "train.loss"
        ):
            return run
    return None


def steps_of(client: MlflowClient, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def manifest(workdir: Path, stage: str) -> dict:
    folder = workdir / "results" / ("datasets/support-demo" if stage == "download" else EXPERIMENT)
    return json.loads((folder / stage / "manifest.json").read_text())


@dataclass(frozen=True)
class Watched:
    workdir: Path
    client: MlflowClient
    seen_running: object
    """The train run as the server showed it while train_model was still working."""
    train_was_running: bool
    output: str
    ui: LiveChart | None
    """What the MLflow UI showed of the running train run (None: no browser here)."""


@dataclass(frozen=True)
class LiveChart:
    charts: str
    """The text of the run's metric charts page."""
    running_after: bool
    """Whether the run was still RUNNING once the chart had rendered."""
    screenshot: Path


def watch_in_the_browser(browser, uri: str, run) -> LiveChart:
    """The running train run's loss chart in the UI that `mlflow server` serves."""
    experiment = run.info.experiment_id
    runs = f"{uri}/#/experiments/{experiment}/runs"
    page = f"{runs}/{run.info.run_id}/model-metrics?workflowType=machine_learning"
    open_page(browser, page, "train.loss")
    search = browser.find_element("css selector", "input[placeholder='Search metric charts']")
    search.send_keys("train.loss")
    charts = text_once_it_shows(browser, "train (train.loss)")
    screenshot = SCREENSHOTS / "live-train-loss-while-running.png"
    browser.save_screenshot(str(screenshot))
    running = MlflowClient(tracking_uri=uri).get_run(run.info.run_id).info.status == "RUNNING"
    return LiveChart(charts, running, screenshot)


@pytest.fixture(scope="module")
def watched(prepared, tmp_path_factory, request) -> Watched:
    """One workflow watched on the server (and, where there is a browser, in its UI) while it
    trains."""
    try:
        browser = request.getfixturevalue("browser")
    except pytest.skip.Exception:
        browser = None  # the UI test below says why it skips; the server's side is still checked
    root = tmp_path_factory.mktemp("watched")
    workdir = copy_of(prepared, root / "workdir")
    server, process = start_server(root / "server", free_port())
    try:
        client = MlflowClient(tracking_uri=server.uri)
        pipeline = start(workdir, server.uri)
        wait_for(lambda: live_train_run(client) or pipeline.poll() is not None, TIMEOUT_S, 0.2)
        seen = live_train_run(client)
        still = not (workdir / "results" / EXPERIMENT / "train" / "manifest.json").exists()
        ui = None
        if browser and seen:
            # The train job held while the browser renders: on a fast machine the run would
            # otherwise finish first. What the chart shows was sent before the pause.
            train = train_process(workdir)
            with paused(train.pid) if train else contextlib.nullcontext():
                ui = watch_in_the_browser(browser, server.uri, seen)
        output = finish(pipeline)
        assert pipeline.returncode == 0, output[-3000:]
        yield Watched(workdir, client, seen, still, output, ui)
    finally:
        stop(process)


def test_the_ui_shows_the_running_train_runs_loss_chart(watched):
    if watched.ui is None:
        pytest.skip("needs Debian's chromium and chromium-driver: apt-get install them")
    assert "Step" in watched.ui.charts  # the per-step history, growing while the run trains
    assert watched.ui.running_after, "the run had finished before the chart rendered"
    assert watched.ui.screenshot.exists()


def test_the_train_run_is_running_with_loss_points_while_it_trains(watched):
    assert watched.seen_running is not None, "no RUNNING train run with loss points was seen"
    assert watched.train_was_running  # seen before train_model wrote its manifest


def test_after_the_workflow_every_run_is_finished_once_per_stage(watched):
    runs = runs_by_stage(watched.client)
    assert sorted(runs) == sorted(
        ["parent", "download", "clean", "split", "tokenizer", "tokenize", "train", "evaluate"]
    )
    assert all(len(group) == 1 for group in runs.values())
    assert {run.info.status for group in runs.values() for run in group} == {"FINISHED"}
    assert runs["train"][0].info.run_id == watched.seen_running.info.run_id


def test_stage_durations_are_the_manifests_seconds(watched):
    for stage, (run,) in runs_by_stage(watched.client).items():
        if stage == "parent":
            continue
        recorded = manifest(watched.workdir, stage)
        assert run.info.start_time == pytest.approx(recorded["started_at"] * 1000, abs=1000)
        duration_s = (run.info.end_time - run.info.start_time) / 1000
        assert duration_s == pytest.approx(recorded["seconds"], abs=1.0), stage


def test_every_metric_history_has_one_point_per_step(watched):
    (train,) = runs_by_stage(watched.client)["train"]
    for key in ("train.loss", "train.lr", "train.grad_norm", "train.tokens_per_s"):
        assert steps_of(watched.client, train.info.run_id, key) == list(range(1, STEPS + 1)), key
    val = steps_of(watched.client, train.info.run_id, "train.val_loss")
    assert val == list(range(TRAIN["eval_every"], STEPS + 1, TRAIN["eval_every"]))
    system = watched.client.get_metric_history(train.info.run_id, "system/process_rss_megabytes")
    assert system and len({m.timestamp for m in system}) == len(system)
    (parent,) = runs_by_stage(watched.client)["parent"]
    assert "eval.perplexity" in parent.data.metrics


def test_metric_points_carry_the_time_they_were_measured(watched):
    (train,) = runs_by_stage(watched.client)["train"]
    recorded = manifest(watched.workdir, "train")
    start_ms = recorded["started_at"] * 1000
    end_ms = start_ms + recorded["seconds"] * 1000
    loss = watched.client.get_metric_history(train.info.run_id, "train.loss")
    assert all(start_ms <= m.timestamp <= end_ms for m in loss)
    assert len({m.timestamp for m in loss}) > 1  # read at several points, not stamped at once


# --- a crash and a requeue ------------------------------------------------------------------


@dataclass(frozen=True)
class Resumed:
    workdir: Path
    client: MlflowClient
    killed_run: str
    """The train run's id after the SIGKILL, as results/ recorded it."""
    status_after_sigterm: str
    finished: str


def recorded_train_id(workdir: Path) -> str | None:
    tracking = workdir / "results" / EXPERIMENT / "tracking"
    files = list(tracking.glob("*/train-*.json"))
    return json.loads(files[0].read_text())["run_id"] if len(files) == 1 else None


def checkpointed(workdir: Path, after: int) -> bool:
    record = workdir / "results" / EXPERIMENT / "train_state" / RECORD
    if not record.exists():
        return False
    try:
        return json.loads(record.read_text()).get("step", 0) > after
    except json.JSONDecodeError:
        return False


def last_live_step(client: MlflowClient, workdir: Path) -> int:
    """The train run's last step on the server (0: no run or no point yet)."""
    run_id = recorded_train_id(workdir)
    if run_id is None:
        return 0
    return max((m.step for m in client.get_metric_history(run_id, "train.loss")), default=0)


def interrupt_once_live(workdir: Path, uri: str, how, ready) -> str:
    """Stop the train job once `ready(client, before)` holds, `before` being the last step the
    server had when the workflow started."""
    client = MlflowClient(tracking_uri=uri)
    before = last_live_step(client, workdir)
    pipeline = start(workdir, uri)
    wait_for(lambda: ready(client, before) or pipeline.poll() is not None, TIMEOUT_S, 0.1)
    assert pipeline.poll() is None, "the workflow ended before the train job could be stopped"
    how(train_process(workdir))
    output = finish(pipeline)
    trained = workdir / "results" / EXPERIMENT / "train" / "manifest.json"
    assert not trained.exists(), "training had ended when it was stopped: " + output[-2000:]
    return output


def connected_and_checkpointed(workdir: Path):
    """The train job's sender has its run, and a checkpoint is written: as early as a SIGKILL
    can come and still leave a run and a checkpoint to resume, so that the next attempt has
    most of its steps still to train (on a fast machine the 1,200 steps take seconds)."""
    return lambda client, before: (
        recorded_train_id(workdir) is not None and checkpointed(workdir, 0)
    )


def sending_past(workdir: Path):
    """This attempt's sender has connected: the server has points past those it had (the
    sender needs seconds to start)."""
    return lambda client, before: last_live_step(client, workdir) > before


@pytest.fixture(scope="module")
def resumed(prepared, tmp_path_factory) -> Resumed:
    root = tmp_path_factory.mktemp("resumed")
    workdir = copy_of(prepared, root / "workdir")
    server, process = start_server(root / "server", free_port())
    try:
        client = MlflowClient(tracking_uri=server.uri)
        # A SIGKILL leaves the last periodic checkpoint; a SIGTERM writes one as it exits.
        interrupt_once_live(
            workdir, server.uri, lambda p: kill_tree(p.pid), connected_and_checkpointed(workdir)
        )
        killed = recorded_train_id(workdir)
        subprocess.run(workflow(workdir, "--unlock"), capture_output=True, check=True)
        interrupt_once_live(
            workdir, server.uri, lambda p: p.send_signal(signal.SIGTERM), sending_past(workdir)
        )
        wait_for(lambda: client.get_run(killed).info.status != "RUNNING", 30, 0.2)
        status = client.get_run(killed).info.status
        pipeline = start(workdir, server.uri)
        output = finish(pipeline)
        assert pipeline.returncode == 0, output[-3000:]
        yield Resumed(workdir, client, killed, status, output)
    finally:
        stop(process)


def test_one_train_run_across_a_crash_a_requeue_and_their_reruns(resumed):
    assert resumed.killed_run is not None
    (train,) = runs_by_stage(resumed.client)["train"]
    assert train.info.run_id == resumed.killed_run == recorded_train_id(resumed.workdir)
    assert train.info.status == "FINISHED"
    assert resumed.status_after_sigterm == "KILLED"


def test_the_resumed_history_has_every_step_once(resumed):
    (train,) = runs_by_stage(resumed.client)["train"]
    for key in ("train.loss", "train.lr"):
        assert steps_of(resumed.client, train.info.run_id, key) == list(range(1, STEPS + 1))


def test_the_resumed_run_ends_when_the_last_attempt_did(resumed):
    (train,) = runs_by_stage(resumed.client)["train"]
    recorded = manifest(resumed.workdir, "train")
    end_ms = (recorded["started_at"] + recorded["seconds"]) * 1000
    assert train.info.end_time == pytest.approx(end_ms, abs=1000)
    assert train.info.start_time < recorded["started_at"] * 1000  # the first attempt's start


# --- a slow server ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def slow(prepared, tmp_path_factory):
    """Every answer 1 s late while the model trains, then on time for the track job."""
    root = tmp_path_factory.mktemp("slow")
    workdir = copy_of(prepared, root / "workdir")
    server, process = start_server(root / "server", free_port())
    relay = Relay(server.uri)
    relay.delay_s = 1.0
    try:
        with serving(relay):
            pipeline = start(workdir, relay.uri)
            wait_for(
                lambda: (
                    (workdir / "results" / EXPERIMENT / "train" / "manifest.json").exists()
                    or pipeline.poll() is not None
                ),
                TIMEOUT_S,
                0.2,
            )
            relay.delay_s = 0.0
            output = finish(pipeline)
            assert pipeline.returncode == 0, output[-3000:]
            yield workdir, MlflowClient(tracking_uri=server.uri), relay
    finally:
        stop(process)


def test_a_slow_server_gets_every_step_exactly_once(slow):
    workdir, client, relay = slow
    (train,) = runs_by_stage(client)["train"]
    assert steps_of(client, train.info.run_id, "train.loss") == list(range(1, STEPS + 1))
    assert train.info.status == "FINISHED"
    log = (workdir / "results" / EXPERIMENT / "train" / "train.log").read_text()
    assert "Traceback" not in log


def test_another_server_after_a_complete_run_gets_everything_on_the_next_run(watched, tmp_path):
    """MLFLOW_TRACKING_URI pointed at a new server: the next snakemake reruns only the track
    job, which uploads the complete runs there (the stages' times, one point per step)."""
    workdir = copy_of(watched.workdir, tmp_path / "workdir")
    server, process = start_server(tmp_path / "server", free_port())
    try:
        pipeline = start(workdir, server.uri)
        output = finish(pipeline)
        assert pipeline.returncode == 0, output[-3000:]
        ran = set(re.findall(r"^localrule (\w+):", output, flags=re.M))
        assert ran == {"track_experiment", "all"}
        client = MlflowClient(tracking_uri=server.uri)
        runs = runs_by_stage(client)
        assert len(runs) == 8 and all(len(group) == 1 for group in runs.values())
        (train,) = runs["train"]
        assert steps_of(client, train.info.run_id, "train.loss") == list(range(1, STEPS + 1))
        recorded = manifest(workdir, "train")
        assert train.info.start_time == pytest.approx(recorded["started_at"] * 1000, abs=1000)
    finally:
        stop(process)


# --- a server down at the start, or lost mid-train ----------------------------------------------


def train_manifest_or_end(workdir: Path, pipeline: subprocess.Popen):
    path = workdir / "results" / EXPERIMENT / "train" / "manifest.json"
    return lambda: path.exists() or pipeline.poll() is not None


@pytest.fixture(scope="module", params=["down at start", "lost mid-train"])
def outage(prepared, tmp_path_factory, request):
    """The server away while the model trains (from the start, or from the first loss points
    on), back once training is over: the evaluate and track jobs find it again."""
    root = tmp_path_factory.mktemp("outage")
    workdir = copy_of(prepared, root / "workdir")
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    process = None
    try:
        if request.param == "lost mid-train":
            _, process = start_server(root / "server", port)
            client = MlflowClient(tracking_uri=uri)
        pipeline = start(workdir, uri)
        if request.param == "lost mid-train":
            wait_for(lambda: live_train_run(client) or pipeline.poll() is not None, TIMEOUT_S, 0.2)
            train = train_process(workdir)
            assert train is not None, "training ended before the server could be lost"
            with paused(train.pid):  # so that points are still to be sent once it is gone
                crash(process)
        wait_for(train_manifest_or_end(workdir, pipeline), TIMEOUT_S, 0.2)
        # The workflow held while the server starts (seconds): its evaluate and track jobs
        # would otherwise find it still down on a fast machine, and the track job fails then.
        with paused(pipeline.pid):
            _, process = start_server(root / "server", port)
        output = finish(pipeline)
        assert pipeline.returncode == 0, output[-3000:]
        yield request.param, workdir, MlflowClient(tracking_uri=uri)
    finally:
        if process is not None:
            stop(process)


def test_after_an_outage_every_step_arrives_exactly_once(outage):
    what, workdir, client = outage
    runs = runs_by_stage(client)
    assert all(len(group) == 1 for group in runs.values()), what
    (train,) = runs["train"]
    assert train.info.status == "FINISHED"
    for key in ("train.loss", "train.grad_norm"):
        assert steps_of(client, train.info.run_id, key) == list(range(1, STEPS + 1)), (what, key)
    log = (workdir / "results" / EXPERIMENT / "train" / "train.log").read_text()
    assert "live tracking to" in log and "paused" in log  # said once, and training went on
    assert "Traceback" not in log
