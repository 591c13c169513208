"""The track and sweep jobs' paths."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from snaketune.paths import (
    Paths,
    input_path,
    manifest_path,
    output_path,
    page_path,
    state_path,
)


@dataclass(frozen=True)
class TrackPaths(Paths):
    download: Path = input_path("the download's manifest")
    clean: Path = input_path("the clean stage's manifest")
    split: Path = input_path("the split stage's manifest")
    tokenizer: Path = input_path("the tokenizer stage's manifest")
    tokenize: Path = input_path("the tokenize stage's manifest")
    train: Path = input_path("the train stage's manifest")
    evaluate: Path = input_path("the evaluate stage's manifest")
    runs: Path = output_path("the MLflow run ids", name="runs.json")
    model_card: Path = output_path(
        "the model card, the model's README.md in MLflow", name="model_card.md"
    )
    store: Path = state_path("the default SQLite store (no tracking URI configured)")
    artifacts: Path = state_path("artifact folder of an experiment created in a local store")
    provenance: Path = state_path("provenance.json of the snakemake invocation")
    tracking: Path = state_path(
        "the experiment's MLflow run ids, one file per run (stage_log.RunIds)"
    )


@dataclass(frozen=True)
class SweepPaths(Paths):
    # Each is digested, one by one, into the manifest (snaketune.track.sweep).
    metrics: list[Path] = input_path("every point's metrics.json, in sweep order", digest=False)
    runs: list[Path] = input_path("every point's runs.json (its MLflow runs)", digest=False)
    table: Path = output_path(
        "one row per point: its swept values and metrics", artifact=True, name="table.csv"
    )
    plot: Path = output_path(
        "each eval metric against the swept keys", artifact=True, name="sweep_plot.png"
    )
    manifest: Path = manifest_path()
    store: Path = state_path("the default SQLite store (no tracking URI configured)")
    artifacts: Path = state_path("artifact folder of an experiment created in a local store")
    table_html: Path = page_path("the table as a page", of="table")
