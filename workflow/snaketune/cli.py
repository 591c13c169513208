"""`snaketune <command>`: the command each rule runs, made from the job definitions in
snaketune.stages: one required option per path, `--settings` with the job's settings as JSON
(snaketune.settings.to_json), then the library function the stage names.

How a failed job ends (exit status 1 in every case):
- a problem the user can fix (a SnaketuneError, or settings the job refuses): its message on one
  line, `snaketune <command>: error: <message>`, without a traceback;
- a fault of the operating system (an OSError that is not a SnaketuneError: full disk,
  permission denied, a missing file, a dropped connection) or memory running out: the same
  line, saying what the system reported and on which path;
- anything else is a bug in snaketune: the traceback, then a line that says so.
A SIGTERM ends the job too, exit status 1, with a line that says to rerun (stopped_by_sigterm).
snaketune.joblog finds these lines in a job's log."""

from __future__ import annotations

import argparse
import contextlib
import errno
import io
import json
import logging
import os
import signal
import sys
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# Bitwise-reproducible BLAS on the CPU: MKL's results otherwise depend on the memory alignment
# of the arrays, which differs from one process to the next (a SLURM job and a local run of the
# same training were seen 1e-6 apart). Strict conditional numerical reproducibility, and the
# fixed thread count that MKL's reproducibility conditions ask for (with dynamic threads it may
# use fewer threads on a busy machine, and sum in another order), set before anything loads
# MKL; a value the user set wins.
REPRODUCIBLE_BLAS = {"MKL_CBWR": "AUTO,STRICT", "MKL_DYNAMIC": "FALSE", "OMP_DYNAMIC": "FALSE"}
for _name, _value in REPRODUCIBLE_BLAS.items():
    os.environ.setdefault(_name, _value)

from snaketune.context import JobContext  # noqa: E402 (after the environment is set)
from snaketune.errors import (  # noqa: E402
    SnaketuneError,
    UsageError,
    is_out_of_memory,
)
from snaketune.joblog import bug_line, error_line  # noqa: E402
from snaketune.paths import Paths, is_list, path_fields  # noqa: E402
from snaketune.settings import from_dict  # noqa: E402
from snaketune.stages import BY_COMMAND, STAGES, Stage, flag  # noqa: E402

USER_ERRORS = (SnaketuneError,)
"""Problems the user can fix, each with a message meant for them (settings a job refuses,
snaketune.settings.SettingsError, among them)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="snaketune", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for stage in STAGES:
        job = sub.add_parser(stage.command, help=f"rule {stage.rule}")
        for f in path_fields(stage.paths):
            nargs = "+" if is_list(f) else None
            job.add_argument(flag(f), type=Path, nargs=nargs, required=True, help=f.metadata["doc"])
        job.add_argument("--settings", required=True, help="the job's settings as JSON")
    return parser


def parse(argv: list[str] | None) -> tuple[Stage, Paths, str]:
    """The stage a command line names, its paths, and its settings' JSON."""
    args = build_parser().parse_args(argv)
    stage = BY_COMMAND[args.command]
    paths = stage.paths(**{f.name: getattr(args, f.name) for f in path_fields(stage.paths)})
    return stage, paths, args.settings


def read_settings(stage: Stage, text: str) -> Any:
    """The job's settings from `--settings`: text that is not a JSON object is refused as the
    command line's fault; a value the settings refuse raises their SettingsError."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise UsageError(
            f"--settings is not JSON ({err}); give the job's settings as one JSON object, as "
            "the workflow's rule does"
        ) from err
    if not isinstance(data, dict):
        raise UsageError(
            f"--settings is a JSON {type(data).__name__}; expected an object of the "
            f"{stage.command} job's settings ({stage.settings.__name__})"
        )
    return from_dict(stage.settings, data)


def system_error(err: BaseException) -> str | None:
    """One line for a fault of the machine, or None for an error that is not one. Memory that
    ran out; an OSError: what the operating system reported, on which path, and the error's
    type and errno name (ENOSPC, EACCES, ...). io.UnsupportedOperation (reading a file opened
    for writing, say) is an OSError that only a bug raises."""
    kind = type(err).__name__
    if is_out_of_memory(err):
        said = str(err).strip().splitlines()
        return (
            f"out of memory ({kind}{': ' + said[0] if said else ''}); give the job more memory, "
            "or make its batches or data smaller, and rerun"
        )
    if not isinstance(err, OSError) or isinstance(err, io.UnsupportedOperation):
        return None
    paths = [
        os.fsdecode(p) if isinstance(p, str | bytes) else str(p)
        for p in (err.filename, err.filename2)
        if p is not None
    ]
    where = f" on {' -> '.join(paths)}" if paths else ""
    code = errno.errorcode.get(err.errno) if isinstance(err.errno, int) else None
    what = (err.strerror if err.strerror else str(err)) or "no description"
    return f"operating-system error{where}: {what} ({kind}{', ' + code if code else ''})"


@contextlib.contextmanager
def stopped_by_sigterm(command: str) -> Iterator[None]:
    """A SIGTERM (a cluster's time limit, a preemption, `scancel`) ends the job as an exception,
    so that what it holds is let go on the way out: its MLflow run ends KILLED (not left
    RUNNING until the track job), its manifest is not written, a training attempt records that
    it was stopped (a retry resumes). Python's default would end the process on the spot.
    The training loop installs its own handler for its duration (a checkpoint, then this same
    exit: snaketune.train.trainer.StopRequested); the previous handler is back after."""

    def stop(signum, frame):
        raise SystemExit(f"{command}: SIGTERM received before the job finished; rerun to resume")

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    stage, paths, settings = parse(argv)
    try:
        context = JobContext.from_environment(os.environ)  # the one place that reads it
        with stopped_by_sigterm(stage.command):
            stage.entry()(paths, read_settings(stage, settings), context)
    except USER_ERRORS as err:
        # Known failure modes carry a message meant for the user; a traceback would bury it.
        print(error_line(stage.command, str(err)), file=sys.stderr)
        return 1
    except Exception as err:  # noqa: BLE001 - every other failure is reported, then ends the job
        fault = system_error(err)
        if fault is not None:
            print(error_line(stage.command, fault), file=sys.stderr)
            return 1
        # Not a failure mode anyone foresaw: a ValueError here is no longer taken for bad input.
        traceback.print_exc()
        print(bug_line(stage.command), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
