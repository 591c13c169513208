"""Evaluation numbers checked against independent, straightforward computations."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_score

from snaketune.evaluate.evaluation import CPU, evaluate_model
from snaketune.evaluate.perplexity import (
    count_words,
    perplexity,
    score_lm,
    token_byte_lengths,
    word_perplexity,
)
from snaketune.evaluate.settings import EvalJob, EvalSettings
from snaketune.metrics import classification_metrics
from snaketune.tokenize.shards import read_shards
from tests.support.checkpoints import tiny_lm
from tests.support.stage_data import evaluate_paths


def stream_of(data: dict) -> np.ndarray:
    """The test split's tokens end to end, from the Parquet shards (not the token arrays)."""
    rows = read_shards(data["shards"] / "test").column("input_ids")
    return rows.combine_chunks().flatten().to_numpy().astype(np.int64)


def reference_nll(model, tokens: list[int], context: int, stride: int) -> tuple[float, int]:
    """The definition, written plainly: window by window, position by position, in float64;
    a token is scored in the first window where it has context and was not scored before."""
    total, count, scored = 0.0, 0, set()
    stream = torch.tensor(tokens)
    with torch.no_grad():
        for begin in range(0, stream.numel(), stride):
            window = stream[begin : begin + context]
            log_probs = torch.log_softmax(model(input_ids=window[None]).logits[0].double(), -1)
            for pos in range(1, window.numel()):
                index = begin + pos
                if index not in scored:
                    scored.add(index)
                    total -= float(log_probs[pos - 1, window[pos]])
                    count += 1
    return total, count


@pytest.mark.parametrize(("context", "stride"), [(32, 31), (32, 8), (24, 10)])
def test_perplexity_matches_an_independent_float64_loop(lm_data, context, stride):
    from transformers import AutoTokenizer

    info = json.loads(lm_data["tokenize_manifest"].read_text())
    model = tiny_lm(info, 32)
    tokenizer = AutoTokenizer.from_pretrained(lm_data["tokenizer"])
    eos = info["eos_token_id"]
    stream = stream_of(lm_data)[:700]
    stream = stream[: np.flatnonzero(stream == eos)[-1] + 1]  # whole documents
    lengths = token_byte_lengths(tokenizer)
    ours = score_lm(model, stream, context, stride, 7, lengths, CPU, prefix=eos)
    total, count = reference_nll(model, [eos, *stream.tolist()], context, stride)
    assert ours["predicted_tokens"] == count == len(stream)  # every token, the first too
    assert ours["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-6)
    # lm-evaluation-harness: bits per byte = NLL / (UTF-8 bytes of the text x ln 2), byte
    # perplexity = exp(NLL / bytes); the bytes here from decoding the documents themselves.
    text = tokenizer.decode(stream.tolist(), skip_special_tokens=True)
    n_bytes = len(text.encode("utf-8"))
    assert ours["scored_bytes"] == n_bytes
    assert ours["bits_per_byte"] == pytest.approx(total / (n_bytes * math.log(2)), rel=1e-6)
    assert ours["byte_perplexity"] == pytest.approx(math.exp(total / n_bytes), rel=1e-6)
    plain = score_lm(model, stream, context, stride, 7, lengths, CPU)  # no prefix token
    assert plain["predicted_tokens"] == len(stream) - 1


def test_words_and_bytes_are_those_of_the_documents(lm_data):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(lm_data["tokenizer"])
    eos = tokenizer.eos_token_id
    stream = stream_of(lm_data)
    documents, start = [], 0
    for end in [*np.flatnonzero(stream == eos), len(stream)]:
        documents.append(tokenizer.decode(stream[start:end].tolist(), skip_special_tokens=True))
        start = end + 1
    counted = count_words(tokenizer, stream, eos)
    assert counted.words == sum(len(d.split()) for d in documents)
    assert counted.chars == sum(len("".join(d.split())) for d in documents)
    assert counted.unspaced_chars < counted.chars / 100  # English: words are short
    lengths = token_byte_lengths(tokenizer)
    assert int(lengths[stream].sum()) == sum(len(d.encode("utf-8")) for d in documents)


CHINESE_ANSWERS = [
    "我们已经收到您的退款申请，款项将在三到五个工作日内退回到您的原支付账户，请耐心等待。",
    "您可以在账户设置页面中点击修改密码，然后按照提示输入新的密码并确认即可完成操作。",
]


def test_word_perplexity_is_null_without_whitespace_word_boundaries(lm_data):
    """Chinese answers in the default instruction template: the template's words ('Question:',
    'Answer:') are pieces too, but most characters are still in pieces no word is as long as."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(lm_data["tokenizer"])
    texts = [f"Question: 退款要多久？\nAnswer: {answer}" for answer in CHINESE_ANSWERS]
    eos = tokenizer.eos_token_id
    stream = np.array([t for text in texts for t in [*tokenizer.encode(text), eos]], dtype=np.int64)
    counted = count_words(tokenizer, stream, eos)
    assert counted.words == 8  # what a chars-per-word rule saw as words of 11 characters
    value, reason = word_perplexity(10.0, counted)
    assert value is None and "no whitespace word boundaries" in reason
    english = count_words(tokenizer, stream_of(lm_data), eos)
    assert word_perplexity(10.0, english)[0] == pytest.approx(math.exp(10.0 / english.words))


def test_perplexity_overflow_is_reported_as_infinity():
    assert perplexity(10.0, 5) == pytest.approx(math.exp(2.0))
    assert perplexity(1e6, 10) == math.inf


def test_nothing_scored_is_null_not_a_perfect_score():
    """exp(0 / 0) read as 1.0, a perfect perplexity, from no token at all."""
    assert perplexity(0.0, 0) is None
    empty = score_lm(torch.nn.Identity(), np.array([], dtype=np.int64), 8, 7, 4, np.ones(1), CPU)
    assert empty["perplexity"] is None and empty["next_token_accuracy"] is None
    assert empty["bits_per_byte"] is None and "nothing was scored" in empty["perplexity_note"]


def test_byte_lengths_cover_the_test_text(lm_data):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(lm_data["tokenizer"])
    lengths = token_byte_lengths(tokenizer)
    text = "Customer: my refund of $20.50 hasn't arrived – what's up?"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert int(lengths[ids].sum()) == len(text.encode("utf-8"))
    assert lengths[tokenizer.eos_token_id] == 0  # a document's end adds no byte


def test_classification_metrics_agree_with_sklearn():
    rng = np.random.default_rng(3)
    references = rng.integers(0, 4, 300)
    predictions = np.where(rng.random(300) < 0.7, references, rng.integers(0, 4, 300))
    names = ["a", "b", "c", "d"]
    ours = classification_metrics(predictions, references, names)
    assert ours["accuracy"] == pytest.approx(accuracy_score(references, predictions))
    assert ours["macro_f1"] == pytest.approx(f1_score(references, predictions, average="macro"))
    precision = precision_score(references, predictions, average=None)
    assert [ours["per_class"][n]["precision"] for n in names] == pytest.approx(list(precision))
    assert ours["confusion_matrix"] == confusion_matrix(references, predictions).tolist()


def test_lm_evaluation_writes_metrics_protocol_and_samples(lm_data, tmp_path):
    from transformers import AutoTokenizer

    info = json.loads(lm_data["tokenize_manifest"].read_text())
    model = tiny_lm(info, 32)
    model.save_pretrained(tmp_path / "model")
    AutoTokenizer.from_pretrained(lm_data["tokenizer"]).save_pretrained(tmp_path / "model")
    settings = EvalSettings(prompts=["Customer: hello\nAgent:"], max_new_tokens=5)
    metrics = evaluate_model(evaluate_paths(lm_data, tmp_path), EvalJob("causal_lm", settings))
    assert json.loads((tmp_path / "metrics.json").read_text())["perplexity"] == pytest.approx(
        metrics["perplexity"]
    )
    # An untrained model is near-uniform: perplexity close to the vocabulary size.
    assert 0.3 * info["vocab_size"] < metrics["perplexity"] < 3 * info["vocab_size"]
    assert "stride" in metrics["protocol"]
    # The bigram baseline, counted on the train split, scores the same targets far better.
    baseline = metrics["baselines"]["kneser_ney_bigram"]
    assert baseline["predicted_tokens"] == metrics["predicted_tokens"]
    assert 1 < baseline["perplexity"] < 0.5 * metrics["perplexity"]
    (sample,) = pd.read_csv(tmp_path / "samples.csv", keep_default_na=False).to_dict("records")
    assert sample["prompt"] == "Customer: hello\nAgent:" and isinstance(sample["generated"], str)


def test_per_document_test_rows_are_scored_as_one_stream_without_their_padding(
    lm_per_document_data, tmp_path
):
    from itertools import chain

    from transformers import AutoTokenizer

    from snaketune.tokenize.shards import read_shards

    data = lm_per_document_data
    info = json.loads(data["tokenize_manifest"].read_text())
    tokenizer = AutoTokenizer.from_pretrained(data["tokenizer"])
    tiny_lm(info, 32).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    settings = EvalSettings(prompts=[], batch_size=5)
    metrics = evaluate_model(evaluate_paths(data, tmp_path), EvalJob("causal_lm", settings))

    rows = read_shards(data["shards"] / "test").column("input_ids").to_pylist()
    stream = np.array(list(chain.from_iterable(rows)))
    assert len(stream) == info["counts"]["test"]["tokens"]
    assert any(len(r) < 32 for r in rows)  # padded in a batch, so padding had to be dropped
    lengths = token_byte_lengths(tokenizer)
    eos = info["eos_token_id"]
    expected = score_lm(tiny_lm(info, 32), stream, 32, 31, 5, lengths, CPU, prefix=eos)
    assert metrics["predicted_tokens"] == expected["predicted_tokens"] == len(stream)
    # fp32 cross-entropy (summed in float64): equal to 1e-6 whichever attention kernel ran.
    assert metrics["perplexity"] == pytest.approx(expected["perplexity"], rel=1e-6)
    assert metrics["context_length"] == 32
