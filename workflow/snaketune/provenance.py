"""Where a result came from: code version, machine, libraries, config and command line.

`write_invocation` runs once per snakemake invocation (the Snakefile's onstart) and records
the exact command in <results_dir>/provenance.json; the track stage copies it onto MLflow runs.
"""

from __future__ import annotations

import platform
import shlex
import subprocess
import time
from pathlib import Path
from typing import Any

from snaketune.fileio import read_json, write_json
from snaketune.manifest import package_versions
from snaketune.settings import config_hash


def git_state() -> dict[str, str]:
    """Commit and dirty flag of the checkout this package runs from ('unknown' elsewhere)."""
    source = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(
            ["git", "-C", str(source), "rev-parse", "HEAD"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(source), "status", "--porcelain"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return {"git.commit": "unknown", "git.dirty": "unknown"}
    return {"git.commit": commit, "git.dirty": str(bool(dirty)).lower()}


def write_invocation(results_dir: Path, argv: list[str], config: dict[str, Any]) -> Path:
    path = Path(results_dir) / "provenance.json"
    write_json(
        path,
        {
            **git_state(),
            "host": platform.node(),
            "command": shlex.join(argv),
            "working_directory": str(Path.cwd()),
            "config_hash": config_hash(config),
            "versions": package_versions(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        },
    )
    return path


def invocation_tags(path: str | None) -> dict[str, str]:
    """Tags from the latest invocation's record, if there is one."""
    if not path or not Path(path).exists():
        return {}
    record = read_json(path)
    return {"snakemake.command": record["command"], "snakemake.config_hash": record["config_hash"]}
