"""The evaluate job's paths."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from snaketune.paths import Paths, input_path, manifest_path, output_path, page_path


@dataclass(frozen=True)
class EvaluatePaths(Paths):
    model: Path = input_path("the trained model")
    shards: Path = input_path("the token shards (the test folder is scored)", digest=False)
    tokenize_manifest: Path = input_path("the tokenize stage's manifest")
    train: Path = input_path("the train split (baselines)")
    test: Path = input_path("the test split (texts of the samples)")
    metrics: Path = output_path("metrics with their protocol", artifact=True, name="metrics.json")
    samples: Path = output_path(
        "the samples table: generations (with the scored test answers of instruction data) or "
        "predictions",
        artifact=True,
        name="samples.csv",
    )
    plot: Path = output_path(
        "NLL by position or the confusion matrix", artifact=True, name="eval_plot.png"
    )
    manifest: Path = manifest_path()
    metrics_html: Path = page_path("the metrics as tables", of="metrics")
    samples_html: Path = page_path("the samples as a table", of="samples")
