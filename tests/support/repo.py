"""Where things are: the repository, its demo corpus and config, the tools of this venv."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
DEMO_CORPUS = REPO / "workflow" / "resources" / "demo" / "support.jsonl.gz"
SHARED_DATA = REPO.parent / "shared" / "data"
DEFAULT_CONFIG = yaml.safe_load((REPO / "config.yaml").read_text())
BIN = Path(sys.executable).parent
SNAKEMAKE = str(BIN / "snakemake")
SNAKETUNE = str(BIN / "snaketune")


def without_venv(path: str) -> str:
    """A PATH without this venv's bin folder: a new shell's, where the venv is not activated."""
    return os.pathsep.join(
        p for p in path.split(os.pathsep) if p and Path(p).resolve() != BIN.resolve()
    )
