"""Which failed train jobs a retry can help, decided by why the last attempt failed.

Snakemake retries a failed job (`retries:` in the SLURM profile) whatever the cause. A job
stopped from outside (SIGTERM: preemption, a time limit; Ctrl-C) or killed without a word
(SIGKILL, a lost node) resumes from its checkpoint on the retry. One that failed with an error
the trainer reports (a non-finite loss, an out-of-memory beyond train.memory_retries, bad data
or settings) would fail the same way again: its retry stops at once and says why. A new
snakemake invocation (attempt 1) always runs, since the user may have fixed the cause. An
out-of-memory step needs no retry of the job: the trainer takes it again with a smaller
micro-batch (snaketune.train.trainer.step_within_memory).

The rule hands the attempt to the job as SNAKETUNE_ATTEMPT (JobContext.attempt); why an attempt
failed is <state_dir>/failure.json, beside the checkpoints.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from snaketune.errors import SnaketuneError, TrainingError
from snaketune.fileio import read_json, write_json

RECORD = "failure.json"
STOPPED = "stopped"
"""Stopped from outside (SIGTERM, Ctrl-C): a retry resumes from the checkpoint."""
ERROR = "error"
"""An error a retry would repeat: not retried."""
UNKNOWN = "unknown"
"""Anything else (a device or filesystem fault may pass): retried."""


def cause_of(err: BaseException) -> str:
    if isinstance(err, KeyboardInterrupt | SystemExit):
        return STOPPED
    if isinstance(err, SnaketuneError | ValueError | TypeError | KeyError):
        return ERROR
    return UNKNOWN


@contextlib.contextmanager
def attempt(state_dir: Path, number: int) -> Iterator[dict[str, Any]]:
    """Attempt `number` of the job (JobContext.attempt): refused when it is a retry of an
    error; why it failed, if it does, recorded for the next. Yields what the manifest says
    about it."""
    path = Path(state_dir) / RECORD
    previous = read_json(path) if path.exists() else None
    if number > 1 and previous and previous["cause"] == ERROR:
        raise TrainingError(
            f"not retried (attempt {number}): attempt {previous['attempt']} failed with an "
            f"error a retry would repeat: {previous['message']} Fix the cause and run "
            "snakemake again."
        )
    try:
        yield {"attempt": number, "previous_failure": previous}
    except BaseException as err:
        message = str(err) or type(err).__name__
        write_json(path, {"attempt": number, "cause": cause_of(err), "message": message})
        raise
    path.unlink(missing_ok=True)
