"""How well a causal LM predicts a token stream: every token scored exactly once.

The test split's tokens, end to end, after one EOS (the boundary before the first document), are
cut into windows of `context` tokens. With the default stride (context - 1) consecutive windows
share one token, so every token of the split is predicted once, with at least one token before
it; a smaller stride gives each token more context (the sliding-window estimate) and each is
still counted once, in the first window that predicts it. Windows of equal length go through
the model in batches on the evaluation device; the cross-entropy is taken in fp32 and summed in
float64, and read back once at the end.

Reported, as lm-evaluation-harness defines them: perplexity = exp(NLL / tokens),
word_perplexity = exp(NLL / words), byte_perplexity = exp(NLL / bytes), bits_per_byte = NLL /
(bytes ln 2). Words are the whitespace-separated words of the documents (a document boundary
separates words); bytes are the UTF-8 bytes of the documents' text, so the EOS that ends each
document is predicted but adds no byte. Where the text has no whitespace between its words
(Chinese, Japanese, ...), word perplexity means nothing and is null, with the reason.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from snaketune.metrics import perplexity, ratio
from snaketune.train.batches import document_positions
from snaketune.train.devices import Placement, to_device
from snaketune.train.lm_loss import target_scores

DECODE_CHUNK_TOKENS = 1 << 20


def byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-to-printable-character table, inverted: each character stands for one byte."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    chars, extra = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


def token_byte_lengths(tokenizer) -> np.ndarray:
    """UTF-8 bytes of text each token id stands for; special tokens (EOS) stand for none.

    Byte-level BPE tokens can hold part of a multi-byte character, which decodes to U+FFFD on
    its own; their length is read from the byte alphabet instead.
    """
    lengths = np.zeros(len(tokenizer), dtype=np.int64)
    special = set(tokenizer.all_special_ids)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    byte_level = backend is not None and "ByteLevel" in type(backend.decoder).__name__
    alphabet = byte_level_alphabet()
    for token, idx in tokenizer.get_vocab().items():
        if idx in special or idx >= len(lengths):
            continue
        if byte_level and all(ch in alphabet for ch in token):
            lengths[idx] = len(token)
        else:
            lengths[idx] = len(tokenizer.convert_tokens_to_string([token]).encode("utf-8"))
    return lengths


def windows(length: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first_target) of each window over a sequence of `length` tokens.

    Window k covers [k*stride, k*stride + context) and predicts the positions no earlier window
    predicted, so every position from 1 on is predicted once when stride < context.
    """
    out, scored_to = [], 1
    for begin in range(0, max(length - 1, 1), stride):
        end = min(begin + context, length)
        first = max(begin + 1, scored_to)
        if first < end:
            out.append((begin, end, first))
            scored_to = end
        if end == length:
            break
    return out


@dataclass
class Sums:
    """Running totals on the evaluation device, read back once."""

    nll: torch.Tensor
    tokens: torch.Tensor
    correct: torch.Tensor
    bytes: torch.Tensor
    by_position: torch.Tensor
    count_by_position: torch.Tensor

    @classmethod
    def zeros(cls, context: int, device: torch.device) -> Sums:
        def zero(*shape, dtype=torch.float64):
            return torch.zeros(shape, dtype=dtype, device=device)

        i64 = torch.int64
        return cls(
            zero(), zero(dtype=i64), zero(dtype=i64), zero(dtype=i64), zero(context), zero(context)
        )


def window_ids(stream: np.ndarray, prefix: int | None, group: list[tuple[int, int, int]]):
    """The tokens of each window of `group` (positions of the stream after the prefix token)."""
    size = group[0][1] - group[0][0]
    ids = np.empty((len(group), size), dtype=np.int64)
    for row, (begin, end, _) in enumerate(group):
        if prefix is None:
            ids[row] = stream[begin:end]
        elif begin == 0:
            ids[row, 0], ids[row, 1:] = prefix, stream[: end - 1]
        else:
            ids[row] = stream[begin - 1 : end - 1]
    return torch.from_numpy(ids)


def add_group(
    model,
    sums: Sums,
    ids,
    group,
    byte_lengths: torch.Tensor,
    placement: Placement,
    separator: int | None = None,
):
    """Add one batch of equal-length windows to the sums. Position j predicts token j + 1;
    the last position predicts nothing (its target is a placeholder the mask drops). The
    scores come a chunk of positions at a time (snaketune.train.lm_loss), never the whole logits."""
    inputs = {}
    if separator is not None:
        positions = document_positions(ids.numpy(), np.ones(ids.shape, dtype=bool), separator)
        if positions is not None:
            inputs["position_ids"] = torch.from_numpy(positions)
    size = ids.size(1)
    begins = torch.tensor([begin for begin, _, _ in group])
    firsts = torch.tensor([first for _, _, first in group])
    # Target j is sequence position begin + 1 + j: scored when >= first (and j < size - 1).
    positions = begins[:, None] + 1 + torch.arange(size)[None, :]
    mask = positions >= firsts[:, None]
    mask[:, -1] = False
    targets = torch.cat([ids[:, 1:], torch.zeros_like(ids[:, :1])], dim=1)
    on_device = to_device({"input_ids": ids, "targets": targets, "mask": mask, **inputs}, placement)
    mask, targets = on_device.pop("mask"), on_device["targets"]
    with placement.autocasting():
        nll, top = target_scores(model, **on_device)
    nll = nll.double() * mask
    sums.nll += nll.sum()
    sums.tokens += mask.sum()
    sums.correct += (top & mask).sum()
    sums.bytes += (byte_lengths[targets] * mask).sum()
    sums.by_position[1:size] += nll[:, :-1].sum(dim=0)
    sums.count_by_position[1:size] += mask[:, :-1].sum(dim=0)


@torch.no_grad()
def score_lm(
    model,
    stream: np.ndarray,
    context: int,
    stride: int,
    batch_size: int,
    byte_lengths: np.ndarray,
    placement: Placement,
    prefix: int | None = None,
    separator: int | None = None,
) -> dict:
    """NLL of every token of `stream` (a memory-mapped array is read a window at a time),
    after the `prefix` token when one is given. With a `separator` (documents kept apart) a
    window's positions restart at each separator token, so no token sees an earlier document
    (snaketune.train.batches.TokenRows.separator)."""
    model.eval()
    length = len(stream) + (prefix is not None)
    sums = Sums.zeros(context, placement.device)
    lengths_on_device = torch.as_tensor(byte_lengths, device=placement.device)
    spans = windows(length, context, stride)
    # Windows of equal length are batched; the tail window may be shorter.
    for size in sorted({end - begin for begin, end, _ in spans}, reverse=True):
        same = [w for w in spans if w[1] - w[0] == size]
        for i in range(0, len(same), batch_size):
            group = same[i : i + batch_size]
            ids = window_ids(stream, prefix, group)
            add_group(model, sums, ids, group, lengths_on_device, placement, separator)
    nll, tokens = float(sums.nll), int(sums.tokens)
    n_bytes = int(sums.bytes)
    mean_by_position = (sums.by_position / sums.count_by_position.clamp(min=1)).cpu()
    bits = ratio(nll / math.log(2), n_bytes)
    scored = {
        "perplexity": perplexity(nll, tokens),
        "nll_sum": nll,
        "nll_per_token": ratio(nll, tokens),
        "next_token_accuracy": ratio(int(sums.correct), tokens),
        "bits_per_byte": bits,
        "byte_perplexity": perplexity(nll, n_bytes),
        "predicted_tokens": tokens,
        "scored_bytes": n_bytes,
        "nll_by_position": mean_by_position[1:].tolist(),
    }
    if not tokens:
        scored["perplexity_note"] = "the text has no token to predict: nothing was scored"
    return scored


LONG_PIECE = 20
"""Characters of a whitespace-separated piece past which it is no word: text whose characters
are mostly in such pieces (Chinese, Japanese, Thai, ...) has no whitespace word boundaries,
however many short pieces a template adds around it."""


@dataclass(frozen=True)
class WordCount:
    words: int
    """Whitespace-separated pieces of the documents' text."""
    chars: int
    unspaced_chars: int
    """Characters in pieces longer than LONG_PIECE."""


def count_words(tokenizer, stream: np.ndarray, separator: int | None) -> WordCount:
    """The words of the documents' text: each document decoded on its own (the separator
    token, EOS, ends one), a chunk of the stream at a time."""
    words = chars = unspaced = 0
    start = 0
    while start < len(stream):
        end = min(start + DECODE_CHUNK_TOKENS, len(stream))
        chunk = np.asarray(stream[start:end])
        if separator is not None and end < len(stream):
            cut = np.flatnonzero(chunk == separator)
            end = start + int(cut[-1]) + 1 if len(cut) else end
            chunk = chunk[: end - start]
        splits = np.flatnonzero(chunk == separator) + 1 if separator is not None else []
        for document in np.split(chunk, splits):
            pieces = tokenizer.decode(document.tolist(), skip_special_tokens=True).split()
            words += len(pieces)
            chars += sum(map(len, pieces))
            unspaced += sum(len(piece) for piece in pieces if len(piece) > LONG_PIECE)
        start = end
    return WordCount(words, chars, unspaced)


def word_perplexity(nll_sum: float, counted: WordCount) -> tuple[float | None, str]:
    if not counted.words or counted.unspaced_chars * 2 > counted.chars:
        return None, (
            f"no whitespace word boundaries in the text ({counted.unspaced_chars} of its "
            f"{counted.chars} non-space characters are in pieces longer than {LONG_PIECE} "
            f"characters, of {counted.words} pieces); word perplexity is not defined for it"
        )
    return perplexity(nll_sum, counted.words), ""
