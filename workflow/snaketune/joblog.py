"""A failed job's message on the console, and in the summary of a failed run.

Every rule's command writes its output to the job's log (`> {log} 2>&1`), so a failure would
show on the console only as "returned non-zero exit status 1". The command therefore ends with
`|| PYTHON -m snaketune.joblog RULE LOG $?` (snaketune.stages.shell_command), which runs only
when the job failed:

- on the console (the job's stderr, which Snakemake shows where it reports the failure): the
  job's own message, that is the CLI's `snaketune <command>: error: ...` lines for a user error
  or a fault of the machine; for a bug, the end of its traceback (the exception and the frames
  that raised it) and the CLI's `snaketune <command>: this is a bug in snaketune ...` line; else
  the log's last lines; a word on a job killed by a signal; and the log's path;
- a record under FAILURES in the working directory, which the workflow's `onerror` handler
  lists at the end of the run (`summary`): each failed job with its message and log.

It exits with the job's status, so Snakemake sees the failure as it was. It imports nothing
heavy: it runs once per failed job, on whatever machine ran the job.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

FAILURES = Path(".snakemake") / "snaketune" / "failed"
"""One JSON record per failed job, relative to the workflow's working directory (every job and
the onerror handler run there, on a cluster node too)."""
TAIL_LINES = 12
"""How many lines are shown of a log that holds no user-error message: the end of a bug's
traceback, or the log's last lines (a killed job)."""
ERROR_MARK = ": error: "
BUG_MARK = ": this is a bug in snaketune"
TRACEBACK_START = "Traceback (most recent call last):"


def error_line(command: str, message: str) -> str:
    """How snaketune.cli ends a job that failed for a reason the user can fix."""
    return f"snaketune {command}{ERROR_MARK}{message}"


def bug_line(command: str) -> str:
    """How snaketune.cli ends a job that failed by a bug, after the traceback."""
    return (
        f"snaketune {command}{BUG_MARK}, not in your data or settings; please report it with "
        "the traceback above"
    )


@dataclass(frozen=True)
class Failure:
    rule: str
    log: str
    status: int
    message: str


def job_message(log_text: str, status: int) -> str:
    """What the user needs from a failed job's log: its user-error message when the CLI wrote
    one (that line to the end: a message may span lines); for a bug, the end of its traceback
    (the exception and the frames that raised it) and the CLI's line that calls it a bug,
    without what was logged before the traceback; else the log's last lines."""
    lines = log_text.rstrip().splitlines()
    ours = [i for i, line in enumerate(lines) if line.startswith("snaketune")]
    errors = [i for i in ours if ERROR_MARK in lines[i]]
    bugs = [i for i in ours if BUG_MARK in lines[i]]
    if errors and not (bugs and bugs[-1] > errors[-1]):
        shown = lines[errors[-1] :]
    elif bugs:
        end = bugs[-1] + 1
        starts = [i for i in range(end) if lines[i].startswith(TRACEBACK_START)]
        shown = lines[max(starts[-1] if starts else 0, end - TAIL_LINES) : end]
    else:
        shown = lines[-TAIL_LINES:]
    message = "\n".join(shown) if shown else "(the log is empty)"
    if status > 128:
        message += f"\n{killed_by(status - 128)}"
    return message


def killed_by(signum: int) -> str:
    try:
        name = signal.Signals(signum).name
    except ValueError:
        name = f"signal {signum}"
    return (
        f"The job was killed by {name}: out of memory, a time limit or a cancelled job are the "
        "usual causes. Rerun snakemake to resume it."
    )


def read_log(log: Path) -> str:
    try:
        return log.read_text(errors="replace")
    except OSError as err:
        return f"(the log {log} cannot be read: {err})"


def record_path(log: str) -> Path:
    return FAILURES / f"{hashlib.sha256(log.encode()).hexdigest()[:16]}.json"


def report(rule: str, log: str, status: int) -> Failure:
    """Print the failure on stderr and record it for the run's summary."""
    failure = Failure(rule, log, status, job_message(read_log(Path(log)), status))
    print(f"\nsnaketune: {rule} failed (exit status {status}):", file=sys.stderr)
    print(indent(failure.message), file=sys.stderr)
    print(f"  log: {log}\n", file=sys.stderr)
    try:
        FAILURES.mkdir(parents=True, exist_ok=True)
        temporary = record_path(log).with_suffix(f".{os.getpid()}.tmp")
        temporary.write_text(json.dumps(asdict(failure)))
        temporary.replace(record_path(log))  # whole or not at all: a killed job leaves no half
    except OSError:
        pass  # the console already has the message; the summary just lacks this job
    return failure


def indent(text: str) -> str:
    return "\n".join(f"  {line}" for line in text.splitlines())


def clear(workdir: Path = Path()) -> None:
    """Before a run's jobs: no failure of an earlier run is listed at the end of this one."""
    for path in (workdir / FAILURES).glob("*.json"):
        path.unlink(missing_ok=True)


def failures(workdir: Path = Path()) -> list[Failure]:
    """This run's failed jobs, but not those whose job was retried after it and got further
    (the log is newer than the record: a later attempt rewrote it)."""
    found = []
    for path in sorted((workdir / FAILURES).glob("*.json")):
        try:
            failure = Failure(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            continue  # not one of ours, or unreadable: the console had the message already
        log = workdir / failure.log
        if log.exists() and log.stat().st_mtime > path.stat().st_mtime + 1:
            continue
        found.append(failure)
    return found


def summary(workdir: Path = Path()) -> str:
    """The end of a failed run: every job that failed, its message and its log."""
    found = failures(workdir)
    if not found:
        return ""
    lines = [f"\nsnaketune: {len(found)} job(s) failed:"]
    for failure in found:
        lines += [f"- {failure.rule} (log: {failure.log})", indent(failure.message)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 3 or not args[2].isdigit():
        print("usage: python -m snaketune.joblog RULE LOG STATUS", file=sys.stderr)
        return 2
    rule, log, status = args[0], args[1], int(args[2])
    report(rule, log, status)
    return status or 1


if __name__ == "__main__":
    sys.exit(main())
