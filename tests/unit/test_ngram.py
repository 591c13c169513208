"""The causal LM's Kneser-Ney bigram baseline: hand-computed probabilities, distributions that
sum to one, chunked counting equal to counting at once (its place in the evaluate stage's
metrics, beside the model's perplexity on the same targets: tests/unit/test_evaluation.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from snaketune.evaluate import ngram
from snaketune.evaluate.ngram import bigram_baseline, count_bigrams, kneser_ney_nll

EOS, VOCAB = 0, 4
TRAIN = np.array([1, 2, 1, 3])
# After EOS: bigrams (0,1) (1,2) (2,1) (1,3), four distinct. c(0)=1, c(1)=2, c(2)=1, c(3)=0;
# distinct successors 1, 2, 1, 0; distinct predecessors of 0..3: 0, 2, 1, 1, so
# P_cont = (1, 3, 2, 2) / (4 + 4).


def probability(w: int, v: int) -> float:
    """P(w | v), as the scorer computes it for a one-token stream after v."""
    return math.exp(-kneser_ney_nll(count_bigrams(TRAIN, EOS, VOCAB), np.array([w]), v))


def test_probabilities_are_the_hand_computed_ones():
    assert probability(1, 0) == pytest.approx(0.25 / 1 + 0.75 * 1 / 1 * 3 / 8)  # seen pair
    assert probability(3, 1) == pytest.approx(0.25 / 2 + 0.75 * 2 / 2 * 2 / 8)
    assert probability(3, 0) == pytest.approx(0.75 * 1 / 1 * 2 / 8)  # pair never seen
    assert probability(0, 3) == pytest.approx(1 / 8)  # context never seen: P_cont alone


def test_the_perplexity_of_a_stream_is_its_tokens_mean():
    result = bigram_baseline(TRAIN, np.array([1, 3]), EOS, VOCAB)
    expected = math.exp(-(math.log(0.53125) + math.log(0.3125)) / 2)
    assert result["perplexity"] == pytest.approx(expected)
    assert result["predicted_tokens"] == 2


def test_answers_alone_are_scored_where_the_mask_says(monkeypatch):
    monkeypatch.setattr(ngram, "CHUNK_TOKENS", 2)  # the mask follows the stream across chunks
    test, answers = np.array([1, 3, 2, 1, 3]), np.array([0, 1, 0, 0, 1], dtype=np.uint8)
    result = bigram_baseline(TRAIN, test, EOS, VOCAB, answers)
    # Tokens 3 (after 1) and 3 (after 1): P(3 | 1) twice.
    assert result["answer_perplexity"] == pytest.approx(1 / probability(3, 1))
    assert result["answer_tokens"] == 2 and result["predicted_tokens"] == 5


def test_every_context_gives_a_distribution_that_sums_to_one():
    for v in range(VOCAB):
        assert sum(probability(w, v) for w in range(VOCAB)) == pytest.approx(1.0)


def test_counting_a_chunk_at_a_time_equals_counting_at_once(monkeypatch):
    stream = np.random.default_rng(0).integers(0, 50, size=5000)
    whole = count_bigrams(stream, EOS, 50)
    monkeypatch.setattr(ngram, "CHUNK_TOKENS", 333)
    chunked = count_bigrams(stream, EOS, 50)
    assert np.array_equal(whole.codes, chunked.codes)
    assert np.array_equal(whole.counts, chunked.counts)
    assert whole.counts.sum() == len(stream)
    test = np.random.default_rng(1).integers(0, 50, size=700)
    assert kneser_ney_nll(chunked, test, EOS) == pytest.approx(
        kneser_ney_nll(whole, test, EOS), rel=1e-12
    )


def test_an_empty_split_is_skipped_with_the_reason():
    assert "skipped" in bigram_baseline(np.array([], np.int64), TRAIN, EOS, VOCAB)
