"""The tokenize stage's paths: the plan, each partition, and the gather."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from snaketune.paths import MANIFEST, Paths, input_path, output_path


@dataclass(frozen=True)
class PlanPaths(Paths):
    train: Path = input_path("the train split")
    val: Path = input_path("the validation split")
    test: Path = input_path("the test split")
    tokenizer: Path = input_path("the tokenizer folder")
    plan: Path = output_path(
        "row ranges of every partition, label names, tokenizer facts", name="plan.json"
    )
    encoder: Path = output_path("the Rust tokenizer every partition runs", name="encoder.json")


@dataclass(frozen=True)
class PartitionPaths(Paths):
    # Each partition reads only its rows of the split; the split's sha256 is in its manifest.
    split_file: Path = input_path("the split this partition reads rows of", digest=False)
    plan: Path = input_path("the tokenize plan")
    encoder: Path = input_path("the Rust tokenizer of the plan")
    shards: Path = output_path(
        "this partition's Parquet shards", digest=False, name="{part}", folder=True
    )
    manifest: Path = output_path(
        "this partition's manifest (counts, per-shard sha256)", name="{part}.json"
    )


@dataclass(frozen=True)
class GatherPaths(Paths):
    train: Path = input_path("the train split")
    val: Path = input_path("the validation split")
    test: Path = input_path("the test split")
    tokenizer: Path = input_path("the tokenizer folder")
    plan: Path = input_path("the tokenize plan (its ranges are in the manifest)", digest=False)
    part_shards: list[Path] = input_path("every partition's shard folder", digest=False)
    part_manifests: list[Path] = input_path("every partition's manifest", digest=False)
    shards: Path = output_path(
        "shards/<split>/shard-NNNNN.parquet", digest=False, name="shards", folder=True
    )
    manifest: Path = output_path(
        "this job's manifest.json: the tokenized data's contract", name=MANIFEST
    )
