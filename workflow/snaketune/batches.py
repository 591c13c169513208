"""Training data in memory: padded token rows, and the order batches are drawn in.

The order is a pure function of (seed, step, rank), so a resumed or multi-process run sees
exactly the batches an uninterrupted single-process run would.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from snaketune.names import CAUSAL_LM
from snaketune.tokenize.shards import read_shards

IGNORED_LABEL = -100  # the label transformers' losses skip


@dataclass
class Examples:
    """One split in memory: padded ids, attention mask and (for classification) labels."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return self.input_ids.size(0)

    def with_targets(self) -> Examples:
        """Causal LM rows with a token to predict: a per-document row of one token (a
        document's EOS cut off by the block size) has none, and a batch of only such rows would
        have no loss."""
        keep = self.attention_mask.sum(dim=1) >= 2
        if bool(keep.all()):
            return self
        return Examples(self.input_ids[keep], self.attention_mask[keep], self.labels[keep])

    def batch(self, index: np.ndarray) -> dict[str, torch.Tensor]:
        idx = torch.as_tensor(index)
        mask = self.attention_mask[idx]
        width = int(mask.sum(dim=1).max())  # trim padding shared by the whole batch
        batch = {
            "input_ids": self.input_ids[idx, :width],
            "labels": self.labels[idx] if self.labels.dim() == 1 else self.labels[idx, :width],
        }
        mask = mask[:, :width]
        # A mask of all ones says nothing, and without one attention takes its causal fast
        # path (packed LM blocks never need one).
        if not bool(mask.all()):
            batch["attention_mask"] = mask
        return batch


def load_examples(shard_dir: Path, task: str, pad_token_id: int) -> Examples:
    table = read_shards(shard_dir)
    rows = table.column("input_ids").combine_chunks()
    # Straight from Arrow's offsets and values: no Python object per row or per token.
    lengths = np.diff(rows.offsets.to_numpy())
    values = rows.flatten().to_numpy()
    real = np.arange(int(lengths.max())) < lengths[:, None]
    padded = np.full(real.shape, pad_token_id, dtype=np.int64)
    padded[real] = values  # row-major, so each row's ids land in its own leading columns
    ids, mask = torch.from_numpy(padded), torch.from_numpy(real.astype(np.int64))
    if task == CAUSAL_LM:
        # Every token is a target; padding (rows of per-document packing) is not.
        return Examples(ids, mask, ids.masked_fill(mask == 0, IGNORED_LABEL))
    labels = torch.tensor(table.column("label").to_pylist(), dtype=torch.long)
    return Examples(ids, mask, labels)


def batch_indices(
    step: int,
    micro: int,
    batch_size: int,
    grad_accum: int,
    seed: int,
    n: int,
    world: int = 1,
    rank: int = 0,
) -> np.ndarray:
    """Example indices of one process's micro-batch: a fresh seeded permutation per epoch.

    A step consumes batch_size * world * grad_accum examples; process `rank` takes its slice,
    so K processes with batch B see the same examples per step as one process with batch K*B.
    """
    per_micro = batch_size * world
    start = step * per_micro * grad_accum + micro * per_micro + rank * batch_size
    positions = np.arange(start, start + batch_size)
    epochs, offsets = positions // n, positions % n
    out = np.empty_like(positions)
    for epoch in np.unique(epochs):
        perm = np.random.default_rng([seed, int(epoch)]).permutation(n)
        out[epochs == epoch] = perm[offsets[epochs == epoch]]
    return out
