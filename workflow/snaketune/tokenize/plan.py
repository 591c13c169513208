"""The plan_partitions rule: how each split is cut into partitions (contiguous row ranges of its
Parquet file, each tokenized by its own job that reads only its own rows), the label
vocabulary, and the Rust tokenizer every partition runs, written once so that no partition job
needs transformers.

How many partitions (`tokenize.partitions`):
- a number N: the train split is cut into N ranges of equal row count (to within one row); val
  and test are one partition each, as they are a small share of the corpus and every partition
  drops its short packing remainder;
- "auto": every split gets one partition per AUTO_PARTITION_BYTES of text (rounded up, at least
  one, at most one per row), measured as the text column's uncompressed size in the Parquet
  footer, so documents of any length weigh what they cost to tokenize.

With a number, the jobs are known when Snakemake builds the DAG; "auto" needs the split on disk,
so the plan step is a checkpoint and the jobs appear once it has run.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq

from snaketune.context import IN_PROCESS, JobContext
from snaketune.errors import CorpusError
from snaketune.fileio import atomic_path, read_json, sha256_tree, write_json
from snaketune.names import SPLITS, TEST, TRAIN, VAL
from snaketune.settings import AUTO
from snaketune.tasks import task_of
from snaketune.tokenize.encoder import (
    FAST_ENCODER_MAX_PARTITION_BYTES,
    choose_encoder,
    encoder_for,
    tokenizer_facts,
)
from snaketune.tokenize.paths import PlanPaths
from snaketune.tokenize.settings import TokenizeJob

# Seconds of tokenizing with gigatoken, a minute or two with tokenizers, on two cores: long
# enough to repay a cluster job's start-up, short enough that a few gigabytes keep eight local
# cores busy, and within the text a job may encode with gigatoken (its cache grows with it).
AUTO_PARTITION_BYTES = FAST_ENCODER_MAX_PARTITION_BYTES
PARTITION_NAME_DIGITS = 5  # part names sort in row order up to 99,999 partitions


@dataclass(frozen=True)
class SplitPlan:
    """Where one split's rows are and how they are cut."""

    path: str
    rows: int
    text_bytes: int
    ranges: list[tuple[int, int]]
    """[start, end) row range of each partition, in row order."""


def fixed_partition_counts(partitions: int | str) -> dict[str, int] | None:
    """Partitions per split when the config fixes them; None for "auto" (read from the plan)."""
    if partitions == AUTO:
        return None
    return {TRAIN: int(partitions), VAL: 1, TEST: 1}


def auto_partition_count(rows: int, text_bytes: int, target_bytes: int) -> int:
    return max(1, min(max(rows, 1), math.ceil(text_bytes / target_bytes)))


def row_ranges(rows: int, count: int) -> list[tuple[int, int]]:
    """`count` contiguous ranges covering [0, rows) whose sizes differ by at most one row."""
    bounds = [rows * i // count for i in range(count + 1)]
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def text_size(split_path: Path) -> tuple[int, int]:
    """Rows and uncompressed bytes of the text column, from the Parquet footer alone."""
    metadata = pq.ParquetFile(split_path).metadata
    text_column = metadata.schema.to_arrow_schema().get_field_index("text")
    text_bytes = sum(
        metadata.row_group(g).column(text_column).total_uncompressed_size
        for g in range(metadata.num_row_groups)
    )
    return metadata.num_rows, text_bytes


def plan_splits(
    splits: dict[str, Path],
    partitions: int | str,
    target_bytes: int = AUTO_PARTITION_BYTES,
) -> dict[str, SplitPlan]:
    fixed = fixed_partition_counts(partitions)
    plans = {}
    for name, path in splits.items():
        rows, text_bytes = text_size(path)
        count = fixed[name] if fixed else auto_partition_count(rows, text_bytes, target_bytes)
        plans[name] = SplitPlan(str(path), rows, text_bytes, row_ranges(rows, count))
    return plans


def split_plans(plan: dict) -> dict[str, SplitPlan]:
    """The splits of a plan as written by plan_partitions."""
    return {
        name: SplitPlan(**{**split, "ranges": [tuple(r) for r in split["ranges"]]})
        for name, split in plan["splits"].items()
    }


def planned_partition_counts(plan_path: Path) -> dict[str, int]:
    return {name: len(split.ranges) for name, split in split_plans(read_json(plan_path)).items()}


def partition_threads(split: str) -> int:
    """Cores of one partition job: two for the train split's; one for val's and test's, a
    small share of the corpus each, so that they run beside each other."""
    return 2 if split == TRAIN else 1


def partition_name(index: int) -> str:
    return f"{index:0{PARTITION_NAME_DIGITS}d}"


def partition_names(counts: dict[str, int]) -> list[tuple[str, str]]:
    """(split, part) of every partition job, splits in the given order, parts in row order."""
    return [(split, partition_name(i)) for split, n in counts.items() for i in range(n)]


def largest_partition_bytes(plans: dict[str, SplitPlan]) -> int:
    """The most text one partition holds (its share of its split's text, by rows)."""
    return max(
        (
            split.text_bytes * (end - start) // max(split.rows, 1)
            for split in plans.values()
            for start, end in split.ranges
        ),
        default=0,
    )


def label_vocabulary(train_split: Path) -> list[str]:
    names: set[str] = set()
    for batch in pq.ParquetFile(train_split, pre_buffer=False).iter_batches(columns=["label"]):
        names.update(pc.unique(batch.column("label").drop_null()).to_pylist())
    if len(names) < 2:
        raise CorpusError(
            f"sequence_classification needs at least two labels in the train split, found "
            f"{sorted(names)}; check the dataset's label_column"
        )
    return sorted(names)


def plan_partitions(paths: PlanPaths, job: TokenizeJob, context: JobContext = IN_PROCESS) -> dict:
    """Write the plan every partition job follows (row ranges, label names, tokenizer facts, the
    encoder chosen and why) and the tokenizer they all run, so no partition job needs
    transformers."""
    tokenizer = tokenizer_facts(paths.tokenizer)
    splits = {name: getattr(paths, name) for name in SPLITS}
    classify = not task_of(job.task).predicts_tokens
    split_plan = plan_splits(splits, job.tokenize.partitions)
    plan = {
        "task": job.task,
        "partitions": job.tokenize.partitions,
        "splits": {name: asdict(split) for name, split in split_plan.items()},
        "label_names": label_vocabulary(paths.train) if classify else [],
        "tokenizer_sha256": sha256_tree(paths.tokenizer),
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "vocab_size": tokenizer.vocab_size,
    }
    encoder_json = encoder_for(tokenizer, job).to_str(pretty=True)
    choice = choose_encoder(
        job.tokenize.encoder,
        job,
        encoder_json,
        tokenizer,
        splits,
        largest_partition_bytes(split_plan),
    )
    plan["encoder"] = asdict(choice)
    with atomic_path(paths.encoder) as tmp:
        tmp.write_text(encoder_json)
    write_json(paths.plan, plan)
    return plan
