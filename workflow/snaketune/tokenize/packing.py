"""Rows from Encoded batches (snaketune.tokenize.encoder): numpy and Arrow over whole batches,
no Python work per document or token.

Causal LM: every document ends with EOS. With packing "across_documents" (the default) a
partition packs its documents into blocks of `block_size` tokens across document boundaries. A
partition's final remainder (shorter than a block) is dropped and counted as
dropped_remainder_tokens, so N partitions drop fewer than N * block_size tokens of a split; the
blocks are otherwise those of one pass over the split. With packing "per_document" a row never
holds two documents: each document is cut into rows of at most `block_size` tokens (its last
row may be shorter, counted as short_rows, and is padded only in the training batch), nothing is
dropped, and the rows are the same for any number of partitions.
Classification: one row per example, truncated to `max_length`, with an integer label.
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
    "per_document": "each document, ending with EOS, cut into rows of at most block_size tokens; "
    "no row holds two documents, a document's last row may be shorter (short_rows, padded and "
    "masked in training batches) and nothing is dropped",
    SEQUENCE_CLASSIFICATION: "one row per example, truncated to max_length",
}
"""What the rows of each layout (snaketune.settings.TokenizeJob.layout) are, for the manifest."""


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
