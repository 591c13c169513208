"""The causal LM's baseline: an interpolated Kneser-Ney bigram over token ids, counted on the
train split's token stream and scored on the test split's, the same stream, tokenizer and
targets as the model's perplexity (each stream after one EOS, every token predicted once).

    P(w | v) = max(c(v, w) - D, 0) / c(v) + D * N1+(v .) / c(v) * P_cont(w)   when c(v) > 0
    P(w | v) = P_cont(w)                                                       otherwise
    P_cont(w) = (N1+(. w) + 1) / (N1+(. .) + V)

c counts bigrams and contexts, N1+(v .) is the number of distinct tokens seen after v,
N1+(. w) the number of distinct tokens seen before w, N1+(. .) the number of distinct bigrams
and V the vocabulary; the add-one in P_cont gives a token never seen in training a probability.
Each P(. | v) sums to one. Counting goes a chunk of the stream at a time (np.unique, then a
merge), so memory grows with the distinct bigrams, not with the corpus.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

DISCOUNT = 0.75
CHUNK_TOKENS = 1 << 22


@dataclass(frozen=True)
class BigramCounts:
    vocab: int
    codes: np.ndarray
    """Sorted distinct bigrams, each as previous * vocab + next (int64)."""
    counts: np.ndarray
    """How often each occurs."""

    @property
    def previous(self) -> np.ndarray:
        return self.codes // self.vocab

    def context_counts(self) -> np.ndarray:
        """c(v) for every token v."""
        return np.bincount(self.previous, weights=self.counts, minlength=self.vocab)

    def successors(self) -> np.ndarray:
        """N1+(v .) for every token v."""
        return np.bincount(self.previous, minlength=self.vocab)

    def continuation(self) -> np.ndarray:
        """P_cont(w) for every token w (add-one over the vocabulary)."""
        before = np.bincount(self.codes % self.vocab, minlength=self.vocab)
        return (before + 1.0) / (len(self.codes) + self.vocab)


def bigrams(stream: np.ndarray, start_token: int, vocab: int):
    """(codes) of the stream's bigrams a chunk at a time, the first after start_token."""
    previous = start_token
    for begin in range(0, len(stream), CHUNK_TOKENS):
        chunk = np.asarray(stream[begin : begin + CHUNK_TOKENS], dtype=np.int64)
        before = np.concatenate([[previous], chunk[:-1]]).astype(np.int64)
        previous = int(chunk[-1])
        yield before * vocab + chunk


def count_bigrams(stream: np.ndarray, start_token: int, vocab: int) -> BigramCounts:
    codes, counts = np.empty(0, np.int64), np.empty(0, np.int64)
    for chunk in bigrams(stream, start_token, vocab):
        new, new_counts = np.unique(chunk, return_counts=True)
        merged, where = np.unique(np.concatenate([codes, new]), return_inverse=True)
        counts = np.bincount(where, weights=np.concatenate([counts, new_counts]))
        codes, counts = merged, counts.astype(np.int64)
    return BigramCounts(vocab, codes, counts)


def kneser_ney_nll(
    counts: BigramCounts, stream: np.ndarray, start_token: int, scored: np.ndarray | None = None
) -> float:
    """Sum of -ln P(w | v) over every token of the stream (the first after start_token), or over
    the tokens `scored` marks (a 0/1 array as long as the stream: instruction data's answers)."""
    contexts, successors = counts.context_counts(), counts.successors()
    continuation = counts.continuation()
    total = 0.0
    for index, codes in enumerate(bigrams(stream, start_token, counts.vocab)):
        previous, following = codes // counts.vocab, codes % counts.vocab
        at = np.searchsorted(counts.codes, codes)
        at_clipped = np.minimum(at, len(counts.codes) - 1)
        seen = (at < len(counts.codes)) & (counts.codes[at_clipped] == codes)
        pair = np.where(seen, counts.counts[at_clipped], 0)
        context = contexts[previous]
        known = context > 0
        safe = np.where(known, context, 1.0)
        interpolated = (
            np.maximum(pair - DISCOUNT, 0.0) / safe
            + DISCOUNT * successors[previous] / safe * continuation[following]
        )
        probability = np.where(known, interpolated, continuation[following])
        nll = -np.log(probability)
        if scored is not None:
            begin = index * CHUNK_TOKENS
            nll = nll[np.asarray(scored[begin : begin + len(codes)], dtype=bool)]
        total += float(nll.sum())
    return total


def bigram_baseline(
    train: np.ndarray,
    test: np.ndarray,
    start_token: int,
    vocab: int,
    answers: np.ndarray | None = None,
) -> dict:
    """The baseline's perplexity on the test stream, as the evaluate stage reports it; with
    `answers` (instruction data: 1 for each answer token of the test stream) also on the
    answers alone, as the model's answer_perplexity is."""
    if len(test) == 0 or len(train) == 0:
        return {"skipped": "the train or the test split has no tokens"}
    counts = count_bigrams(train, start_token, vocab)
    nll = kneser_ney_nll(counts, test, start_token)
    out = {
        "perplexity": math.exp(nll / len(test)),
        "predicted_tokens": len(test),
        "discount": DISCOUNT,
        "method": "interpolated Kneser-Ney bigram over token ids, counted on the train split",
    }
    if answers is not None and (answer_tokens := int(np.count_nonzero(answers))):
        answer_nll = kneser_ney_nll(counts, test, start_token, answers)
        out.update(
            answer_perplexity=math.exp(answer_nll / answer_tokens), answer_tokens=answer_tokens
        )
    return out
