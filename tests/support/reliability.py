"""What the reliability scenarios share: the train command a rule runs, a tiny pipeline's config
and results to run snakemake against, and an HTTP relay in front of a real MLflow server that can
be made slow or go down."""

from __future__ import annotations

import copy
import http.client
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import yaml

from snaketune.context import ATTEMPT_VARIABLE
from snaketune.train.settings import ModelSettings, TrainJob, TrainSettings
from tests.support.repo import DEFAULT_CONFIG
from tests.support.stage_data import train_cli_args
from tests.support.workflow import snakemake_command

TINY_MODEL = ModelSettings(n_layer=1, n_embd=32, n_head=2, dropout=0.1)
EXPERIMENT = "demo-lm"
PIPELINE_TRAIN = {  # the workflow-level scenarios' train settings, as config.yaml gives them
    "max_steps": 40,
    "batch_size": 8,
    "warmup_steps": 2,
    "eval_every": 20,
    "eval_rows": 32,
    "checkpoint_every": 10,
}


# --- the train command ---------------------------------------------------------------------------


def train_command(data: dict, out: Path, settings: TrainSettings, *prelude: str) -> list[str]:
    """The train rule's command; `prelude` lines run first in the same Python process."""
    job = TrainJob(task="causal_lm", model=TINY_MODEL, train=settings)
    if not prelude:
        launcher = [str(Path(sys.executable).with_name("snaketune"))]
    else:
        code = "\n".join(
            [*prelude, "from snaketune.cli import main", "sys.exit(main(sys.argv[1:]))"]
        )
        launcher = [sys.executable, "-c", "import sys\n" + code]
    return [*launcher, *train_cli_args(data, out, job)]


def run_train(
    data: dict, out: Path, settings: TrainSettings, *prelude: str, attempt: int = 1
) -> subprocess.CompletedProcess:
    """The train command (see train_command) on one thread, its output captured as text; as
    the rule's `attempt` (2: Snakemake's first retry of the job)."""
    return subprocess.run(
        train_command(data, out, settings, *prelude),
        env={**single_thread_env(), ATTEMPT_VARIABLE: str(attempt)},
        capture_output=True,
        text=True,
        timeout=300,
    )


def single_thread_env() -> dict[str, str]:
    # One thread on every run, so the floating-point reduction order is identical.
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def rerun_resumes(data: dict, out: Path, settings: TrainSettings, step: int) -> None:
    """Run the train command again on `out`, as Snakemake's retry of the job: it must finish,
    resuming from `step`."""
    rerun = run_train(data, out, settings, attempt=2)
    assert rerun.returncode == 0, rerun.stderr
    assert f"resumed from checkpoint at step {step}" in rerun.stderr


# --- a finished results tree ---------------------------------------------------------------------


def pipeline_config(experiments: list[str]) -> dict:
    """The default config's causal LM experiment, made tiny, under each of these names."""
    config = copy.deepcopy(DEFAULT_CONFIG)
    config["results_dir"] = "results"
    config["mlflow"].update(experiment_name="snaketune-reliability", register_models=False)
    template = config["experiments"][0]
    template.update(
        clean={"strip_html": True},
        tokenizer={"vocab_size": 400},
        tokenize={"block_size": 32},
        model={"n_layer": 1, "n_embd": 32, "n_head": 2, "dropout": 0.1},
        train=PIPELINE_TRAIN,
        evaluate={"prompts": template["evaluate"]["prompts"][:1], "max_new_tokens": 4},
    )
    config["experiments"] = [{**copy.deepcopy(template), "name": name} for name in experiments]
    return config


@dataclass(frozen=True)
class Interrupted:
    """A tiny pipeline killed mid-write (snakemake and its jobs, SIGKILL, as a node crash does)
    while train_model was saving, then recovered; what each step left behind."""

    workdir: Path
    killed: dict[str, bool]
    """Which outputs existed right after the kill."""
    dry_run: subprocess.CompletedProcess
    """A plain `snakemake --dry-run` after the kill."""
    recovery: subprocess.CompletedProcess
    """`snakemake --rerun-incomplete`, after `snakemake --unlock`."""

    @property
    def results(self) -> Path:
        return self.workdir / "results"


def run_snakemake(workdir: Path, *args: str, **kwargs) -> subprocess.CompletedProcess:
    command = snakemake_command(workdir, *args)
    return subprocess.run(command, capture_output=True, text=True, timeout=600, **kwargs)


def workdir_with(results: Path, workdir: Path, experiments: list[str]) -> Path:
    """A snakemake working directory holding a copy of `results` (mtimes kept) and a config."""
    shutil.copytree(results, workdir / "results", symlinks=True)
    (workdir / "config.yaml").write_text(yaml.safe_dump(pipeline_config(experiments)))
    return workdir


# --- a relay in front of the MLflow server -------------------------------------------------------

_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "host"}


class Relay(ThreadingHTTPServer):
    """An HTTP relay on 127.0.0.1 in front of a real server: the first `delayed` requests (all,
    if None) are held back `delay_s`, and after `down_after` requests it answers 502, as a proxy
    does for a dead server."""

    daemon_threads = True

    def __init__(self, upstream: str) -> None:
        super().__init__(("127.0.0.1", 0), RelayHandler)
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname, parts.port)
        self.delay_s = 0.0
        self.delayed: int | None = None
        self.down_after: int | None = None
        self.seen: list[tuple[str, str, str | None]] = []
        """(method, path, Authorization header) of every request, relayed or refused."""
        self.lock = threading.Lock()

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class RelayHandler(BaseHTTPRequestHandler):
    server: Relay

    def _relay(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        relay = self.server
        with relay.lock:
            relay.seen.append((self.command, self.path, self.headers.get("Authorization")))
            count = len(relay.seen)
        if relay.down_after is not None and count > relay.down_after:
            self.send_response(502)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if relay.delayed is None or count <= relay.delayed:
            time.sleep(relay.delay_s)
        upstream = http.client.HTTPConnection(*relay.upstream, timeout=60)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
        upstream.request(self.command, self.path, body=body, headers=headers)
        response = upstream.getresponse()
        data = response.read()
        upstream.close()
        self.send_response(response.status, response.reason)
        for key, value in response.getheaders():
            if key.lower() not in _HOP_BY_HOP:
                self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _relay

    def log_message(self, format: str, *args) -> None:
        pass
