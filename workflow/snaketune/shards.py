"""Stage 5, tokenize_shards: turn each split into Parquet shards of token ids.

Causal LM: documents are joined with EOS and packed into blocks of `block_size` tokens across
document boundaries; only the final remainder of a split (shorter than a block) is dropped, and
the manifest says how many tokens that was. Classification: one row per example, truncated to
`max_length`, with an integer label. Text is read and shards are written in record batches, so
memory stays flat however large the split is.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from itertools import chain
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from snaketune.errors import CorpusError
from snaketune.fileio import atomic_dir, sha256_file, sha256_tree
from snaketune.manifest import stage_manifest
from snaketune.split import SPLITS

TASKS = ("causal_lm", "sequence_classification")


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


@dataclass
class ShardStats:
    file: str
    rows: int = 0
    tokens: int = 0
    sha256: str = ""


@dataclass
class SplitStats:
    rows: int = 0
    tokens: int = 0
    documents: int = 0
    truncated: int = 0
    dropped_remainder_tokens: int = 0
    shards: list[ShardStats] = field(default_factory=list)


class ShardWriter:
    """Writes tables into shard-00000.parquet, shard-00001.parquet, ... of at most `max_rows`."""

    def __init__(self, out_dir: Path, schema: pa.Schema, max_rows: int, stats: SplitStats):
        self.out_dir, self.schema, self.max_rows, self.stats = out_dir, schema, max_rows, stats
        self._writer: pq.ParquetWriter | None = None
        self._current: ShardStats | None = None

    def write(self, table: pa.Table) -> None:
        table = table.cast(self.schema)  # e.g. large_string from pandas -> the shard's string
        while table.num_rows:
            if self._current is None or self._current.rows >= self.max_rows:
                self._roll()
            room = self.max_rows - self._current.rows
            head, table = table.slice(0, room), table.slice(room)
            self._writer.write_table(head)
            self._current.rows += head.num_rows
            lengths = pc.list_value_length(head.column("input_ids"))
            self._current.tokens += int(pc.sum(lengths).as_py() or 0)

    def _roll(self) -> None:
        self.close()
        name = f"shard-{len(self.stats.shards):05d}.parquet"
        self._current = ShardStats(file=name)
        self._writer = pq.ParquetWriter(self.out_dir / name, self.schema)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._current.sha256 = sha256_file(self.out_dir / self._current.file)
            self.stats.shards.append(self._current)
            self.stats.rows += self._current.rows
            self.stats.tokens += self._current.tokens
            self._writer = self._current = None


def _text_batches(split_path: Path, columns: list[str], rows: int) -> Iterator[pa.RecordBatch]:
    yield from pq.ParquetFile(split_path).iter_batches(batch_size=rows, columns=columns)


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


def pack_split(
    split_path: Path, writer: ShardWriter, tokenizer, settings: TokenizeSettings
) -> None:
    block = settings.block_size
    backend = eos_appending(tokenizer)
    carry = np.empty(0, dtype=np.int32)
    for batch in _text_batches(split_path, ["text"], settings.read_batch_rows):
        encodings = backend.encode_batch(batch.column("text").to_pylist())
        writer.stats.documents += len(encodings)
        joined = np.fromiter(chain.from_iterable(e.ids for e in encodings), dtype=np.int32)
        carry = np.concatenate([carry, joined])
        n_blocks = len(carry) // block
        if n_blocks:
            blocks = carry[: n_blocks * block]
            carry = carry[n_blocks * block :]
            offsets = pa.array(np.arange(0, n_blocks * block + 1, block, dtype=np.int32))
            rows = pa.ListArray.from_arrays(offsets, pa.array(blocks))
            writer.write(pa.table({"input_ids": rows}))
    writer.stats.dropped_remainder_tokens = int(len(carry))


def encode_examples(
    split_path: Path,
    writer: ShardWriter,
    tokenizer,
    settings: TokenizeSettings,
    label_ids: dict[str, int],
) -> None:
    backend = truncating(tokenizer, settings.max_length)
    for batch in _text_batches(split_path, ["doc_id", "text", "label"], settings.read_batch_rows):
        encodings = backend.encode_batch(batch.column("text").to_pylist())
        labels = batch.column("label").to_pylist()
        unknown = sorted(set(labels) - set(label_ids))
        if unknown:
            raise CorpusError(
                f"labels {unknown} in {split_path.name} never occur in the train split"
            )
        writer.stats.documents += len(encodings)
        writer.stats.truncated += sum(bool(e.overflowing) for e in encodings)
        writer.write(
            pa.table(
                {
                    "doc_id": batch.column("doc_id"),
                    "input_ids": pa.array([e.ids for e in encodings], pa.list_(pa.int32())),
                    "label": pa.array([label_ids[y] for y in labels], pa.int32()),
                }
            )
        )


def label_vocabulary(train_split: Path) -> list[str]:
    labels = pq.read_table(train_split, columns=["label"]).column("label").drop_null()
    names = sorted(set(labels.to_pylist()))
    if len(names) < 2:
        raise CorpusError(
            f"sequence_classification needs at least two labels in the train split, found {names}; "
            "check the dataset's label_column"
        )
    return names


def tokenize_shards(
    splits: dict[str, Path],
    tokenizer_dir: Path,
    out_dir: Path,
    manifest: Path,
    settings: TokenizeSettings,
) -> dict[str, SplitStats]:
    from transformers import AutoTokenizer

    if settings.task not in TASKS:
        raise ValueError(f"task {settings.task!r} is not one of {TASKS}")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    inputs = {**splits, "tokenizer": tokenizer_dir}
    with stage_manifest("tokenize", manifest, inputs, asdict(settings)) as record:
        label_names = (
            label_vocabulary(splits["train"]) if settings.task == "sequence_classification" else []
        )
        stats: dict[str, SplitStats] = {}
        with atomic_dir(out_dir) as tmp:
            for name in SPLITS:
                (tmp / name).mkdir()
                stats[name] = _tokenize_one(
                    splits[name],
                    tmp / name,
                    tokenizer,
                    settings,
                    {n: i for i, n in enumerate(label_names)},
                )
        record.counts = {
            name: {k: v for k, v in asdict(s).items() if k != "shards"} for name, s in stats.items()
        }
        record.extra.update(
            {
                "tokenizer_sha256": sha256_tree(tokenizer_dir),
                "task": settings.task,
                "label_names": label_names,
                "pad_token_id": tokenizer.pad_token_id,
                "eos_token_id": tokenizer.eos_token_id,
                "vocab_size": len(tokenizer),
                "shards": {name: [asdict(s) for s in st.shards] for name, st in stats.items()},
                "packing": "documents joined with EOS and packed into block_size rows across "
                "document boundaries; each split's final partial block is dropped "
                "(dropped_remainder_tokens)"
                if settings.task == "causal_lm"
                else "one row per example, truncated to max_length",
            }
        )
    return stats


def _tokenize_one(
    split_path: Path,
    out_dir: Path,
    tokenizer,
    settings: TokenizeSettings,
    label_ids: dict[str, int],
) -> SplitStats:
    stats = SplitStats()
    if settings.task == "causal_lm":
        schema = pa.schema([("input_ids", pa.list_(pa.int32()))])
        writer = ShardWriter(out_dir, schema, settings.shard_rows, stats)
        pack_split(split_path, writer, tokenizer, settings)
    else:
        schema = pa.schema(
            [("doc_id", pa.string()), ("input_ids", pa.list_(pa.int32())), ("label", pa.int32())]
        )
        writer = ShardWriter(out_dir, schema, settings.shard_rows, stats)
        encode_examples(split_path, writer, tokenizer, settings, label_ids)
    writer.close()
    if stats.rows == 0:
        raise CorpusError(
            f"split {split_path.name} produced no rows"
            + (
                f" (fewer than block_size={settings.block_size} tokens; lower block_size or use "
                "more data)"
                if settings.task == "causal_lm"
                else ""
            )
        )
    return stats


def read_shards(shard_dir: Path) -> pa.Table:
    """All shards of one split, in order."""
    files = sorted(Path(shard_dir).glob("shard-*.parquet"))
    if not files:
        raise CorpusError(f"no shards in {shard_dir}")
    return pa.concat_tables(pq.read_table(f) for f in files)
