"""Where things are: the repository, its demo corpus and config, the tools of this venv."""

from __future__ import annotations

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
