"""The micro-batches made ahead on a background thread (snaketune.train.prefetch) are the ones the
rows make on the spot, their token counts too; a batch asked for under another key than the one
prepared (a micro-batch that shrank after running out of memory) is made on the spot."""

from __future__ import annotations

import numpy as np
import torch

from snaketune.evaluate.evaluation import CPU
from snaketune.names import TRAIN
from snaketune.tokenize.shards import TokenizedData
from snaketune.train.batches import TokenRows, batch_indices
from snaketune.train.prefetch import BatchesAhead, token_count


def train_rows(data: dict) -> TokenRows:
    tokenized = TokenizedData.read(data["tokenize_manifest"], data["shards"])
    return TokenRows.open(tokenized, TRAIN).with_targets()


def assert_same(batch: dict, expected: dict) -> None:
    assert batch.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(batch[name], tensor), name


def test_batches_made_ahead_are_the_ones_made_on_the_spot(lm_per_document_data):
    rows = train_rows(lm_per_document_data)  # rows of several lengths: padded and masked
    keys = [(step, micro) for step in range(4) for micro in range(2)]
    index = {key: batch_indices(*key, 6, 2, 7, len(rows)) for key in keys}
    ahead, masked = BatchesAhead(rows, CPU), 0
    try:
        for position, key in enumerate(keys):
            following = keys[position + 1] if position + 1 < len(keys) else None
            batch, tokens = ahead.take(key, index[key], following and (following, index[following]))
            expected = rows.batch(index[key])
            assert_same(batch, expected)
            assert tokens == token_count(expected)
            masked += "attention_mask" in expected
            if following:
                assert ahead.pending is not None and ahead.pending[0] == following
    finally:
        ahead.close()
    assert masked  # padded rows were among them: their masks and token counts were compared


def test_a_batch_under_another_key_than_the_prepared_one_is_made_on_the_spot(
    lm_per_document_data,
):
    rows = train_rows(lm_per_document_data)
    first, prepared, asked = np.arange(4), np.arange(4, 8), np.arange(4, 6)
    ahead = BatchesAhead(rows, CPU)
    try:
        ahead.take("first", first, ("prepared", prepared))
        batch, tokens = ahead.take("smaller", asked, None)
        assert_same(batch, rows.batch(asked))
        assert tokens == token_count(rows.batch(asked)) and ahead.pending is None
    finally:
        ahead.close()
