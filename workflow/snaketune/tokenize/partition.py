"""The tokenize_partition rule: one partition of a split's rows, streamed in record batches
through the encoder the plan chose and written as bounded Parquet shards as it goes. A job holds
two read batches and one row group of output at a time, so memory stays flat however large the
split is."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from snaketune.context import IN_PROCESS, JobContext
from snaketune.errors import CorpusError
from snaketune.fileio import atomic_dir, read_json
from snaketune.manifest import stage_manifest
from snaketune.names import INSTRUCTION_COLUMNS, TRAIN
from snaketune.tasks import task_of
from snaketune.tokenize.encoder import encoded_batches, encoder_from_plan
from snaketune.tokenize.packing import (
    PartitionCounts,
    encode_examples,
    pack_blocks,
    pack_documents,
    pack_examples,
    pack_whole_examples,
)
from snaketune.tokenize.paths import PartitionPaths
from snaketune.tokenize.plan import split_plans
from snaketune.tokenize.settings import PER_DOCUMENT, PartitionJob
from snaketune.tokenize.shards import ShardStats, ShardWriter, schema_for


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


def tokenize_rows(
    split_file: Path,
    rows: tuple[int, int],
    encoder_path: Path,
    out_dir: Path,
    job: PartitionJob,
    plan: dict,
) -> tuple[PartitionCounts, list[ShardStats]]:
    settings = job.tokenize
    encoder = encoder_from_plan(plan, encoder_path)
    classify = not task_of(job.task).predicts_tokens
    columns = ["doc_id", "text", "label"] if classify else ["text"]
    if job.instruction:
        columns = list(INSTRUCTION_COLUMNS)
    batches = read_row_range(split_file, *rows, columns, settings.read_batch_rows)
    encoded = encoded_batches(encoder, batches, job.instruction)
    writer = ShardWriter(out_dir, schema_for(job.task, job.instruction), settings.shard_rows)
    if classify:
        counts = encode_examples(encoded, writer, plan["label_names"], Path(split_file).name)
    else:
        counts = packing_of(job)(encoded, writer, settings.block_size)
    shards = writer.close()
    counts.rows = sum(s.rows for s in shards)
    counts.tokens = sum(s.tokens for s in shards)
    return counts, shards


def packing_of(job: PartitionJob):
    """The causal LM rows' packing function for this partition's split (packing's docstring)."""
    per_document = job.tokenize.packing == PER_DOCUMENT
    if job.instruction:
        return pack_examples if per_document or job.split != TRAIN else pack_whole_examples
    return pack_documents if per_document else pack_blocks


def tokenize_partition(
    paths: PartitionPaths, job: PartitionJob, context: JobContext = IN_PROCESS
) -> PartitionCounts:
    plan = read_json(paths.plan)
    split_plan = split_plans(plan)[job.split]
    found = pq.ParquetFile(paths.split_file).metadata.num_rows
    if found != split_plan.rows:
        raise CorpusError(
            f"{paths.split_file} has {found} rows but the tokenize plan {paths.plan} was made for "
            f"{split_plan.rows}; rerun the plan (snakemake reruns it when the split is newer)"
        )
    rows = split_plan.ranges[job.part]
    with stage_manifest(paths, job, context=context, params={"rows": list(rows)}) as record:
        with atomic_dir(paths.shards) as tmp:
            counts, shards = tokenize_rows(paths.split_file, rows, paths.encoder, tmp, job, plan)
        record.counts = asdict(counts)
        record.extra["encoder"] = plan["encoder"]["name"]
        record.extra["shards"] = [asdict(s) for s in shards]
    return counts
