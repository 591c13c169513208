"""The tokenized data's format and contract.

On disk: one folder per split, holding shard-00000.parquet, shard-00001.parquet, ... in row
order. Causal LM rows have one column, input_ids (int32 lists); classification rows also carry
the document id and an integer label. The tokenize stage's manifest says what the rows mean
(block size, vocabulary, special ids, label names); `TokenizedData` is its one typed reader.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from snaketune.errors import CorpusError
from snaketune.fileio import PARQUET_ROW_GROUP_ROWS, read_json, sha256_file
from snaketune.names import CAUSAL_LM
from snaketune.settings import TokenizeJob, from_dict

LM_SCHEMA = pa.schema([("input_ids", pa.list_(pa.int32()))])
CLASSIFICATION_SCHEMA = pa.schema(
    [("doc_id", pa.string()), ("input_ids", pa.list_(pa.int32())), ("label", pa.int32())]
)
SHARD_GLOB = "shard-*.parquet"


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.parquet"


def split_dir(shards: Path, split: str) -> Path:
    """The folder of one split's shards."""
    return Path(shards) / split


def schema_for(task: str) -> pa.Schema:
    return LM_SCHEMA if task == CAUSAL_LM else CLASSIFICATION_SCHEMA


@dataclass
class ShardStats:
    file: str
    rows: int = 0
    tokens: int = 0
    sha256: str = ""


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
            self.shards.append(ShardStats(file=shard_name(len(self.shards))))
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


def read_shards(shard_dir: Path) -> pa.Table:
    """All shards of one split, in order."""
    files = sorted(Path(shard_dir).glob(SHARD_GLOB))
    if not files:
        raise CorpusError(f"no shards in {shard_dir}")
    return pa.concat_tables(pq.read_table(f) for f in files)


@dataclass(frozen=True)
class TokenizedData:
    """What training and evaluation need to know of the tokenized data: where each split's
    shards are and what their rows mean (the gather's manifest, typed)."""

    shards: Path
    job: TokenizeJob
    vocab_size: int
    pad_token_id: int
    eos_token_id: int | None
    label_names: list[str] = field(default_factory=list)

    @classmethod
    def read(cls, manifest: Path, shards: Path) -> TokenizedData:
        record = read_json(manifest)
        return cls(
            shards=Path(shards),
            job=from_dict(TokenizeJob, record["params"]),
            vocab_size=record["vocab_size"],
            pad_token_id=record["pad_token_id"],
            eos_token_id=record["eos_token_id"],
            label_names=record["label_names"],
        )

    @property
    def task(self) -> str:
        return self.job.task

    @property
    def block_size(self) -> int:
        """causal_lm: the rows' context length (per-document rows may all be shorter)."""
        return self.job.tokenize.block_size

    def split(self, name: str) -> Path:
        return split_dir(self.shards, name)
