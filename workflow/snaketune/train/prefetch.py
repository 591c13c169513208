"""The next micro-batch, made ready while the current one trains.

A step's host work before its first kernel is reading its rows from the memory-mapped arrays,
padding them and (on CUDA) copying them to the device from pinned memory. For a small model the
GPU finishes a step before the host has prepared the next, and waits. `BatchesAhead` does that
work for micro-batch k + 1 on a background thread while micro-batch k runs: on CUDA the copy
goes through its own stream, which the training stream waits on only when it takes the batch.
The batches are the ones TokenRows.batch makes for the same rows (a pure function of the step),
so what training computes does not change; a batch asked for under another key than the one
prepared (the micro-batch shrank after running out of memory) is made on the spot. The number
of tokens of a batch is counted on the host, before the copy: reading it from the device would
wait for the GPU.
"""

from __future__ import annotations

from collections.abc import Hashable
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch

from snaketune.train.batches import TokenRows
from snaketune.train.devices import Placement, to_device

Batch = dict[str, torch.Tensor]


def token_count(batch: Batch) -> int:
    """The real tokens of a host batch: its attention mask's, or every position."""
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else batch["input_ids"].numel()


class BatchesAhead:
    """Micro-batches of `rows` by key, each made while the one before it trains."""

    def __init__(self, rows: TokenRows, placement: Placement):
        self.rows, self.placement = rows, placement
        self.pool: ThreadPoolExecutor | None = None  # started by the first batch made ahead
        self.stream = torch.cuda.Stream(placement.device) if placement.cuda else None
        self.pending: tuple[Hashable, Future] | None = None

    def take(
        self,
        key: Hashable,
        index: np.ndarray,
        following: tuple[Hashable, np.ndarray] | None,
    ) -> tuple[Batch, int]:
        """The batch of rows `index` under `key` (on the device), and its token count; then
        starts making the `following` (key, its rows) one."""
        if self.pending is not None and self.pending[0] == key:
            batch, tokens = self.pending[1].result()
        else:
            batch, tokens = self.load(index)
        self.pending = None
        if self.stream is not None:  # the copy made on the side stream is done before use
            current = torch.cuda.current_stream(self.placement.device)
            current.wait_stream(self.stream)
            for tensor in batch.values():
                tensor.record_stream(current)
        if following is not None:
            if self.pool is None:
                self.pool = ThreadPoolExecutor(1, thread_name_prefix="next-batch")
            next_key, next_index = following
            self.pending = (next_key, self.pool.submit(self.load, next_index))
        return batch, tokens

    def load(self, index: np.ndarray) -> tuple[Batch, int]:
        batch = self.rows.batch(index)
        tokens = token_count(batch)
        if self.stream is None:
            return batch, tokens
        with torch.cuda.stream(self.stream):
            return to_device(batch, self.placement), tokens

    def close(self) -> None:
        """Stops the thread (a later batch starts another)."""
        self.pending = None
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None
