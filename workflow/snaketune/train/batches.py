"""Batches of token rows, gathered from the memory-mapped arrays of one split per step, and the
order they are drawn in.

Nothing is loaded up front: a batch reads only its own rows' pages, pads them to the longest
row of the batch and masks the padding, so memory does not grow with the corpus and training
processes on one machine share the pages. The order is a pure function of (seed, step, rank),
so a resumed or multi-process run sees exactly the batches an uninterrupted single-process run
would.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import numpy as np
import torch

from snaketune.tasks import task_of
from snaketune.tokenize.shards import TokenArrays, TokenizedData

IGNORED_LABEL = -100  # the label transformers' losses skip


@dataclass(frozen=True)
class TokenRows:
    """Rows of one split: all of them, or those listed in `rows` (row numbers, in order)."""

    arrays: TokenArrays
    task: str
    pad_token_id: int
    rows: np.ndarray | None = None
    separator: int | None = None
    """Plain-text documents kept apart (tokenize.packing: documents_apart): the token, EOS,
    at which each document's run of positions starts. The EOS that ends a document opens the
    next one's, as one EOS opens the stream the evaluation scores, so that every token is still
    a target and the first token of a document is predicted from that EOS alone."""

    @classmethod
    def open(cls, data: TokenizedData, split: str) -> TokenRows:
        separator = data.eos_token_id if data.job.keeps_documents_apart else None
        return cls(data.arrays(split), data.task, data.pad_token_id, separator=separator)

    def __len__(self) -> int:
        return len(self.arrays) if self.rows is None else len(self.rows)

    def numbers(self, index: np.ndarray) -> np.ndarray:
        index = np.asarray(index, dtype=np.int64)
        return index if self.rows is None else self.rows[index]

    def lengths(self) -> np.ndarray:
        lengths = np.diff(self.arrays.offsets)
        return lengths if self.rows is None else lengths[self.rows]

    def with_targets(self) -> TokenRows:
        """Causal LM rows with a token to predict: a per-document row of one token (a
        document's EOS cut off by the block size) has none, and a batch of only such rows would
        have no loss."""
        predictable = self.lengths() >= 2
        if self.arrays.targets is not None:  # instruction rows: a response token to predict
            predictable &= self.target_counts() > 0
        keep = np.flatnonzero(predictable)
        return self if len(keep) == len(self) else replace(self, rows=self.numbers(keep))

    def last_tokens(self) -> np.ndarray:
        """Each row's last token (instruction rows: an answer's EOS, unless block_size cut the
        answer short)."""
        offsets = np.asarray(self.arrays.offsets, dtype=np.int64)
        ends = offsets[1:] if self.rows is None else offsets[1:][self.rows]
        return np.asarray(self.arrays.tokens[ends - 1])

    def target_counts(self) -> np.ndarray:
        """Instruction rows: the targets of each row past its first token (which nothing
        predicts)."""
        offsets = np.asarray(self.arrays.offsets, dtype=np.int64)
        cumulative = np.concatenate([[0], np.cumsum(self.arrays.targets, dtype=np.int64)])
        counts = cumulative[offsets[1:]] - cumulative[offsets[:-1] + 1]
        return counts if self.rows is None else counts[self.rows]

    def batch(self, index: np.ndarray) -> dict[str, torch.Tensor]:
        """The rows at `index`, padded to the longest of them; padding is masked (and, for the
        LM, no target). A batch without padding carries no mask: attention then takes its causal
        fast path (packed LM blocks never need one)."""
        numbers = self.numbers(index)
        starts = np.asarray(self.arrays.offsets[numbers], dtype=np.int64)
        lengths = np.asarray(self.arrays.offsets[numbers + 1], dtype=np.int64) - starts
        width = int(lengths.max())
        real = np.arange(width) < lengths[:, None]
        positions = np.where(real, starts[:, None] + np.arange(width), starts[:, None])
        ids = self.arrays.tokens[positions].astype(np.int64)
        ids[~real] = self.pad_token_id
        input_ids = torch.from_numpy(ids)
        position_ids = None
        if task_of(self.task).predicts_tokens:
            ignored = ~real
            if self.arrays.targets is not None:  # instruction data: the response's tokens only
                targets = self.arrays.targets[positions].astype(bool) & real
                ignored |= ~targets
                position_ids = example_positions(targets, real)
            elif self.separator is not None:
                position_ids = document_positions(ids, real, self.separator)
            labels = input_ids.masked_fill(torch.from_numpy(ignored), IGNORED_LABEL)
        else:
            labels = torch.from_numpy(self.arrays.labels[numbers].astype(np.int64))
        batch = {"input_ids": input_ids, "labels": labels}
        if position_ids is not None:
            # Packed examples (or documents): positions that restart per example, from which
            # the model masks attention at example boundaries (transformers does so only
            # without an attention mask; right padding needs none under a causal mask, see
            # snaketune.train.lean_gpt).
            batch["position_ids"] = torch.from_numpy(position_ids)
        elif not real.all():
            batch["attention_mask"] = torch.from_numpy(real.astype(np.int64))
        return batch

    def stream(self) -> np.ndarray:
        """Every token of the rows, end to end (for all rows, the memory-mapped array itself)."""
        if self.rows is None:
            return self.arrays.tokens
        return np.concatenate([self.arrays.tokens[a:b] for a, b in self.spans()])

    def spans(self) -> list[tuple[int, int]]:
        offsets = self.arrays.offsets
        return [(int(offsets[r]), int(offsets[r + 1])) for r in self.numbers(np.arange(len(self)))]

    def labels(self) -> np.ndarray:
        return np.asarray(self.arrays.labels[self.numbers(np.arange(len(self)))], dtype=np.int64)

    def width(self) -> int:
        """The longest row."""
        return int(self.lengths().max()) if len(self) else 0


def example_positions(targets: np.ndarray, real: np.ndarray) -> np.ndarray | None:
    """Position ids that restart at 0 where each instruction example starts, when a row of the
    batch holds more than one (packed rows); None when none does. An example is its prompt's
    tokens (never targets) then its response's (targets), so one starts at every non-target
    token that follows a target, and at each row's first token; the padding after the last
    example starts one more, which no real position attends to."""
    after_target = np.zeros_like(targets)
    after_target[:, 1:] = targets[:, :-1]
    return restarting_positions(~targets & after_target, real)


def document_positions(ids: np.ndarray, real: np.ndarray, separator: int) -> np.ndarray | None:
    """Position ids that restart at each separator (EOS) of a batch of rows, which opens the
    next document's run (TokenRows.separator); None when no row holds more than one run."""
    return restarting_positions((ids == separator) & real, real)


def restarting_positions(starts: np.ndarray, real: np.ndarray) -> np.ndarray | None:
    """Positions that restart at 0 at each of `starts` and at each row's first token; None when
    no row's real tokens hold more than one run. The padding after a row's last run continues
    it, which no real position attends to under the causal mask."""
    starts = starts.copy()
    starts[:, 0] = True
    if int((starts & real).sum(axis=1).max()) <= 1:
        return None
    index = np.arange(starts.shape[1])
    last_start = np.maximum.accumulate(np.where(starts, index, 0), axis=1)
    return index - last_start


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
        out[epochs == epoch] = epoch_order(seed, int(epoch), n)[offsets[epochs == epoch]]
    return out


@functools.lru_cache(maxsize=2)
def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """The order of one epoch's examples; made once per epoch, not once per step."""
    order = np.random.default_rng([seed, epoch]).permutation(n)
    order.flags.writeable = False
    return order
