"""Real servers on 127.0.0.1 for the tests: `mlflow server` with its own store, started and
stopped (also mid-test, for outages), the health wait that `mlflow ui` and `mlflow models serve`
share, and a thread that serves a test's own HTTP server. The session's `mlflow_server` fixture
lives in tests/conftest.py."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import socketserver
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

MLFLOW = Path(sys.executable).parent / "mlflow"
STARTUP_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Server:
    uri: str
    artifacts: Path
    """Where the server stores the artifacts clients upload through it."""


def free_port() -> int:
    """A loopback port nothing listens on (the OS picked it and it is closed again)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_healthy(
    uri: str, process: subprocess.Popen, log_path: Path, timeout_s: float = STARTUP_TIMEOUT_S
) -> None:
    """Until GET /health answers 200 (`mlflow server`, `mlflow ui`, `mlflow models serve`)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"mlflow server exited with {process.returncode}:\n{log_path.read_text()}")
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass  # not listening yet
        time.sleep(0.25)
    pytest.fail(f"mlflow server not healthy after {timeout_s} s:\n{log_path.read_text()}")


def stop(process: subprocess.Popen) -> None:
    """SIGTERM the server's process group (it runs uvicorn and a job runner as children), then
    SIGKILL whatever is left after 15 s."""
    for sig, wait_s in ((signal.SIGTERM, 15), (signal.SIGKILL, 15)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def crash(process: subprocess.Popen) -> None:
    """SIGKILL the server's process group: gone at once, as a crashed host is."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=15)


def start_server(root: Path, port: int) -> tuple[Server, subprocess.Popen]:
    """`mlflow server` on 127.0.0.1:port with its store and artifacts under root; starting it
    again on the same root and port brings back the same server after an outage."""
    root.mkdir(parents=True, exist_ok=True)
    uri = f"http://127.0.0.1:{port}"
    artifacts = root / "artifacts"
    log_path = root / "server.log"
    command = [
        str(MLFLOW),
        "server",
        "--backend-store-uri",
        f"sqlite:///{root}/mlflow.db",
        # New experiments get proxied artifacts: clients upload them over HTTP to the server,
        # which stores them under --artifacts-destination.
        "--default-artifact-root",
        "mlflow-artifacts:/",
        "--artifacts-destination",
        str(artifacts),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    # Lets a test create an experiment whose artifact location is an http URL (on this loopback
    # server); the server refuses such locations by default.
    env["MLFLOW_ALLOWED_HOST_ADDRESSED_ARTIFACT_SCHEMES"] = "http"
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, cwd=root, env=env, start_new_session=True
        )
    try:
        wait_until_healthy(uri, process, log_path)
    except BaseException:
        stop(process)
        raise
    return Server(uri, artifacts), process


@contextlib.contextmanager
def serving(server: socketserver.BaseServer) -> Iterator:
    """Serve on a thread while the block runs (test servers bind 127.0.0.1 only)."""
    thread = threading.Thread(target=server.serve_forever, args=(0.01,), daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
