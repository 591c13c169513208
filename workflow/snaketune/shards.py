"""Stage 5, tokenize: turn each split into Parquet shards of token ids, in three steps that the
workflow runs as separate jobs (`tokenize_shards` runs them one after another in one process):

1. plan: cut each split into partitions of contiguous rows (snaketune.partitions), read the
   label vocabulary, and save the exact Rust tokenizer every partition runs;
2. partition, one job each: stream the partition's rows in record batches through the Rust
   batch encoder and write bounded Parquet shards as it goes;
3. gather: link every partition's shards, in row order, into one folder per split and write the
   stage's manifest with the partitions' counts.

Causal LM: every document ends with EOS. With packing "across_documents" (the default) a
partition packs its documents into blocks of `block_size` tokens across document boundaries. A
partition's final remainder (shorter than a block) is dropped and counted as
dropped_remainder_tokens, so N partitions drop fewer than N * block_size tokens of a split; the
blocks are otherwise those of one pass over the split. With packing "per_document" a row never
holds two documents: each document is cut into rows of at most `block_size` tokens (its last
row may be shorter, counted as short_rows, and is padded only in the training batch), nothing is
dropped, and the rows are the same for any number of partitions.
Classification: one row per example, truncated to `max_length`, with an integer label; the
partitioning changes nothing. A job holds two read batches and one row group of output at a
time, so memory stays flat however large the split is.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from itertools import chain
from operator import attrgetter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from snaketune.errors import CorpusError
from snaketune.fileio import PARQUET_ROW_GROUP_ROWS, atomic_dir, read_json, sha256_file
from snaketune.manifest import stage_manifest
from snaketune.partitions import (
    AUTO,
    partition_name,
    partition_names,
    partition_paths,
    plan_partitions,
    planned_partition_counts,
    read_row_range,
    split_plans,
)
from snaketune.split import SPLITS

TASKS = ("causal_lm", "sequence_classification")
LM_SCHEMA = pa.schema([("input_ids", pa.list_(pa.int32()))])
CLASSIFICATION_SCHEMA = pa.schema(
    [("doc_id", pa.string()), ("input_ids", pa.list_(pa.int32())), ("label", pa.int32())]
)
LM_PACKINGS = ("across_documents", "per_document")
PACKING = {
    "across_documents": "documents joined with EOS and packed into block_size rows across "
    "document boundaries within each partition; each partition's final partial block is dropped "
    "(dropped_remainder_tokens)",
    "per_document": "each document, ending with EOS, cut into rows of at most block_size tokens; "
    "no row holds two documents, a document's last row may be shorter (short_rows, padded and "
    "masked in training batches) and nothing is dropped",
    "sequence_classification": "one row per example, truncated to max_length",
}


@dataclass(frozen=True)
class TokenizeSettings:
    task: str
    block_size: int = 128
    """causal_lm: tokens per training row (the model's context length)."""
    max_length: int = 128
    """sequence_classification: longest example kept, in tokens; longer ones are truncated."""
    shard_rows: int = 4096
    """Rows per Parquet shard; bounds shard size and the memory of one write."""
    read_batch_rows: int = 1024
    """Documents per call of the batch encoder; bounds the memory of one batch."""
    partitions: int | str = AUTO
    """Jobs for the train split's rows, or "auto": every split sized by its text (see
    snaketune.partitions)."""
    packing: str = "across_documents"
    """causal_lm: whether a row may span documents (see PACKING)."""

    def __post_init__(self) -> None:
        problems = []
        if self.task not in TASKS:
            problems.append(f"task {self.task!r} is not one of {TASKS}")
        if self.partitions != AUTO and not (
            isinstance(self.partitions, int) and self.partitions >= 1
        ):
            problems.append(
                f"partitions must be {AUTO!r} or an integer >= 1, not {self.partitions!r}"
            )
        if self.packing not in LM_PACKINGS:
            problems.append(f"packing {self.packing!r} is not one of {LM_PACKINGS}")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def layout(self) -> str:
        """The key of PACKING that describes this task's rows."""
        return self.packing if self.task == "causal_lm" else self.task


@dataclass
class ShardStats:
    file: str
    rows: int = 0
    tokens: int = 0
    sha256: str = ""


@dataclass
class PartitionCounts:
    documents: int = 0
    rows: int = 0
    tokens: int = 0
    truncated: int = 0
    dropped_remainder_tokens: int = 0
    short_rows: int = 0


@dataclass
class SplitStats(PartitionCounts):
    partitions: int = 0
    shards: list[ShardStats] = field(default_factory=list)


# --- writing shards ------------------------------------------------------------------------------


class ShardWriter:
    """Writes tables into shard-00000.parquet, shard-00001.parquet, ... of `shard_rows` rows (the
    last may be short), each in row groups of at most PARQUET_ROW_GROUP_ROWS. The files depend
    only on the rows written, not on how the caller batched them."""

    def __init__(self, out_dir: Path, schema: pa.Schema, shard_rows: int):
        self.out_dir, self.schema, self.shard_rows = Path(out_dir), schema, shard_rows
        self.shards: list[ShardStats] = []
        self._writer: pq.ParquetWriter | None = None
        self._pending: list[pa.Table] = []
        self._pending_rows = 0

    def write(self, table: pa.Table) -> None:
        self._pending.append(table.cast(self.schema))  # e.g. large_string -> the shard's string
        self._pending_rows += table.num_rows
        while self._pending_rows >= self._group_rows():
            self._write_group()

    def close(self) -> list[ShardStats]:
        while self._pending_rows:
            self._write_group()
        self._close_shard()
        return self.shards

    def _group_rows(self) -> int:
        in_shard = self.shards[-1].rows if self._writer else 0
        return min(PARQUET_ROW_GROUP_ROWS, self.shard_rows - in_shard)

    def _write_group(self) -> None:
        if self._writer is None:
            self.shards.append(ShardStats(file=f"shard-{len(self.shards):05d}.parquet"))
            self._writer = pq.ParquetWriter(self.out_dir / self.shards[-1].file, self.schema)
        rows = min(self._group_rows(), self._pending_rows)
        pending = pa.concat_tables(self._pending)
        group, rest = pending.slice(0, rows), pending.slice(rows)
        self._writer.write_table(group, row_group_size=rows)
        shard = self.shards[-1]
        shard.rows += rows
        shard.tokens += int(pc.sum(pc.list_value_length(group.column("input_ids"))).as_py() or 0)
        self._pending, self._pending_rows = [rest], rest.num_rows
        if shard.rows == self.shard_rows:
            self._close_shard()

    def _close_shard(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self.shards[-1].sha256 = sha256_file(self.out_dir / self.shards[-1].file)
            self._writer = None


# --- one partition -------------------------------------------------------------------------------


def encoded_batches(encoder, batches: Iterator[pa.RecordBatch]) -> Iterator[tuple]:
    """Each record batch with its encodings. The next batch is encoded in a worker thread (the
    Rust encoder releases the GIL) while the caller packs and writes the current one."""

    def encode(batch: pa.RecordBatch) -> list:
        return encoder.encode_batch_fast(batch.column("text").to_pylist())

    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = None
        for batch in batches:
            future = pool.submit(encode, batch)
            if pending is not None:
                yield pending[0], pending[1].result()
            pending = (batch, future)
        if pending is not None:
            yield pending[0], pending[1].result()


def pack_blocks(encoded: Iterator[tuple], writer: ShardWriter, block: int) -> PartitionCounts:
    counts = PartitionCounts()
    carry = np.empty(0, dtype=np.int32)
    for _, encodings in encoded:
        counts.documents += len(encodings)
        ids = np.fromiter(chain.from_iterable(map(attrgetter("ids"), encodings)), np.int32)
        stream = np.concatenate([carry, ids])
        n_blocks = len(stream) // block
        if n_blocks:
            offsets = pa.array(np.arange(0, n_blocks * block + 1, block, dtype=np.int32))
            rows = pa.ListArray.from_arrays(offsets, pa.array(stream[: n_blocks * block]))
            writer.write(pa.table({"input_ids": rows}))
        carry = stream[n_blocks * block :]
    counts.dropped_remainder_tokens = len(carry)
    return counts


def pack_documents(encoded: Iterator[tuple], writer: ShardWriter, block: int) -> PartitionCounts:
    """Each document in rows of at most `block` tokens, in document order."""
    counts = PartitionCounts()
    for _, encodings in encoded:
        counts.documents += len(encodings)
        docs = list(map(attrgetter("ids"), encodings))
        lengths = np.fromiter(map(len, docs), np.int64, len(docs))
        ids = np.fromiter(chain.from_iterable(docs), np.int32, int(lengths.sum()))
        # Row k of a document starts k * block tokens after the document does.
        rows_per_doc = -(-lengths // block)
        doc_starts = np.cumsum(lengths) - lengths
        first_row = np.cumsum(rows_per_doc) - rows_per_doc
        row_in_doc = np.arange(int(rows_per_doc.sum())) - np.repeat(first_row, rows_per_doc)
        starts = np.repeat(doc_starts, rows_per_doc) + row_in_doc * block
        offsets = np.append(starts, len(ids)).astype(np.int32)
        counts.short_rows += int(np.count_nonzero(np.diff(offsets) < block))
        if len(starts):
            writer.write(
                pa.table({"input_ids": pa.ListArray.from_arrays(pa.array(offsets), pa.array(ids))})
            )
    return counts


def encode_examples(
    encoded: Iterator[tuple], writer: ShardWriter, label_names: list[str], split_name: str
) -> PartitionCounts:
    counts = PartitionCounts()
    for batch, encodings in encoded:
        labels = batch.column("label")
        label_ids = pc.index_in(labels, value_set=pa.array(label_names, labels.type))
        unknown = pc.unique(labels.filter(pc.is_null(label_ids))).to_pylist()
        if unknown:
            raise CorpusError(f"labels {unknown} in {split_name} never occur in the train split")
        counts.documents += len(encodings)
        counts.truncated += sum(map(bool, map(attrgetter("overflowing"), encodings)))
        ids = pa.array(list(map(attrgetter("ids"), encodings)), pa.list_(pa.int32()))
        writer.write(
            pa.table({"doc_id": batch.column("doc_id"), "input_ids": ids, "label": label_ids})
        )
    return counts


def tokenize_rows(
    split_file: Path,
    rows: tuple[int, int],
    encoder_path: Path,
    out_dir: Path,
    settings: TokenizeSettings,
    label_names: list[str],
) -> tuple[PartitionCounts, list[ShardStats]]:
    from tokenizers import Tokenizer

    encoder = Tokenizer.from_file(str(encoder_path))
    classify = settings.task == "sequence_classification"
    columns = ["doc_id", "text", "label"] if classify else ["text"]
    batches = read_row_range(split_file, *rows, columns, settings.read_batch_rows)
    encoded = encoded_batches(encoder, batches)
    if classify:
        writer = ShardWriter(out_dir, CLASSIFICATION_SCHEMA, settings.shard_rows)
        counts = encode_examples(encoded, writer, label_names, Path(split_file).name)
    else:
        writer = ShardWriter(out_dir, LM_SCHEMA, settings.shard_rows)
        pack = pack_documents if settings.packing == "per_document" else pack_blocks
        counts = pack(encoded, writer, settings.block_size)
    shards = writer.close()
    counts.rows = sum(s.rows for s in shards)
    counts.tokens = sum(s.tokens for s in shards)
    return counts, shards


def tokenize_partition(
    split_file: Path,
    plan_path: Path,
    encoder_path: Path,
    split: str,
    index: int,
    out_dir: Path,
    manifest: Path,
    settings: TokenizeSettings,
) -> PartitionCounts:
    plan = read_json(plan_path)
    split_plan = split_plans(plan)[split]
    found = pq.ParquetFile(split_file).metadata.num_rows
    if found != split_plan.rows:
        raise CorpusError(
            f"{split_file} has {found} rows but the tokenize plan {plan_path} was made for "
            f"{split_plan.rows}; rerun the plan (snakemake reruns it when the split is newer)"
        )
    rows = split_plan.ranges[index]
    params = {
        **asdict(settings),
        "split": split,
        "split_file": str(split_file),
        "part": index,
        "rows": list(rows),
    }
    inputs = {"plan": plan_path, "encoder": encoder_path}
    with stage_manifest("tokenize_partition", manifest, inputs, params) as record:
        with atomic_dir(out_dir) as tmp:
            counts, shards = tokenize_rows(
                split_file, rows, encoder_path, tmp, settings, plan["label_names"]
            )
        record.counts = asdict(counts)
        record.extra["shards"] = [asdict(s) for s in shards]
    return counts


# --- gather --------------------------------------------------------------------------------------


def link_or_copy(source: Path, target: Path) -> None:
    """A hard link costs no copy; across filesystems, or where links are refused, copy."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def gather_split(
    split: str, plan: dict, parts_dir: Path, out_dir: Path
) -> tuple[SplitStats, list[dict]]:
    """Link one split's partition shards, renumbered in row order, into out_dir."""
    stats, partitions = SplitStats(), []
    for index, rows in enumerate(split_plans(plan)[split].ranges):
        shard_dir, manifest_path = partition_paths(parts_dir, split, partition_name(index))
        part = read_json(manifest_path)
        if part["params"]["rows"] != list(rows):
            raise CorpusError(
                f"{manifest_path} tokenized rows {part['params']['rows']}, but the plan now says "
                f"{list(rows)}; rerun the tokenize partitions"
            )
        files = []
        for shard in part["shards"]:
            renamed = ShardStats(**{**shard, "file": f"shard-{len(stats.shards):05d}.parquet"})
            link_or_copy(shard_dir / shard["file"], out_dir / renamed.file)
            stats.shards.append(renamed)
            files.append(renamed.file)
        for key, value in part["counts"].items():
            setattr(stats, key, getattr(stats, key) + value)
        partitions.append({"rows_read": list(rows), **part["counts"], "shards": files})
    stats.partitions = len(partitions)
    return stats, partitions


def gather_shards(
    splits: dict[str, Path],
    tokenizer_dir: Path,
    plan_path: Path,
    parts_dir: Path,
    out_dir: Path,
    manifest: Path,
    settings: TokenizeSettings,
) -> dict[str, SplitStats]:
    plan = read_json(plan_path)
    inputs = {**splits, "tokenizer": tokenizer_dir}
    with stage_manifest("tokenize", manifest, inputs, asdict(settings)) as record:
        stats, partitions = {}, {}
        with atomic_dir(out_dir) as tmp:
            for name in SPLITS:
                (tmp / name).mkdir()
                stats[name], partitions[name] = gather_split(name, plan, parts_dir, tmp / name)
                if stats[name].rows == 0:
                    raise CorpusError(no_rows_message(Path(splits[name]).name, settings))
        record.counts = {
            name: {k: v for k, v in asdict(s).items() if k != "shards"} for name, s in stats.items()
        }
        record.extra.update(
            {
                **{k: plan[k] for k in ("tokenizer_sha256", "pad_token_id", "eos_token_id")},
                **{k: plan[k] for k in ("vocab_size", "task", "label_names")},
                "shards": {name: [asdict(s) for s in st.shards] for name, st in stats.items()},
                "partitions": partitions,
                "packing": PACKING[settings.layout],
            }
        )
    return stats


def no_rows_message(split_file: str, settings: TokenizeSettings) -> str:
    if settings.layout == "across_documents":
        return (
            f"split {split_file} produced no rows (fewer than block_size={settings.block_size} "
            "tokens in every partition; lower block_size, use fewer partitions or more data)"
        )
    return f"split {split_file} produced no rows"


# --- all steps in one process --------------------------------------------------------------------


def tokenize_shards(
    splits: dict[str, Path],
    tokenizer_dir: Path,
    out_dir: Path,
    manifest: Path,
    settings: TokenizeSettings,
) -> dict[str, SplitStats]:
    """Plan, every partition in turn, and gather: the workflow's jobs, one after another."""
    Path(out_dir).parent.mkdir(parents=True, exist_ok=True)
    # Beside out_dir, so that gathering links the shards instead of copying them.
    work = Path(tempfile.mkdtemp(prefix=f".{Path(out_dir).name}.parts.", dir=Path(out_dir).parent))
    try:
        plan, encoder, parts = work / "plan.json", work / "encoder.json", work / "parts"
        plan_partitions(splits, tokenizer_dir, plan, encoder, settings)
        for split, part in partition_names(planned_partition_counts(plan)):
            shard_dir, part_manifest = partition_paths(parts, split, part)
            tokenize_partition(
                splits[split], plan, encoder, split, int(part), shard_dir, part_manifest, settings
            )
        return gather_shards(splits, tokenizer_dir, plan, parts, out_dir, manifest, settings)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def read_shards(shard_dir: Path) -> pa.Table:
    """All shards of one split, in order."""
    files = sorted(Path(shard_dir).glob("shard-*.parquet"))
    if not files:
        raise CorpusError(f"no shards in {shard_dir}")
    return pa.concat_tables(pq.read_table(f) for f in files)
