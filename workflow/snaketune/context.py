"""What the workflow tells a job besides its paths and settings: read from the environment once,
by the CLI, and passed to the stage's function. No other module of the library reads these
variables; a job run in-process (tests, notebooks, snaketune.local) gets the defaults: no
live tracking, a first attempt, relative dataset paths from this package's repository.

The rules set them (common.smk, snaketune.stages.shell_command) rather than passing flags, so
that the jobs' command lines, and with them Snakemake's rerun decisions, do not depend on them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from snaketune.errors import ConfigError

REPOSITORY_VARIABLE = "SNAKETUNE_REPOSITORY"
"""The workflow's repository, as the Snakefile found it: relative dataset paths start there."""
TRACKING_VARIABLE = "SNAKETUNE_TRACKING"
"""Set by the rules of the stages that track live: the experiment's tracking folder."""
ATTEMPT_VARIABLE = "SNAKETUNE_ATTEMPT"
"""The train rule's attempt, Snakemake's `attempt` (2 and on: a retry)."""
LIVE_AFTER_VARIABLE = "SNAKETUNE_LIVE_AFTER_S"
"""Seconds a stage works before it connects to the tracking server (the user's, to watch short
stages: 0 connects at once)."""
LIVE_AFTER_S = 3.0
"""How long a stage works before its sender connects. A stage done sooner never loads MLflow (a
second or two of CPU per job, a thousand jobs in a sweep); the track job records its run from
the manifest, with the same times. Runs worth watching take longer than this."""
PACKAGE_REPOSITORY = Path(__file__).resolve().parents[2]
"""The repository this package is in (an editable install's checkout)."""


@dataclass(frozen=True)
class JobContext:
    repository: Path = PACKAGE_REPOSITORY
    tracking: Path | None = None
    """The experiment's tracking folder: the stage's MLflow run is live (snaketune.track.live);
    None: the track job records it afterwards."""
    attempt: int = 1
    live_after_s: float = LIVE_AFTER_S

    @classmethod
    def from_environment(cls, environ: Mapping[str, str]) -> JobContext:
        problems = environment_problems(environ)
        if problems:
            raise ConfigError("; ".join(problems))
        tracking = environ.get(TRACKING_VARIABLE)
        live_after = environ.get(LIVE_AFTER_VARIABLE)
        return cls(
            repository=Path(environ.get(REPOSITORY_VARIABLE) or PACKAGE_REPOSITORY),
            tracking=Path(tracking) if tracking else None,
            attempt=int(environ.get(ATTEMPT_VARIABLE) or 1),
            live_after_s=LIVE_AFTER_S if live_after is None else float(live_after),
        )


def environment_problems(environ: Mapping[str, str]) -> list[str]:
    """What the jobs would refuse in these variables, checked before any job (snaketune.config)
    and again by each job."""
    problems = []
    value = environ.get(LIVE_AFTER_VARIABLE)
    if value is not None and not non_negative(value):
        problems.append(
            f"{LIVE_AFTER_VARIABLE}={value!r} (environment): expected seconds >= 0, how long a "
            f"stage works before it connects to the tracking server; unset it for the default "
            f"{LIVE_AFTER_S:g}"
        )
    attempt = environ.get(ATTEMPT_VARIABLE)
    if attempt and not attempt.isdigit():
        problems.append(
            f"{ATTEMPT_VARIABLE}={attempt!r} (environment): expected the attempt's number, "
            "which the train rule sets; unset it"
        )
    return problems


def non_negative(text: str) -> bool:
    try:
        return float(text) >= 0
    except ValueError:
        return False


IN_PROCESS = JobContext()
"""A job called in-process: the defaults."""
