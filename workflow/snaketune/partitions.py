"""The tokenize plan: how each split is cut into partitions (contiguous row ranges of its Parquet
file, each tokenized by its own job that reads only its own rows), the label vocabulary, and the
Rust tokenizer every partition runs, written once so that no partition job needs transformers.

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
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from snaketune.errors import CorpusError
from snaketune.fileio import atomic_path, read_json, sha256_tree, write_json

if TYPE_CHECKING:
    from snaketune.shards import TokenizeSettings

AUTO = "auto"
# A minute or two of tokenizing on two cores: long enough to repay a cluster job's start-up,
# short enough that a few gigabytes keep eight local cores busy.
AUTO_PARTITION_BYTES = 256 * 2**20
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
    return {"train": int(partitions), "val": 1, "test": 1}


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


def plan_to_json(plans: dict[str, SplitPlan]) -> dict:
    return {name: asdict(plan) for name, plan in plans.items()}


def split_plans(plan: dict) -> dict[str, SplitPlan]:
    """The splits of a plan as written by plan_partitions."""
    return {
        name: SplitPlan(**{**split, "ranges": [tuple(r) for r in split["ranges"]]})
        for name, split in plan["splits"].items()
    }


def planned_partition_counts(plan_path: Path) -> dict[str, int]:
    return {name: len(split.ranges) for name, split in split_plans(read_json(plan_path)).items()}


def truncating(tokenizer, max_length: int):
    """A copy of the Rust tokenizer that adds the model's special tokens (e.g. BERT's [CLS] and
    [SEP]) and truncates to max_length with them in place."""
    from tokenizers import Tokenizer

    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    backend.no_padding()
    backend.enable_truncation(max_length)
    return backend


def eos_appending(tokenizer):
    """A copy of the Rust tokenizer whose post-processor ends every document with EOS, so packing
    needs no per-token Python work (the caller's tokenizer is left as it was)."""
    from tokenizers import Tokenizer, processors

    eos, eos_id = tokenizer.eos_token, tokenizer.eos_token_id
    if eos is None or eos_id is None:
        raise CorpusError(
            "causal_lm packing joins documents with an EOS token, and this tokenizer has none; "
            "use a tokenizer with eos_token set (the trained BPE has <|endoftext|>)"
        )
    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    backend.no_truncation()
    backend.no_padding()
    backend.post_processor = processors.TemplateProcessing(
        single=f"$A {eos}", special_tokens=[(eos, eos_id)]
    )
    return backend


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


def plan_partitions(
    splits: dict[str, Path],
    tokenizer_dir: Path,
    plan_path: Path,
    encoder_path: Path,
    settings: TokenizeSettings,
) -> dict:
    """Write the plan every partition job follows (row ranges, label names, tokenizer facts) and
    the Rust tokenizer they all run, so no partition job needs transformers."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    classify = settings.task == "sequence_classification"
    encoder = truncating(tokenizer, settings.max_length) if classify else eos_appending(tokenizer)
    plan = {
        "task": settings.task,
        "partitions": settings.partitions,
        "splits": plan_to_json(plan_splits(splits, settings.partitions)),
        "label_names": label_vocabulary(splits["train"]) if classify else [],
        "tokenizer_sha256": sha256_tree(tokenizer_dir),
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "vocab_size": len(tokenizer),
    }
    with atomic_path(encoder_path) as tmp:
        encoder.save(str(tmp))
    write_json(plan_path, plan)
    return plan


def partition_name(index: int) -> str:
    return f"{index:0{PARTITION_NAME_DIGITS}d}"


def partition_names(counts: dict[str, int]) -> list[tuple[str, str]]:
    """(split, part) of every partition job, splits in the given order, parts in row order."""
    return [(split, partition_name(i)) for split, n in counts.items() for i in range(n)]


def partition_paths(parts_dir: Path, split: str, part: str) -> tuple[Path, Path]:
    """A partition job's shard folder and manifest (the tokenize_partition rule's outputs)."""
    return Path(parts_dir) / split / part, Path(parts_dir) / split / f"{part}.json"


def read_row_range(
    split_path: Path, start: int, end: int, columns: list[str], batch_rows: int
) -> Iterator[pa.RecordBatch]:
    """Rows [start, end) of a Parquet file as record batches of at most `batch_rows`, decoding
    only the row groups that overlap the range."""
    # pre_buffer would keep every column chunk read so far: memory growing with the file.
    parquet = pq.ParquetFile(split_path, pre_buffer=False)
    groups, first_row, offset = [], 0, 0
    for g in range(parquet.metadata.num_row_groups):
        group_rows = parquet.metadata.row_group(g).num_rows
        if offset < end and offset + group_rows > start:
            first_row = first_row if groups else offset
            groups.append(g)
        offset += group_rows
    if not groups or start >= end:
        return
    position = first_row
    for batch in parquet.iter_batches(batch_size=batch_rows, row_groups=groups, columns=columns):
        low, high = max(start - position, 0), min(end - position, batch.num_rows)
        if high > low:
            yield batch.slice(low, high - low)
        position += batch.num_rows
        if position >= end:
            return
