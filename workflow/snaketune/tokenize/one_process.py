"""The tokenize stage's three rules run one after another in one process, on a scratch folder:
for tests and benchmarks that want the stage's output without a workflow."""

from __future__ import annotations

import shutil
from pathlib import Path

from snaketune.tokenize.gather import SplitStats, gather_shards
from snaketune.tokenize.partition import tokenize_partition
from snaketune.tokenize.paths import GatherPaths, PartitionPaths, PlanPaths
from snaketune.tokenize.plan import partition_names, plan_partitions, planned_partition_counts
from snaketune.tokenize.settings import PartitionJob, TokenizeJob


def tokenize_in_one_process(
    splits: dict[str, Path], tokenizer: Path, shards: Path, manifest: Path, job: TokenizeJob
) -> dict[str, SplitStats]:
    """Plan, every partition in turn, and gather into `shards` and `manifest`."""
    # Beside the shards, so that gathering links them instead of copying; a fixed name, so
    # that the same inputs give the same manifest.
    work = Path(shards).parent / f".{Path(shards).name}.parts"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        plan = PlanPaths.under(work, **splits, tokenizer=tokenizer)
        plan_partitions(plan, job)
        parts = []
        for split, part in partition_names(planned_partition_counts(plan.plan)):
            paths = PartitionPaths.under(
                work / "parts" / split,
                part=part,
                split_file=splits[split],
                plan=plan.plan,
                encoder=plan.encoder,
            )
            partition = PartitionJob(
                job.task, job.tokenize, job.instruction, split=split, part=int(part)
            )
            tokenize_partition(paths, partition)
            parts.append(paths)
        gather = GatherPaths(
            **splits,
            tokenizer=tokenizer,
            plan=plan.plan,
            part_shards=[p.shards for p in parts],
            part_manifests=[p.manifest for p in parts],
            shards=shards,
            manifest=manifest,
        )
        return gather_shards(gather, job)
    finally:
        shutil.rmtree(work, ignore_errors=True)
