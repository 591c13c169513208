"""The gather_shards rule: every partition's shards, renumbered in row order, linked into one
folder per split, and the stage's manifest: the partitions' counts added up, and the facts
training and evaluation read back through snaketune.tokenize.shards.TokenizedData."""

from __future__ import annotations

import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

from snaketune.context import IN_PROCESS, JobContext
from snaketune.errors import CorpusError
from snaketune.fileio import atomic_dir, read_json
from snaketune.manifest import recorded_paths, stage_manifest
from snaketune.names import SPLITS, TRAIN
from snaketune.tokenize.packing import PACKING, PartitionCounts
from snaketune.tokenize.paths import GatherPaths
from snaketune.tokenize.plan import split_plans
from snaketune.tokenize.settings import ACROSS_DOCUMENTS, DOCUMENTS_APART, TokenizeJob
from snaketune.tokenize.shards import (
    ShardStats,
    TokenArrays,
    shard_name,
    split_dir,
    token_dtype,
    write_arrays,
)

PLAN_FACTS = ("tokenizer_sha256", "pad_token_id", "eos_token_id", "vocab_size", "task", "encoder")


@dataclass
class SplitStats(PartitionCounts):
    partitions: int = 0
    shards: list[ShardStats] = field(default_factory=list)


@dataclass(frozen=True)
class Partition:
    """One tokenize_partition job's outputs."""

    shards: Path
    manifest: Path
    record: dict


def link_or_copy(source: Path, target: Path) -> None:
    """A hard link costs no copy; across filesystems, or where links are refused, copy."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def partitions_by_name(paths: GatherPaths) -> dict[tuple[str, int], Partition]:
    """The partition jobs' outputs by (split, part), as their manifests say."""
    found = {}
    for shards, manifest in zip(paths.part_shards, paths.part_manifests, strict=True):
        record, described = read_json(manifest), recorded_paths(manifest)["shards"]
        if described != Path(os.path.normpath(shards)):
            raise CorpusError(
                f"{manifest} describes {described}, not {shards}; the partition folders and "
                "manifests must be given in the same order"
            )
        found[(record["params"]["split"], record["params"]["part"])] = Partition(
            shards, manifest, record
        )
    return found


def gather_split(
    split: str, plan: dict, partitions: dict[tuple[str, int], Partition], out_dir: Path
) -> tuple[SplitStats, list[dict]]:
    """Link one split's partition shards, renumbered in row order, into out_dir."""
    stats, listed = SplitStats(), []
    for index, rows in enumerate(split_plans(plan)[split].ranges):
        part = partitions.get((split, index))
        if part is None:
            raise CorpusError(f"partition {index} of split {split} was not given to the gather")
        if part.record["params"]["rows"] != list(rows):
            raise CorpusError(
                f"{part.manifest} tokenized rows {part.record['params']['rows']}, but the plan "
                f"now says {list(rows)}; rerun the tokenize partitions"
            )
        files = []
        for shard in part.record["shards"]:
            renamed = ShardStats(**{**shard, "file": shard_name(len(stats.shards))})
            link_or_copy(part.shards / shard["file"], out_dir / renamed.file)
            stats.shards.append(renamed)
            files.append(renamed.file)
        for key, value in part.record["counts"].items():
            setattr(stats, key, getattr(stats, key) + value)
        listed.append({"rows_read": list(rows), **part.record["counts"], "shards": files})
    stats.partitions = len(listed)
    return stats, listed


def gather_shards(
    paths: GatherPaths, job: TokenizeJob, context: JobContext = IN_PROCESS
) -> dict[str, SplitStats]:
    plan = read_json(paths.plan)
    partitions = partitions_by_name(paths)
    with stage_manifest(paths, job, context=context) as record:
        stats, listed = {}, {}
        with atomic_dir(paths.shards) as tmp:
            dtype = token_dtype(plan["vocab_size"])
            for name in SPLITS:
                out = split_dir(tmp, name)
                out.mkdir()
                stats[name], listed[name] = gather_split(name, plan, partitions, out)
                if stats[name].rows == 0:
                    raise CorpusError(no_rows_message(getattr(paths, name).name, job))
                write_arrays(out, [out / shard.file for shard in stats[name].shards], dtype)
                if job.instruction and name == TRAIN:
                    refuse_without_answers(out, dtype, job)
        record.counts = {
            name: {k: v for k, v in asdict(s).items() if k != "shards"} for name, s in stats.items()
        }
        record.extra.update(
            {
                **{k: plan[k] for k in PLAN_FACTS},
                "label_names": plan["label_names"],
                "shards": {name: [asdict(s) for s in st.shards] for name, st in stats.items()},
                "partitions": listed,
                "packing": PACKING[job.layout],
                "token_dtype": dtype,
            }
        )
    return stats


def refuse_without_answers(split_folder: Path, dtype: str, job: TokenizeJob) -> None:
    """Instruction data whose every training prompt fills block_size leaves no answer token to
    learn: said here, before any training step, not as an error inside the trainer."""
    targets = TokenArrays.open(split_folder, dtype).targets
    if targets is not None and not targets.any():
        raise CorpusError(
            f"no training example has an answer token within tokenize.block_size="
            f"{job.tokenize.block_size}: every prompt fills it, so there is nothing to learn. "
            "Raise tokenize.block_size, or shorten the prompts (the template or the data)"
        )


def no_rows_message(split_file: str, job: TokenizeJob) -> str:
    if job.layout in (ACROSS_DOCUMENTS, DOCUMENTS_APART):
        return (
            f"split {split_file} produced no rows (fewer than block_size="
            f"{job.tokenize.block_size} tokens in every partition; lower block_size, use fewer "
            "partitions or more data)"
        )
    return f"split {split_file} produced no rows"
