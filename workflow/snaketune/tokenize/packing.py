"""Rows from Encoded batches (snaketune.tokenize.encoder): numpy and Arrow over whole batches,
no Python work per document or token.

Causal LM: every document ends with EOS. With packing "across_documents" (the default) a
partition packs its documents into blocks of `block_size` tokens across document boundaries. A
partition's final remainder (shorter than a block) is dropped and counted as
dropped_remainder_tokens, so N partitions drop fewer than N * block_size tokens of a split; the
blocks are otherwise those of one pass over the split. With packing "per_document" a row never
holds two documents: each document is cut into rows of at most `block_size` tokens (its last
row may be shorter, counted as short_rows, and is padded only in the training batch), nothing is
dropped, and the rows are the same for any number of partitions. Packing "documents_apart" makes
the rows of "across_documents"; the batches then keep the documents apart
(snaketune.train.batches.TokenRows.separator).
Classification: one row per example, truncated to `max_length`, with an integer label.

Instruction data (a causal LM trained on answers only): every example is its prompt's tokens
then its response's, ending with EOS, and its rows carry `targets`, true for the response's
tokens: the prompt's are context, never a target (their labels are -100 in training batches).
No example is ever split across rows, so no response token loses its prompt: an example longer
than `block_size` keeps its first block_size tokens (counted as truncated), and with
"across_documents" whole examples are packed greedily, in order, into rows of at most
block_size tokens (a row is closed when the next example does not fit; nothing is dropped);
training keeps them apart (snaketune.train.batches.example_positions), so each starts with a prompt
token.
The val and test splits keep one example per row whatever the packing, so that each answer is
scored given its own prompt and nothing before it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from snaketune.errors import CorpusError
from snaketune.names import SEQUENCE_CLASSIFICATION
from snaketune.tokenize.shards import ShardWriter

PACKING = {
    "across_documents": "documents joined with EOS and packed into block_size rows across "
    "document boundaries within each partition; each partition's final partial block is dropped "
    "(dropped_remainder_tokens)",
    "documents_apart": "documents joined with EOS and packed into block_size rows across "
    "document boundaries within each partition, as across_documents; training and evaluation "
    "keep them apart (position ids restart at each EOS, attention stops there); each "
    "partition's final partial block is dropped (dropped_remainder_tokens)",
    "per_document": "each document, ending with EOS, cut into rows of at most block_size tokens; "
    "no row holds two documents, a document's last row may be shorter (short_rows, padded and "
    "masked in training batches) and nothing is dropped",
    "instruction_per_document": "instruction examples (prompt then response, ending with EOS), "
    "one per row, the first block_size tokens of longer ones kept (truncated); targets mark the "
    "response's tokens, the only ones trained and scored",
    "instruction_across_documents": "train: whole instruction examples (prompt then response, "
    "ending with EOS) packed greedily into rows of at most block_size tokens, an example never "
    "split across rows (longer ones keep their first block_size tokens, truncated); val and "
    "test: one example per row; targets mark the response's tokens, the only ones trained and "
    "scored",
    SEQUENCE_CLASSIFICATION: "one row per example, truncated to max_length",
}
"""What the rows of each layout (settings.TokenizeJob.layout) are, for the manifest."""


@dataclass
class PartitionCounts:
    documents: int = 0
    rows: int = 0
    tokens: int = 0
    truncated: int = 0
    dropped_remainder_tokens: int = 0
    short_rows: int = 0


def pack_blocks(encoded: Iterator[tuple], writer: ShardWriter, block: int) -> PartitionCounts:
    counts = PartitionCounts()
    carry = np.empty(0, dtype=np.int32)
    for _, batch in encoded:
        counts.documents += len(batch.lengths)
        stream = np.concatenate([carry, batch.ids])
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
    for _, batch in encoded:
        counts.documents += len(batch.lengths)
        ids, lengths = batch.ids, batch.lengths
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
        counts.documents += len(encodings.lengths)
        counts.truncated += encodings.truncated
        offsets = pa.array(encodings.offsets().astype(np.int32))
        ids = pa.ListArray.from_arrays(offsets, pa.array(encodings.ids))
        writer.write(
            pa.table({"doc_id": batch.column("doc_id"), "input_ids": ids, "label": label_ids})
        )
    return counts


# --- instruction examples --------------------------------------------------------------------


def cut_to_block(encoded, block: int):
    """Each example's first `block` tokens; and how many examples were longer."""
    lengths = encoded.lengths
    over = lengths > block
    if not over.any():
        return encoded, 0
    position = np.arange(len(encoded.ids)) - np.repeat(encoded.offsets()[:-1], lengths)
    keep = position < np.repeat(np.minimum(lengths, block), lengths)
    cut = type(encoded)(
        encoded.ids[keep], np.minimum(lengths, block), targets=encoded.targets[keep]
    )
    return cut, int(over.sum())


def example_rows(encoded, row_lengths: np.ndarray) -> pa.Table:
    offsets = pa.array(np.concatenate([[0], np.cumsum(row_lengths)]).astype(np.int32))
    return pa.table(
        {
            "input_ids": pa.ListArray.from_arrays(offsets, pa.array(encoded.ids)),
            "targets": pa.ListArray.from_arrays(offsets, pa.array(encoded.targets)),
        }
    )


def pack_examples(encoded: Iterator[tuple], writer: ShardWriter, block: int) -> PartitionCounts:
    """One instruction example per row (see the module docstring)."""
    counts = PartitionCounts()
    for _, batch in encoded:
        counts.documents += len(batch.lengths)
        batch, truncated = cut_to_block(batch, block)
        counts.truncated += truncated
        counts.short_rows += int(np.count_nonzero(batch.lengths < block))
        if len(batch.lengths):
            writer.write(example_rows(batch, batch.lengths))
    return counts


def greedy_rows(lengths: list[int], block: int) -> list[int]:
    """The row of each example, whole examples in order into rows of at most `block` tokens. A
    loop over ints: sequential by nature, and a tiny cost beside encoding (a million examples
    in about 0.2 s)."""
    rows, row, used = [], 0, 0
    for n in lengths:
        if used and used + n > block:
            row, used = row + 1, 0
        rows.append(row)
        used += n
    return rows


def joined(first, second):
    """Two Encoded batches of instruction examples as one."""
    return type(first)(
        np.concatenate([first.ids, second.ids]),
        np.concatenate([first.lengths, second.lengths]),
        targets=np.concatenate([first.targets, second.targets]),
    )


def refuse_promptless(batch) -> None:
    """Training tells packed examples apart where a prompt token follows an answer token
    (snaketune.train.batches.example_positions): an example must start with a prompt token."""
    starts_answered = np.flatnonzero(batch.targets[batch.offsets()[:-1]])
    if len(starts_answered):
        raise CorpusError(
            f"{len(starts_answered)} instruction example(s) have no prompt token (nothing "
            "of the text_template or chat template comes before the response), so packed "
            "examples could not be kept apart: put text before the response, or set "
            "tokenize.packing: per_document"
        )


def pack_whole_examples(
    encoded: Iterator[tuple], writer: ShardWriter, block: int
) -> PartitionCounts:
    """Whole instruction examples packed into rows (see the module docstring). The examples of
    the last, open row wait for the next batch, and are written at the end."""
    counts = PartitionCounts()
    open_row = None  # the examples of the row still open
    for _, batch in encoded:
        counts.documents += len(batch.lengths)
        batch, truncated = cut_to_block(batch, block)
        counts.truncated += truncated
        refuse_promptless(batch)
        batch = batch if open_row is None else joined(open_row, batch)
        if not len(batch.lengths):
            continue
        rows = np.asarray(greedy_rows(batch.lengths.tolist(), block))
        row_lengths = np.bincount(rows, weights=batch.lengths).astype(np.int64)
        closed, waiting = row_lengths[:-1], int(np.count_nonzero(rows == rows[-1]))
        tokens = int(closed.sum())
        if len(closed):
            head = type(batch)(batch.ids[:tokens], closed, targets=batch.targets[:tokens])
            writer.write(example_rows(head, closed))
            counts.short_rows += int(np.count_nonzero(closed < block))
        open_row = type(batch)(
            batch.ids[tokens:], batch.lengths[-waiting:], targets=batch.targets[tokens:]
        )
    if open_row is not None and len(open_row.ids):
        writer.write(example_rows(open_row, np.array([len(open_row.ids)])))
        counts.short_rows += int(len(open_row.ids) < block)
    return counts
