"""The README's server commands, run exactly as it prints them (its fenced bash blocks, by the
command they hold), in a finished workdir with the repo's .venv: `mlflow ui`, `mlflow models
serve` with the curl that asks it, and the basic-auth team server. They bind the ports the
README names (5000, 5001) on 127.0.0.1."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.support.repo import REPO
from tests.support.servers import free_port, stop

pytestmark = pytest.mark.slow

README = REPO / "README.md"
START_S = 120


def bash_blocks() -> list[str]:
    return re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S)


def block_with(needle: str) -> str:
    (block,) = [b for b in bash_blocks() if needle in b]
    return block


def commands(block: str) -> list[str]:
    """The block's commands: its lines, a trailing backslash joining a line to the next."""
    return [c.strip() for c in re.split(r"(?<!\\)\n", block.strip()) if c.strip()]


REPOSITORY_LAYOUT = ("Snakefile", "workflow", "presets", "profiles", ".venv")
"""What a folder needs to run the README's commands as a clone does: links to the repo's."""


def lay_out_as_repository(root: Path) -> Path:
    for name in REPOSITORY_LAYOUT:
        if not (root / name).exists():
            (root / name).symlink_to(REPO / name)
    return root


@pytest.fixture(scope="module")
def workdir(finished_run) -> Path:
    """The finished run of the default config (made tiny), seen from the README's place: the
    repo's Snakefile, workflow and .venv beside its config.yaml and results."""
    results, _ = finished_run
    return lay_out_as_repository(results.parent)


def port_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def start(command: str, cwd: Path, port: int, log: Path) -> subprocess.Popen:
    if not port_free(port):
        pytest.fail(f"port {port}, which the README's command binds, is taken on this machine")
    with log.open("wb") as out:
        return subprocess.Popen(
            ["bash", "-c", command],
            cwd=cwd,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, str]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def wait_until_up(url: str, process: subprocess.Popen, log: Path, headers=None) -> None:
    deadline = time.monotonic() + START_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the README's command exited {process.returncode}:\n{log.read_text()}")
        try:
            if get(url, headers)[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.5)
    pytest.fail(f"{url} did not answer within {START_S} s:\n{log.read_text()[-3000:]}")


def test_the_mlflow_ui_command_opens_the_printed_runs_table(workdir, finished_run):
    _, run = finished_run
    (command,) = commands(block_with("mlflow ui"))
    printed = [line for line in (run.stdout + run.stderr).splitlines() if "Browse the runs" in line]
    url = printed[0].split("Browse the runs: ", 1)[1]
    assert url.startswith("http://127.0.0.1:5000/#/experiments/")
    assert url.endswith("/runs?workflowType=machine_learning&viewStateShareKey=snaketune-headline")
    log = workdir / "readme-ui.log"
    process = start(command, workdir, 5000, log)
    try:
        wait_until_up("http://127.0.0.1:5000/health", process, log)
        experiment_id = url.split("/experiments/")[1].split("/")[0]
        status, body = get(
            "http://127.0.0.1:5000/api/2.0/mlflow/experiments/get?experiment_id=" + experiment_id
        )
        assert status == 200 and json.loads(body)["experiment"]["experiment_id"] == experiment_id
    finally:
        stop(process)


def test_the_serve_command_answers_the_printed_curl(workdir):
    serve, ask = commands(block_with("mlflow models serve"))
    if shutil.which("curl") is None:
        if os.environ.get("CI"):
            pytest.fail("CI must install curl (tests/browser.sh does)")
        pytest.skip("the README asks the served model with curl, which is not installed here")
    log = workdir / "readme-serve.log"
    process = start(serve, workdir, 5001, log)
    try:
        wait_until_up("http://127.0.0.1:5001/health", process, log)
        answer = subprocess.run(
            ["bash", "-c", ask], cwd=workdir, capture_output=True, text=True, timeout=120
        )
        assert answer.returncode == 0, answer.stderr
        (served,) = json.loads(answer.stdout)["predictions"]
        (question,) = json.loads(re.search(r"-d '(.*)'", ask)[1])["inputs"]
        assert served.strip() == evaluation_answer(workdir, question)
    finally:
        stop(process)


def evaluation_answer(workdir: Path, question: str) -> str:
    """The answer the evaluate stage would give: the question in the experiment's template,
    generated with its decoding settings (snaketune.evaluate.generation, as evaluate_lm runs it)."""
    from transformers import AutoTokenizer

    from snaketune.config import validated
    from snaketune.data.settings import clean_job
    from snaketune.evaluate.evaluation import CPU
    from snaketune.evaluate.generation import generate
    from snaketune.evaluate.settings import eval_job
    from snaketune.settings import ConfigView
    from snaketune.tokenize.settings import tokenize_job
    from snaketune.train.models import load_trained

    view = ConfigView(validated(yaml.safe_load((workdir / "config.yaml").read_text())), REPO)
    template = clean_job(view, "demo-lm").read.instruction
    assert template is not None and template.columns[0] == "question"
    model_dir = workdir / "results" / "demo-lm" / "train" / "model"
    model, tokenizer = (
        load_trained(model_dir, "causal_lm"),
        AutoTokenizer.from_pretrained(model_dir),
    )
    context = tokenize_job(view, "demo-lm").tokenize.block_size
    settings = eval_job(view, "demo-lm").evaluate
    prompt = template.prompt.format(question=question)
    return generate(model.eval(), tokenizer, prompt, settings, context, CPU)[0].strip()


def test_the_team_server_command_starts_with_authentication(workdir):
    block = block_with("--app-name basic-auth")
    password = re.search(r"MLFLOW_AUTH_ADMIN_PASSWORD='([^']+)'", block)[1]
    log = workdir / "readme-team-server.log"
    process = start(block, workdir, 5000, log)
    allowed = {"Host": "mlflow.example.org"}  # as the TLS proxy in front of it forwards
    token = base64.b64encode(f"admin:{password}".encode()).decode()
    admin = {**allowed, "Authorization": f"Basic {token}"}
    try:
        wait_until_up("http://127.0.0.1:5000/health", process, log, allowed)
        search = "http://127.0.0.1:5000/api/2.0/mlflow/experiments/search?max_results=1"
        assert get(search, admin)[0] == 200
        assert get(search, allowed)[0] == 401  # no credentials, no runs
    finally:
        stop(process)


def test_the_gpus_per_job_command_plans_one_gpu_per_train_job():
    """In the repository, as on a machine with four GPUs (CUDA_VISIBLE_DEVICES lists them;
    none needs to exist for the plan), with --dry-run added to the README's command."""
    (command,) = commands(block_with("--resources gpu=4"))
    machine = {**os.environ, "CUDA_VISIBLE_DEVICES": "0,1,2,3"}
    planned = subprocess.run(
        f"{command} --dry-run --forceall --printshellcmds",
        shell=True,
        cwd=REPO,
        env=machine,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert planned.returncode == 0, planned.stderr[-3000:]
    trains = [line for line in planned.stdout.splitlines() if " train --shards " in line]
    assert len(trains) == 2 and all(" -m snaketune.gpus 1 -- " in t for t in trains)

    too_many = subprocess.run(
        f"{command} --dry-run",
        shell=True,
        cwd=REPO,
        env={**machine, "CUDA_VISIBLE_DEVICES": "0,1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert too_many.returncode != 0
    assert "--resources gpu=4: this machine has 2 GPU(s)" in too_many.stdout + too_many.stderr


# The README's `snakemake` commands, as printed, from a new shell (the tests' PATH lacks the venv:
# tests/conftest.py), in a checkout of the repository where they run jobs for real.
def inline_command(start: str) -> str:
    """The README's command (fenced or inline code) that starts with `start`."""
    found = {c for c in re.findall(r"`([^`\n]+)`", README.read_text()) if c.startswith(start)}
    found |= {c for b in bash_blocks() for c in commands(b) if c.startswith(start)}
    assert len(found) == 1, f"the README has {sorted(found)} for {start!r}"
    return found.pop().split("    #")[0].strip()


@pytest.fixture(scope="module")
def checkout(tmp_path_factory) -> Path:
    """A folder laid out as the repository (links to its files, its .venv, a copy of
    config.yaml): where a user runs the README's commands."""
    root = lay_out_as_repository(tmp_path_factory.mktemp("checkout"))
    shutil.copy(REPO / "config.yaml", root / "config.yaml")
    return root


def in_shell(
    command: str, cwd: Path, timeout: int = 600, **env: str
) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", "-c", command],
        cwd=cwd,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def my_yaml() -> dict:
    """A config of one's own, as the README says: only what differs from config.yaml (a sweep
    of a tiny intent classifier)."""
    from tests.support.workflow import TINY_MODEL

    return {
        "mlflow": {"experiment_name": "my-experiments"},
        "experiments": [
            {
                "name": "intent",
                "dataset": "support-demo",
                "task": "sequence_classification",
                "text_template": None,
                "tokenizer": {"vocab_size": 400},
                "model": TINY_MODEL,
                "train": {"max_steps": 8, "batch_size": 16, "eval_every": 4, "warmup_steps": 2},
                "sweep": {"grid": {"train.lr": [0.001, 0.003]}},
            }
        ],
    }


@pytest.fixture(scope="module")
def my_run(checkout) -> subprocess.CompletedProcess:
    (checkout / "my.yaml").write_text(yaml.safe_dump(my_yaml()))
    (_, command) = commands(block_with("--configfile my.yaml"))
    run = in_shell(command, checkout)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return run


def test_my_yaml_as_printed_runs_every_job_of_a_sweep(my_run, checkout):
    assert "Nothing to be done" not in my_run.stdout + my_run.stderr
    table = checkout / "results" / "sweeps" / "intent" / "table.csv"
    assert len(table.read_text().splitlines()) == 3  # a header and two points


def test_the_report_command_as_printed_builds_without_warnings(workdir):
    """On a finished run of the default config, as after `make demo`."""
    report = in_shell(inline_command(".venv/bin/snakemake --report"), workdir)
    assert report.returncode == 0, report.stderr[-3000:]
    assert (workdir / "results" / "report.html").stat().st_size > 0
    assert "WARNING" not in report.stdout + report.stderr


def test_the_ui_command_the_run_prints_works_as_printed(my_run, checkout):
    printed = (my_run.stdout + my_run.stderr).split("Start the MLflow UI: ", 1)[1].splitlines()[0]
    assert printed.split()[0].endswith("/.venv/bin/mlflow")  # by path: PATH lacks the venv
    port = free_port()
    log = checkout / "printed-ui.log"
    process = start(printed.replace("--port 5000", f"--port {port}"), checkout, port, log)
    try:
        wait_until_up(f"http://127.0.0.1:{port}/health", process, log)
        status, body = get(
            f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/get-by-name"
            "?experiment_name=my-experiments"
        )
        assert status == 200, body
    finally:
        stop(process)


def test_a_preset_without_network_fails_with_the_downloads_message_on_the_console(checkout):
    """As printed, where the dataset's host cannot be reached (a proxy on a closed loopback
    port stands for no network): the job's own message and its log on the console, and again
    in the summary at the end; no traceback."""
    command = inline_command(".venv/bin/snakemake --cores 2 --config preset=")
    closed = f"http://127.0.0.1:{free_port()}"
    run = in_shell(command, checkout, timeout=300, https_proxy=closed, HTTPS_PROXY=closed)
    console = run.stdout + run.stderr
    assert run.returncode != 0
    message = "snaketune download: error: could not download https://"
    assert console.count(message) == 2, console[-4000:]  # where it failed, and in the summary
    assert "Check the URL and your network" in console
    log = "results/datasets/sms-spam/download/download.log"
    assert f"log: {log}" in console and "snaketune: 1 job(s) failed:" in console
    assert "Traceback" not in console
