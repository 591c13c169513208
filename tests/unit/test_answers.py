"""Answer quality: exact match, token F1 and ROUGE-L against values worked out by hand, through
the shipped `evaluate` modules; the retrieval baseline; and the Q&A evaluation of a model on the
demo corpus as instruction data (answer perplexity from an independent NLL, generated answers
scored, the samples table)."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from snaketune.evaluate.answers import longest_common_subsequence, normalize
from snaketune.evaluate.evaluation import evaluate_model
from snaketune.evaluate.generation import generate, generate_many
from snaketune.evaluate.qa import answer_scores
from snaketune.evaluate.retrieval import nearest_answers
from snaketune.evaluate.settings import EvalJob, EvalSettings
from tests.support.checkpoints import tiny_lm
from tests.support.stage_data import evaluate_paths, rows_of

# prediction, reference, exact match, F1, ROUGE-L; worked out by hand.
CASES = [
    # Articles and punctuation go: both are "cat sat on mat".
    ("The cat sat on the mat.", "cat sat on mat", 1.0, 1.0, 1.0),
    # 2 words in common of 3 predicted and 4 expected: P 2/3, R 1/2, F1 4/7. LCS "refund
    # order" (2): the same.
    ("refund your order", "we refund the whole order", 0.0, 4 / 7, 4 / 7),
    # Same words, reversed: F1 1; LCS of "a b c" reversed is 1 word: P = R = 1/3.
    ("c b apple", "apple b c", 0.0, 1.0, 1 / 3),
    # Multiset: "ok ok ok" vs "ok": 1 in common, P 1/3, R 1, F1 1/2; LCS 1: 1/2.
    ("ok ok ok", "ok", 0.0, 0.5, 0.5),
    ("", "", 1.0, 1.0, 1.0),
    ("", "something", 0.0, 0.0, 0.0),
    ("nothing shared", "at all", 0.0, 0.0, 0.0),
]


def test_the_shipped_modules_give_the_hand_computed_scores():
    predictions, references = [c[0] for c in CASES], [c[1] for c in CASES]
    scores = answer_scores(predictions, references)
    assert scores["exact_match"] == [c[2] for c in CASES]
    assert scores["f1"] == pytest.approx([c[3] for c in CASES])
    assert scores["rouge_l"] == pytest.approx([c[4] for c in CASES])


def test_normalization_and_the_longest_common_subsequence():
    assert normalize("  An Order, THE refund!  ") == "order refund"
    assert longest_common_subsequence(list("abcbdab"), list("bdcaba")) == 4  # CLRS's example


def test_the_baseline_answers_with_the_most_similar_training_question():
    train_q = ["where is my parcel", "reset my password please", "I was charged twice"]
    train_a = ["It ships Monday.", "Use the reset link.", "We refunded you."]
    test_q = ["my password needs a reset", "charged twice for one order", "zzz"]
    # "zzz" shares no word: the first training answer (documented).
    assert nearest_answers(train_q, train_a, test_q) == [train_a[1], train_a[2], train_a[0]]


def test_batched_generation_equals_one_prompt_at_a_time(lm_data):
    from transformers import AutoTokenizer

    info = json.loads(lm_data["tokenize_manifest"].read_text())
    model = tiny_lm(info, 32).eval()
    tokenizer = AutoTokenizer.from_pretrained(lm_data["tokenizer"])
    settings = EvalSettings(max_new_tokens=6)
    prompts = ["Customer: hello\nAgent:", "Customer: my order is late, where is it?\nAgent:"]
    from snaketune.evaluate.evaluation import CPU

    batched, _ = generate_many(model, tokenizer, prompts, settings, 32, CPU, batch_size=2)
    alone = [generate(model, tokenizer, p, settings, 32, CPU)[0] for p in prompts]
    assert batched == alone


def qa_model(qa_data, tmp_path):
    from transformers import AutoTokenizer

    info = json.loads(qa_data["tokenize_manifest"].read_text())
    model = tiny_lm(info, 64)
    model.save_pretrained(tmp_path / "model")
    AutoTokenizer.from_pretrained(qa_data["tokenizer"]).save_pretrained(tmp_path / "model")
    return model


def test_a_qa_evaluation_scores_answers_beside_the_retrieval_baseline(qa_data, tmp_path):
    model = qa_model(qa_data, tmp_path)
    settings = EvalSettings(
        prompts=["Customer: hello\nAgent:"], max_new_tokens=8, answer_examples=5
    )
    metrics = evaluate_model(evaluate_paths(qa_data, tmp_path), EvalJob("causal_lm", settings))

    # Answer perplexity: the answers' tokens of every test row, NLL computed here on its own.
    rows = rows_of(qa_data, "test")
    nll, count = 0.0, 0
    for r in range(len(rows)):
        start, end = int(rows.arrays.offsets[r]), int(rows.arrays.offsets[r + 1])
        ids = torch.tensor(np.asarray(rows.arrays.tokens[start:end], dtype=np.int64))[None]
        flags = np.asarray(rows.arrays.targets[start:end], dtype=bool)
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
        for position in np.flatnonzero(flags[1:]) + 1:
            nll -= float(logp[position - 1, ids[0, position]])
            count += 1
    assert metrics["answer_tokens"] == count
    assert metrics["answer_perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-5)
    answered = len(rows.with_targets())
    assert (metrics["answer_rows"], metrics["answers_cut_off"]) == (answered, len(rows) - answered)

    # The generated answers: the first five test prompts, scored, beside the baseline's.
    table = pd.read_csv(tmp_path / "samples.csv", keep_default_na=False)
    scored = table[table["reference"] != ""]
    test = pd.read_parquet(qa_data["splits"]["test"]).head(5)
    assert scored["prompt"].tolist() == test["prompt"].tolist()
    assert scored["reference"].tolist() == test["response"].str.strip().tolist()
    hand = answer_scores(scored["generated"].tolist(), scored["reference"].tolist())
    for name in ("exact_match", "f1", "rouge_l"):
        assert scored[name].astype(float).tolist() == pytest.approx(hand[name])
        assert metrics[name] == pytest.approx(np.mean(hand[name]))
    baseline = metrics["baselines"]["retrieval"]
    assert baseline["answered_examples"] == metrics["answered_examples"] == 5
    assert baseline["f1"] == pytest.approx(scored["retrieved_f1"].astype(float).mean())
    assert "kneser_ney_bigram" in metrics["baselines"]
    assert "decoding=greedy" in metrics["answer_protocol"]
    assert table.iloc[0]["prompt"] == "Customer: hello\nAgent:"  # the configured prompt, first


def test_a_reference_loses_the_template_tokens_at_its_end_only(lm_data):
    """ChatML's <|im_end|> ends a response and no generated answer; a run of spaces that a
    vocabulary holds as an added token (GPT-NeoX's) is text, kept where it is."""
    from transformers import AutoTokenizer

    from snaketune.evaluate.qa import answer_text

    tokenizer = AutoTokenizer.from_pretrained(lm_data["tokenizer"])
    tokenizer.add_tokens(["    "])
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_end|>"]})
    assert answer_text(tokenizer, " x = 1\n    return x<|im_end|>\n") == "x = 1\n    return x"
    assert answer_text(tokenizer, "a    b") == "a    b"
    eos = tokenizer.eos_token
    assert answer_text(tokenizer, f"done.<|im_end|>{eos}") == "done."


def test_sampling_with_a_tiny_top_p_takes_the_most_likely_token(lm_data):
    """Nucleus sampling through generate(), hot enough that top_k alone would stray: a top_p
    below the most likely token's probability leaves that token alone, so sampling gives the
    greedy answer; top_p 1 keeps them all, and it strays."""
    from dataclasses import replace

    from transformers import AutoTokenizer

    from snaketune.evaluate.evaluation import CPU
    from snaketune.evaluate.generation import pick

    info = json.loads(lm_data["tokenize_manifest"].read_text())
    model = tiny_lm(info, 32).eval()
    tokenizer = AutoTokenizer.from_pretrained(lm_data["tokenizer"])
    prompt = "Customer: my order is late, where is it?\nAgent:"
    greedy = EvalSettings(max_new_tokens=8)
    hot = replace(greedy, decoding="sample", temperature=50.0, top_k=1000)
    expected = generate(model, tokenizer, prompt, greedy, 32, CPU)[0]
    torch.manual_seed(0)
    assert generate(model, tokenizer, prompt, replace(hot, top_p=1e-6), 32, CPU)[0] == expected
    torch.manual_seed(0)
    assert generate(model, tokenizer, prompt, hot, 32, CPU)[0] != expected

    # The loop of models without generate() (the LSTM) picks the same way.
    logits = torch.tensor([0.0, 3.0, 1.0, 2.0])
    torch.manual_seed(0)
    assert {pick(logits, replace(hot, top_p=1e-6)) for _ in range(50)} == {1}
    assert len({pick(logits, hot) for _ in range(50)}) > 1
