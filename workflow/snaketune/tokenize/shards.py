"""The tokenized data's format and contract.

On disk: one folder per split, holding shard-00000.parquet, shard-00001.parquet, ... in row
order (the interchange format). Causal LM rows have one column, input_ids (int32 lists);
classification rows also carry the document id and an integer label. Beside them the same rows
as flat arrays that training and evaluation map into memory instead of loading (`TokenArrays`):
every row's tokens end to end (tokens.bin, uint16 when the vocabulary fits, else uint32), where
each row starts (offsets.bin, rows + 1 int64) and the labels (labels.bin, int32). Pages are read
as batches need them, and processes on one machine share them, so memory does not grow with the
corpus. The tokenize stage's manifest says what the rows mean (block size, vocabulary, special
ids, label names, the token dtype); `TokenizedData` is its one typed reader.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from snaketune.errors import CorpusError
from snaketune.fileio import PARQUET_ROW_GROUP_ROWS, read_json, sha256_file
from snaketune.settings import from_dict
from snaketune.tasks import task_of
from snaketune.tokenize.settings import TokenizeJob

LM_SCHEMA = pa.schema([("input_ids", pa.list_(pa.int32()))])
INSTRUCTION_SCHEMA = LM_SCHEMA.append(pa.field("targets", pa.list_(pa.bool_())))
CLASSIFICATION_SCHEMA = pa.schema(
    [("doc_id", pa.string()), ("input_ids", pa.list_(pa.int32())), ("label", pa.int32())]
)
SHARD_GLOB = "shard-*.parquet"
TOKENS, OFFSETS, LABELS, TARGETS = "tokens.bin", "offsets.bin", "labels.bin", "targets.bin"
ARRAY_BATCH_ROWS = 8192  # rows read from the shards at a time when the arrays are written


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.parquet"


def split_dir(shards: Path, split: str) -> Path:
    """The folder of one split's shards."""
    return Path(shards) / split


def schema_for(task: str, instruction: bool = False) -> pa.Schema:
    if not task_of(task).predicts_tokens:
        return CLASSIFICATION_SCHEMA
    return INSTRUCTION_SCHEMA if instruction else LM_SCHEMA


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


def token_dtype(vocab_size: int) -> str:
    """The smallest unsigned integer type that holds every token id."""
    return "uint16" if vocab_size <= 2**16 else "uint32"


def write_arrays(split_folder: Path, shard_files: list[Path], dtype: str) -> int:
    """The flat arrays of one split's rows (see the module docstring), streamed from its shards
    a record batch at a time; returns the token count."""
    folder = Path(split_folder)
    with (
        open(folder / TOKENS, "wb") as tokens,
        open(folder / OFFSETS, "wb") as offsets,
        open(folder / LABELS, "wb") as labels,
        open(folder / TARGETS, "wb") as targets,
    ):
        written = 0
        offsets.write(np.zeros(1, np.int64).tobytes())
        for shard in shard_files:
            for batch in pq.ParquetFile(shard, pre_buffer=False).iter_batches(ARRAY_BATCH_ROWS):
                rows = batch.column("input_ids")
                starts = np.asarray(rows.offsets, dtype=np.int64)
                ids = rows.flatten().to_numpy()
                if len(ids) and int(ids.max()) > np.iinfo(dtype).max:  # astype would wrap
                    raise CorpusError(
                        f"{shard} holds token id {int(ids.max())}, beyond the {dtype} token "
                        "array sized by the tokenizer's vocabulary: the tokenizer's vocab_size "
                        "is wrong; retrain or fix the tokenizer (snakemake -R prepare_tokenizer)"
                    )
                tokens.write(ids.astype(dtype).tobytes())
                offsets.write((starts[1:] - starts[0] + written).tobytes())
                written += int(starts[-1] - starts[0])
                if "label" in batch.schema.names:
                    labels.write(batch.column("label").to_numpy().astype(np.int32).tobytes())
                if "targets" in batch.schema.names:
                    flags = batch.column("targets").flatten().to_numpy(zero_copy_only=False)
                    targets.write(flags.astype(np.uint8).tobytes())
    if (folder / TARGETS).stat().st_size == 0:  # rows without targets: every token is one
        (folder / TARGETS).unlink()
    return written


@dataclass(frozen=True)
class TokenArrays:
    """One split's rows mapped into memory (read-only)."""

    tokens: np.ndarray
    offsets: np.ndarray
    labels: np.ndarray | None
    targets: np.ndarray | None = None
    """Instruction data: 1 for each token that is a training target (a response's), else 0."""

    @classmethod
    def open(cls, split_folder: Path, dtype: str) -> TokenArrays:
        folder = Path(split_folder)
        if not (folder / OFFSETS).exists():
            raise CorpusError(
                f"{folder} has no {OFFSETS}: it was tokenized before the token arrays existed; "
                "rerun the tokenize stage (snakemake -R gather_shards)"
            )
        labels = mapped(folder / LABELS, np.int32)
        tokens, offsets = mapped(folder / TOKENS, dtype), mapped(folder / OFFSETS, np.int64)
        return cls(tokens, offsets, labels, mapped(folder / TARGETS, np.uint8))

    def __len__(self) -> int:
        return len(self.offsets) - 1


def mapped(path: Path, dtype) -> np.ndarray | None:
    """A file as a read-only array; an empty one (np.memmap refuses those) as an empty array."""
    if not path.exists():
        return None
    if path.stat().st_size == 0:
        return np.empty(0, dtype)
    return np.memmap(path, dtype=dtype, mode="r")


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
    token_dtype: str = "uint32"

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
            token_dtype=record.get("token_dtype", token_dtype(record["vocab_size"])),
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

    def arrays(self, name: str) -> TokenArrays:
        return TokenArrays.open(self.split(name), self.token_dtype)
