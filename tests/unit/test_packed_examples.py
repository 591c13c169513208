"""Instruction examples packed into one row train as they would alone: their position ids
restart per example and attention stops at example boundaries, in every model family; plain-text
documents packed with tokenize.packing: documents_apart train and are scored likewise."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from snaketune.errors import TrainingError
from snaketune.evaluate.evaluation import CPU
from snaketune.evaluate.perplexity import score_lm
from snaketune.names import TEST, TRAIN
from snaketune.tokenize.shards import TokenizedData
from snaketune.train import lm_loss
from snaketune.train.batches import IGNORED_LABEL, TokenRows, document_positions, example_positions
from snaketune.train.lean_gpt import LeanGPT
from snaketune.train.models import build_model
from snaketune.train.settings import ModelSettings
from snaketune.train.trainer import check_examples_apart, forward
from tests.support.families import FAMILIES, tiny_causal_lm
from tests.support.stage_data import prepare_stage_data

VOCAB = 200


@pytest.fixture(scope="module")
def packed_data(tmp_path_factory) -> dict:
    """The demo's instruction data tokenized into rows of 256 tokens: several examples each."""
    root = tmp_path_factory.mktemp("packed")
    return prepare_stage_data(root, "causal_lm", 256, instruction=True, packing="across_documents")


def model_of(family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if family == "lean":
        return LeanGPT(tiny_causal_lm("gpt2", VOCAB).config)
    if family == "lean-llama":
        settings = ModelSettings(arch="llama", n_layer=2, n_embd=32, n_head=2, dropout=0.0)
        return build_model(settings, "causal_lm", VOCAB, 64, 0, 0, [])
    return tiny_causal_lm(family, VOCAB)


def example(length: int, prompt: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random ids of an example and its targets (the response's tokens)."""
    ids = np.random.default_rng(seed).integers(1, VOCAB, length)
    return ids, np.arange(length) >= prompt


def batch_of(rows: list[list[tuple]], answer: tuple[int, int]) -> dict[str, torch.Tensor]:
    """Rows of examples, right-padded, as TokenRows.batch makes them; labels only on the
    response of example `answer` (row, index): every other target is masked out."""
    width = max(sum(len(ids) for ids, _ in row) for row in rows)
    ids = np.zeros((len(rows), width), dtype=np.int64)
    targets = np.zeros((len(rows), width), dtype=bool)
    labels = np.full((len(rows), width), IGNORED_LABEL, dtype=np.int64)
    for r, row in enumerate(rows):
        at = 0
        for e, (example_ids, example_targets) in enumerate(row):
            span = slice(at, at + len(example_ids))
            ids[r, span], targets[r, span] = example_ids, example_targets
            if (r, e) == answer:
                labels[r, span] = np.where(example_targets, example_ids, IGNORED_LABEL)
            at += len(example_ids)
    real = np.arange(width) < np.array([sum(len(i) for i, _ in row) for row in rows])[:, None]
    batch = {"input_ids": torch.from_numpy(ids), "labels": torch.from_numpy(labels)}
    positions = example_positions(targets, real)
    if positions is not None:
        batch["position_ids"] = torch.from_numpy(positions)
    return batch


def loss_and_gradients(model, batch) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad()
    loss = forward(lm_loss.with_chunked_loss(model), batch, CPU).loss
    loss.backward()
    return float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters()}


def assert_trains_alike(model, packed: dict, alone: dict) -> None:
    """The same loss (1e-5) and every gradient from the packed batch as from the one alone."""
    packed_loss, packed_grads = loss_and_gradients(model, packed)
    alone_loss, alone_grads = loss_and_gradients(model, alone)
    assert packed_loss == pytest.approx(alone_loss, abs=1e-5)
    for name, grad in alone_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("family", ["lean", "lean-llama", *FAMILIES])
def test_an_answer_packed_after_others_trains_as_it_would_alone(family):
    model = model_of(family).train()
    first, second, answer = example(9, 4, 1), example(13, 6, 2), example(11, 5, 3)
    other_row = [example(7, 3, 4)]  # a shorter row: padded on the right in the packed batch

    packed = batch_of([[first, second, answer], other_row], answer=(0, 2))
    alone = batch_of([[answer]], answer=(0, 0))
    assert "position_ids" in packed and "position_ids" not in alone
    assert packed["position_ids"][0].tolist()[9:33] == [*range(13), *range(11)]

    assert_trains_alike(model, packed, alone)


def test_without_restarting_positions_the_answer_would_see_the_examples_before_it():
    """The check above can fail: packed as one sequence, the same answer's loss differs."""
    model = model_of("llama").train()
    first, answer = example(9, 4, 1), example(11, 5, 3)
    packed = batch_of([[first, answer]], answer=(0, 1))
    alone_loss, _ = loss_and_gradients(model, batch_of([[answer]], answer=(0, 0)))
    del packed["position_ids"]
    joined_loss, _ = loss_and_gradients(model, packed)
    assert abs(joined_loss - alone_loss) > 1e-3


def test_packed_rows_of_real_data_restart_their_positions_at_each_prompt(packed_data):
    data = TokenizedData.read(packed_data["tokenize_manifest"], packed_data["shards"])
    assert data.job.packs_examples
    rows = TokenRows.open(data, TRAIN).with_targets()
    batch = rows.batch(np.arange(min(8, len(rows))))
    positions, labels = batch["position_ids"], batch["labels"]
    assert "attention_mask" not in batch  # transformers masks packed examples only without one
    starts = (positions == 0).sum(dim=1)
    assert int(starts.max()) > 2  # several examples a row
    # Each example restarts at its prompt: a position 0 is never a target, and every run of
    # targets (an answer) lies inside one example.
    assert not bool((labels[positions == 0] != IGNORED_LABEL).any())
    lengths = rows.lengths()[: len(labels)]
    for row, length in enumerate(lengths):
        ids = positions[row, :length]
        assert ids[0] == 0 and bool(((ids[1:] == ids[:-1] + 1) | (ids[1:] == 0)).all())


def test_a_family_that_ignores_restarting_positions_is_refused_before_training():
    class JoinedGPT(LeanGPT):
        """Takes the position ids but attends across the whole row."""

        def forward(self, input_ids, position_ids=None, **kwargs):
            return super().forward(input_ids, **kwargs)

    check_examples_apart(model_of("lean"), VOCAB, CPU)
    with pytest.raises(TrainingError, match="tokenize.packing: per_document"):
        check_examples_apart(JoinedGPT(model_of("lean").config), VOCAB, CPU)


def test_an_example_without_a_prompt_token_cannot_be_packed(tmp_path):
    """Examples are told apart where a prompt token follows an answer's: one that starts with
    its answer would join the example before it, so the tokenize stage refuses it."""
    from snaketune.errors import CorpusError
    from snaketune.tokenize.encoder import Encoded
    from snaketune.tokenize.packing import pack_whole_examples
    from snaketune.tokenize.shards import INSTRUCTION_SCHEMA, ShardWriter

    ids = np.arange(1, 8, dtype=np.int32)
    targets = np.array([False, True, True, True, True, False, True])  # 2nd: answer only
    encoded = Encoded(ids, np.array([3, 2, 2]), targets=targets)
    writer = ShardWriter(tmp_path, INSTRUCTION_SCHEMA, 100)
    with pytest.raises(CorpusError, match="no prompt token"):
        pack_whole_examples(iter([(None, encoded)]), writer, 16)


# Plain text, tokenize.packing: documents_apart: documents packed into full rows, each opened by
# the EOS before it (snaketune.train.batches.TokenRows.separator).
EOS = VOCAB - 1


def document(length: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(1, EOS, length)


def documents_batch(rows: list[list[np.ndarray]], scored: tuple[int, int]) -> dict:
    """Rows of EOS-joined documents, each row opened by an EOS, right-padded, with labels only
    on document `scored` (row, index): its tokens and the EOS that ends it."""
    joined = [np.concatenate([[EOS], *[np.append(d, EOS) for d in row]]) for row in rows]
    width = max(map(len, joined))
    ids = np.zeros((len(rows), width), dtype=np.int64)
    labels = np.full((len(rows), width), IGNORED_LABEL, dtype=np.int64)
    for r, (row, row_ids) in enumerate(zip(rows, joined, strict=True)):
        ids[r, : len(row_ids)] = row_ids
        if r == scored[0]:
            begin = 1 + sum(len(d) + 1 for d in row[: scored[1]])
            end = begin + len(row[scored[1]]) + 1
            labels[r, begin:end] = row_ids[begin:end]
    real = np.arange(width) < np.array(list(map(len, joined)))[:, None]
    batch = {"input_ids": torch.from_numpy(ids), "labels": torch.from_numpy(labels)}
    positions = document_positions(ids, real, EOS)
    if positions is not None and len(rows[scored[0]]) > 1:
        batch["position_ids"] = torch.from_numpy(positions)
    return batch


@pytest.mark.parametrize("family", ["lean", "lean-llama", *FAMILIES])
def test_a_document_packed_after_others_trains_as_it_would_alone(family):
    """Its tokens, predicted from the EOS before it on, and the EOS that ends it: the same
    loss and gradients as the document alone after one EOS."""
    model = model_of(family).train()
    first, second, scored = document(9, 1), document(13, 2), document(11, 3)
    packed = documents_batch([[first, second, scored], [document(7, 4)]], scored=(0, 2))
    alone = documents_batch([[scored]], scored=(0, 0))
    assert "position_ids" in packed and "position_ids" not in alone
    assert packed["position_ids"][0].tolist() == [*range(10), *range(14), *range(12), 0]

    assert_trains_alike(model, packed, alone)


def test_the_evaluation_scores_each_document_kept_apart_as_it_would_alone():
    """score_lm over the EOS-joined stream with the separator equals the sum of each document
    scored alone after one EOS; without it, later documents see earlier ones."""
    model = model_of("llama").eval()
    documents = [document(9, 1), document(13, 2), document(11, 3)]
    stream = np.concatenate([np.append(d, EOS) for d in documents])
    byte_lengths = np.ones(VOCAB, dtype=np.int64)

    def nll(tokens: np.ndarray, separator: int | None) -> float:
        scored = score_lm(model, tokens, 64, 63, 4, byte_lengths, CPU, EOS, separator)
        return scored["nll_sum"]

    alone = sum(nll(np.append(d, EOS), None) for d in documents)
    assert nll(stream, EOS) == pytest.approx(alone, abs=1e-4)
    assert abs(nll(stream, None) - alone) > 1e-3


@pytest.fixture(scope="module")
def documents_apart_data(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("apart")
    return prepare_stage_data(root, "causal_lm", 256, packing="documents_apart")


def test_rows_of_real_text_kept_apart_restart_their_positions_at_each_eos(documents_apart_data):
    data = TokenizedData.read(
        documents_apart_data["tokenize_manifest"], documents_apart_data["shards"]
    )
    assert data.job.keeps_documents_apart and data.job.keeps_packed_apart
    rows = TokenRows.open(data, TRAIN)
    assert rows.separator == data.eos_token_id
    assert set(rows.lengths().tolist()) == {256}  # the full rows of across_documents
    batch = rows.batch(np.arange(min(8, len(rows))))
    ids, positions, labels = batch["input_ids"], batch["position_ids"], batch["labels"]
    assert "attention_mask" not in batch
    assert bool((labels == ids).all())  # every token is a target, the EOS included
    restarts = positions[:, 1:] == 0
    assert bool((restarts == (ids[:, 1:] == data.eos_token_id)).all())
    assert int(restarts.sum(dim=1).max()) >= 2  # several documents a row


def test_the_evaluate_stage_scores_documents_kept_apart_and_says_so(documents_apart_data, tmp_path):
    from transformers import AutoTokenizer

    from snaketune.evaluate.evaluation import evaluate_model
    from snaketune.evaluate.perplexity import token_byte_lengths
    from snaketune.evaluate.settings import EvalJob, EvalSettings
    from tests.support.checkpoints import tiny_lm
    from tests.support.stage_data import evaluate_paths

    data = documents_apart_data
    info = TokenizedData.read(data["tokenize_manifest"], data["shards"])
    tokenizer = AutoTokenizer.from_pretrained(data["tokenizer"])
    model = tiny_lm(json.loads(data["tokenize_manifest"].read_text()), 256)
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    settings = EvalSettings(prompts=[], batch_size=4)
    metrics = evaluate_model(evaluate_paths(data, tmp_path), EvalJob("causal_lm", settings))

    assert "documents kept apart" in metrics["protocol"]
    stream = TokenRows.open(info, TEST).stream()
    eos, lengths = info.eos_token_id, token_byte_lengths(tokenizer)
    scored = {
        separator: score_lm(model.eval(), stream, 256, 255, 4, lengths, CPU, eos, separator)
        for separator in (eos, None)
    }
    assert metrics["nll_sum"] == pytest.approx(scored[eos]["nll_sum"], rel=1e-6)
    assert abs(scored[None]["nll_sum"] - scored[eos]["nll_sum"]) > 1e-3
