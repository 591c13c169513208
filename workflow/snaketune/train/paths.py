"""The train job's paths."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from snaketune.paths import Paths, input_path, manifest_path, output_path, state_path


@dataclass(frozen=True)
class TrainPaths(Paths):
    shards: Path = input_path("the token shards, one folder per split")
    tokenize_manifest: Path = input_path("the tokenize stage's manifest")
    tokenizer: Path = input_path("the tokenizer, copied into the model folder")
    model: Path = output_path(
        "the trained model (safetensors + tokenizer)", artifact=True, name="model", folder=True
    )
    # history and system metrics hold timings: their digests would differ on every run.
    history: Path = output_path(
        "one JSON line per step", artifact=True, digest=False, name="history.jsonl"
    )
    loss_curve: Path = output_path(
        "train and val loss by step", artifact=True, name="loss_curve.png"
    )
    manifest: Path = manifest_path()
    system_metrics: Path = output_path(
        "CPU, memory, GPU samples", artifact=True, digest=False, name="system_metrics.jsonl"
    )
    state_dir: Path = state_path("resumable checkpoints, kept when the job fails")
