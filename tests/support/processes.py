"""Waiting for and killing processes the way a crash would."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

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


@contextlib.contextmanager
def paused(pid: int) -> Iterator[None]:
    """A process and every process below it stopped (SIGSTOP) for the block, then continued:
    what a test looks at while the process works cannot end under it, however fast the
    machine."""
    try:
        parent = psutil.Process(pid)
        tree = [parent, *parent.children(recursive=True)]
    except psutil.NoSuchProcess:  # it has ended already: nothing to hold
        tree = []
    for proc in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.suspend()
    try:
        yield
    finally:
        for proc in tree:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.resume()
