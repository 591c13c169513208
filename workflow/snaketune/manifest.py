"""The manifest every stage writes next to its outputs: what went in (each input's sha256), with
what settings, what came out (each output's sha256), where every path was, how long it took,
and with which library versions. The job's paths (snaketune.stages) say which is which."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from snaketune import __version__
from snaketune.context import JobContext
from snaketune.fileio import read_json, sha256_tree, write_json
from snaketune.paths import INPUT, OUTPUT, Paths, is_list, path_fields
from snaketune.stages import stage_of
from snaketune.track import live, stage_log

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


Tracking = live.Tracker | live.Offline
"""A stage's MLflow run while it works: live, or Offline (no tracking folder, or a process
other than 0)."""
OFFLINE = live.Offline()


@dataclass
class StageRecord:
    """Collects a stage's counts and outputs while it runs; written as manifest.json at the end."""

    inputs: dict[str, dict[str, str]]
    """{name: {"path", "sha256"}} of what the stage read."""
    params: dict[str, Any]
    counts: dict[str, Any] = field(default_factory=dict)
    outputs: dict[str, str] = field(default_factory=dict)
    """{name: sha256} of what it wrote; left empty, every digested output of the job."""
    extra: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    tracker: Tracking = field(default_factory=live.Offline)
    """The stage's MLflow run while it works: live when the job was given a tracking folder."""

    def add_input(self, name: str, path: Path, manifest_name: str = "") -> str:
        """Record one more input (a part of an input folder, say); returns its digest. An input
        named like a manifest (`manifest_name`) is another stage's: see manifest_digest."""
        is_manifest = Path(path).name == manifest_name and Path(path).is_file()
        digest = manifest_digest(path) if is_manifest else sha256_tree(path)
        self.inputs[name] = {"path": str(path), "sha256": digest}
        return digest


TIMINGS = ("seconds", "started_at", "memory", "compile_cache")
"""Manifest entries that differ on every run of the same stage: its times, the memory a train
job measured (train.trainer.memory_used), and what a compiling job found in the compile cache
(snaketune.train.compile_cache)."""


def manifest_digest(path: Path) -> str:
    """sha256 of a stage's manifest without its TIMINGS, which differ on every run: the same
    inputs then have the same digest, and so do the manifests that record them."""
    record = read_json(path)
    for timing in TIMINGS:
        record.pop(timing, None)
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def digested(paths: Paths, role: str, unread: tuple[str, ...] = ()) -> dict[str, Path]:
    return {
        f.name: getattr(paths, f.name)
        for f in path_fields(paths, role)
        if f.metadata["digest"] and f.name != "manifest" and f.name not in unread
    }


def relative_to(folder: Path, path: Path) -> str:
    """`path` as seen from `folder`: a results tree that moves keeps its manifests right."""
    return os.path.relpath(path, folder)


def recorded_paths(manifest: Path) -> dict[str, Path]:
    """Where a stage's manifest says its paths were (it writes them relative to its folder)."""
    written = read_json(manifest)["paths"]
    return {name: Path(os.path.normpath(Path(manifest).parent / p)) for name, p in written.items()}


@contextmanager
def stage_manifest(
    paths: Paths,
    settings: Any,
    *,
    context: JobContext,
    params: dict[str, Any] | None = None,
    unread: tuple[str, ...] = (),
    known: dict[str, str] | None = None,
) -> Iterator[StageRecord]:
    """Time the stage, track it (live in MLflow when the context names a tracking folder:
    record.tracker) and write paths.manifest only if the stage body finished without error.
    Its params are the settings (and `params`); every input but the `unread` ones is digested
    first (but those whose digest the stage already `known`s), every output last."""
    stage = stage_of(paths)
    record = StageRecord(inputs={}, params={**asdict(settings), **(params or {})})
    for name, path in digested(paths, INPUT, unread).items():
        if known and name in known:
            record.inputs[name] = {"path": str(path), "sha256": known[name]}
        else:
            record.add_input(name, path, paths.manifest.name)
    key = stage_log.run_key(record.inputs, record.params)
    started_at, started = time.time(), time.perf_counter()
    start = live.StageStart(stage.folder, key, started_at, record.params)
    with live.tracking(start, context.tracking, context.live_after_s) as tracker:
        record.tracker = tracker
        yield record
        record.seconds = round(time.perf_counter() - started, 3)
        _write(paths, stage, record, key, started_at)
        tracker.end("FINISHED", started_at + record.seconds)


def _write(paths: Paths, stage, record: StageRecord, key: str, started_at: float) -> None:
    if not record.outputs:
        record.outputs = {name: sha256_tree(p) for name, p in digested(paths, OUTPUT).items()}
    write_json(
        paths.manifest,
        {
            "stage": stage.folder,
            "rule": stage.rule,
            "inputs": record.inputs,
            "params": record.params,
            "counts": record.counts,
            "outputs": record.outputs,
            # Relative to the manifest's folder, where track.reconcile looks for the outputs.
            "paths": {
                f.name: relative_to(paths.manifest.parent, getattr(paths, f.name))
                for f in path_fields(paths)
                if not is_list(f)
            },
            "seconds": record.seconds,
            "started_at": round(started_at, 3),
            "run_key": key,
            "versions": package_versions(),
            **record.extra,
        },
    )
