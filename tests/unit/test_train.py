"""The trainer: it learns, its schedule and data order are what they claim, and a checkpoint of
other settings is not resumed. Killed, interrupted and failing runs are in tests/reliability."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from snaketune.batches import IGNORED_LABEL, batch_indices, load_examples
from snaketune.models import build_model, load_trained
from snaketune.settings import ModelSettings, TrainSettings
from snaketune.train import learning_rate
from tests.support.stage_data import run_training

TINY_MODEL = ModelSettings(n_layer=1, n_embd=32, n_head=2, dropout=0.1)


def test_learning_rate_warms_up_then_decays_to_the_floor():
    s = TrainSettings(max_steps=100, warmup_steps=10, lr=1e-3, min_lr_ratio=0.1)
    assert learning_rate(0, s) == pytest.approx(1e-4)
    assert learning_rate(9, s) == pytest.approx(1e-3)
    assert learning_rate(55, s) == pytest.approx(0.55e-3)  # cosine midpoint
    assert learning_rate(100, s) == pytest.approx(1e-4)
    assert all(learning_rate(i, s) >= learning_rate(i + 1, s) for i in range(10, 100))


def test_batch_order_is_a_seeded_permutation_per_epoch():
    n = 12  # three steps per epoch

    def draw(step: int) -> np.ndarray:
        return batch_indices(step, 0, batch_size=4, grad_accum=1, seed=7, n=n)

    epoch0 = np.concatenate([draw(step) for step in range(3)])
    epoch1 = np.concatenate([draw(step) for step in range(3, 6)])
    assert sorted(epoch0) == list(range(n)) and sorted(epoch1) == list(range(n))
    assert not np.array_equal(epoch0, epoch1)
    assert np.array_equal(draw(4), draw(4))


def test_processes_split_each_batch_between_them():
    one = batch_indices(5, 1, batch_size=8, grad_accum=2, seed=3, n=100)
    halves = [
        batch_indices(5, 1, batch_size=4, grad_accum=2, seed=3, n=100, world=2, rank=r)
        for r in (0, 1)
    ]
    assert np.array_equal(one, np.concatenate(halves))


def test_causal_lm_training_lowers_validation_loss(lm_data, tmp_path):
    settings = TrainSettings(
        max_steps=60, batch_size=8, lr=3e-3, warmup_steps=5, eval_every=20, checkpoint_every=30
    )
    history = run_training(lm_data, tmp_path, "causal_lm", TINY_MODEL, settings)
    val = [row["val_loss"] for row in history if "val_loss" in row]
    assert len(history) == 60 and len(val) == 3
    # Random init scores about ln(vocab); a model that learned anything does far better.
    assert val[-1] < val[0] and val[-1] < math.log(400) - 1.0
    saved = [json.loads(line) for line in (tmp_path / "history.jsonl").read_text().splitlines()]
    assert saved == history
    assert (tmp_path / "model" / "model.safetensors").exists()
    assert (tmp_path / "model" / "tokenizer.json").exists()
    assert not (tmp_path / "state").exists()  # the finished model replaces the checkpoint
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["device"] == "cpu" and manifest["counts"]["steps"] == 60


def test_loaded_rows_are_the_shard_rows_followed_by_padding(lm_per_document_data):
    from snaketune.tokenize.shards import read_shards

    shards = read_shards(lm_per_document_data["shards"] / "val").column("input_ids").to_pylist()
    val = load_examples(lm_per_document_data["shards"] / "val", "causal_lm", pad_token_id=7)

    assert len(val) == len(shards)
    for i, row in enumerate(shards):
        assert val.input_ids[i, : len(row)].tolist() == row
        assert set(val.input_ids[i, len(row) :].tolist()) <= {7}
        assert val.attention_mask[i].tolist() == [1] * len(row) + [0] * (32 - len(row))


def test_per_document_rows_are_padded_and_the_padding_is_never_a_target(lm_per_document_data):
    info = json.loads(lm_per_document_data["tokenize_manifest"].read_text())
    train = load_examples(lm_per_document_data["shards"] / "train", "causal_lm", 0)

    padding = train.attention_mask == 0
    assert padding.any() and train.input_ids.size(1) == 32
    assert bool((train.labels[padding] == IGNORED_LABEL).all())
    assert torch.equal(train.labels[~padding], train.input_ids[~padding])
    assert int((~padding).sum()) == info["counts"]["train"]["tokens"]
    kept = train.with_targets()  # rows of one token have nothing to predict
    assert len(kept) == int((train.attention_mask.sum(dim=1) >= 2).sum()) < len(train)


@pytest.mark.parametrize("arch", ["gpt2", "lstm"])
def test_a_padded_batch_has_the_loss_of_its_rows_scored_one_by_one(lm_per_document_data, arch):
    info = json.loads(lm_per_document_data["tokenize_manifest"].read_text())
    train = load_examples(lm_per_document_data["shards"] / "train", "causal_lm", 0)
    lengths = train.attention_mask.sum(dim=1)
    short = int(torch.nonzero((lengths > 1) & (lengths < 32))[0])
    index = np.array([short, int(torch.argmax(lengths))])
    torch.manual_seed(0)
    settings = ModelSettings(arch=arch, n_layer=1, n_embd=32, n_head=2, dropout=0.0)
    model = build_model(settings, "causal_lm", info["vocab_size"], 32, 0, 1, []).eval()

    with torch.no_grad():
        batched = float(model(**train.batch(index)).loss)
        nll_sum, targets = 0.0, 0
        for i in index:
            row = train.input_ids[i, : lengths[i]][None]
            nll_sum += float(model(input_ids=row, labels=row).loss) * (row.size(1) - 1)
            targets += row.size(1) - 1

    assert lengths[index[0]] < lengths[index[1]] == 32
    assert batched == pytest.approx(nll_sum / targets, rel=1e-5)


def test_causal_lm_training_on_per_document_rows_lowers_validation_loss(
    lm_per_document_data, tmp_path
):
    settings = TrainSettings(max_steps=40, batch_size=8, lr=3e-3, warmup_steps=5, eval_every=20)
    history = run_training(lm_per_document_data, tmp_path, "causal_lm", TINY_MODEL, settings)

    val = [row["val_loss"] for row in history if "val_loss" in row]
    assert val[-1] < val[0] and val[-1] < math.log(400) - 1.0
    # The model's context is the block size, not the longest row it happened to see.
    assert load_trained(tmp_path / "model", "causal_lm").config.n_positions == 32


@pytest.mark.parametrize("arch", ["gpt2", "lstm"])
def test_classifier_training_beats_chance(classification_data, tmp_path, arch):
    from snaketune.evaluation import predict_classes
    from snaketune.models import load_trained
    from snaketune.train import load_examples

    settings = TrainSettings(max_steps=80, batch_size=32, lr=3e-3, warmup_steps=5, eval_every=40)
    run_training(
        classification_data,
        tmp_path,
        "sequence_classification",
        ModelSettings(arch=arch, n_layer=1, n_embd=48, n_head=2, dropout=0.0),
        settings,
    )
    info = json.loads(classification_data["tokenize_manifest"].read_text())
    val = load_examples(
        classification_data["shards"] / "val", "sequence_classification", info["pad_token_id"]
    )
    model = load_trained(tmp_path / "model", "sequence_classification")
    accuracy = (predict_classes(model, val, 64) == val.labels.numpy()).mean()
    assert accuracy > 2 / len(info["label_names"])  # chance is 1/8


def test_checkpoint_from_other_settings_is_not_resumed(lm_data, tmp_path):
    first = TrainSettings(max_steps=10, batch_size=4, checkpoint_every=5, warmup_steps=2)
    (tmp_path / "state").mkdir()
    from snaketune.checkpoint import save_checkpoint
    from snaketune.models import build_model
    from snaketune.train import make_optimizer

    model = build_model(TINY_MODEL, "causal_lm", 400, 32, 1, 0, [])
    state = {
        "step": 5,
        "history": [],
        "fingerprint": "other-run",
        "model": model.state_dict(),
        "optimizer": make_optimizer(model, first).state_dict(),
    }
    save_checkpoint(tmp_path / "state", state)
    history = run_training(lm_data, tmp_path, "causal_lm", TINY_MODEL, first)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["counts"]["resumed_from_step"] == 0 and len(history) == 10
