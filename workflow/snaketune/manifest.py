"""The manifest every stage writes next to its outputs: what went in, with what settings, what
came out, how long it took, and with which library versions."""

from __future__ import annotations

import platform
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from snaketune import __version__
from snaketune.fileio import sha256_tree, write_json

_TRACKED_PACKAGES = (
    "pandas",
    "pyarrow",
    "tokenizers",
    "transformers",
    "torch",
    "evaluate",
    "mlflow",
    "scikit-learn",
    "snakemake",
)


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version(), "snaketune": __version__}
    for name in _TRACKED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


@dataclass
class StageRecord:
    """Collects a stage's counts and outputs while it runs; written as manifest.json at the end."""

    stage: str
    inputs: dict[str, str]
    params: dict[str, Any]
    counts: dict[str, Any] = field(default_factory=dict)
    outputs: dict[str, str] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


@contextmanager
def stage_manifest(
    stage: str, manifest_path: Path, inputs: Mapping[str, Path], params: Mapping[str, Any]
) -> Iterator[StageRecord]:
    """Time the stage and write its manifest only if the stage body finished without error."""
    record = StageRecord(
        stage=stage,
        inputs={name: sha256_tree(Path(p)) for name, p in inputs.items()},
        params=dict(params),
    )
    started = time.perf_counter()
    yield record
    record.seconds = round(time.perf_counter() - started, 3)
    write_json(
        manifest_path,
        {
            "stage": record.stage,
            "inputs": {
                name: {"path": str(p), "sha256": record.inputs[name]} for name, p in inputs.items()
            },
            "params": record.params,
            "counts": record.counts,
            "outputs": record.outputs,
            "seconds": record.seconds,
            "versions": package_versions(),
            **record.extra,
        },
    )
