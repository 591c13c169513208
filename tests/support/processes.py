"""Waiting for and killing processes the way a crash would."""

from __future__ import annotations

import contextlib
import time

import psutil


def wait_for(condition, timeout_s: float, poll_s: float = 0.01) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"waited {timeout_s} s in vain"
        time.sleep(poll_s)


def kill_tree(pid: int) -> None:
    """SIGKILL a process and every process below it, the parent first (so it cannot tidy up)."""
    parent = psutil.Process(pid)
    children = parent.children(recursive=True)
    parent.kill()
    for child in children:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()
