"""model.arch llama from scratch: the lean Llama (snaketune.train.lean_llama) computes what
transformers' LlamaForCausalLM computes with the same weights (logits, loss, every gradient),
saves as a Llama folder transformers loads with the same logits, and trains through the
trainer; LoRA and classification build transformers' own Llama."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from transformers import LlamaForCausalLM, LlamaForSequenceClassification

from snaketune.settings import SettingsError
from snaketune.train import memory_plan
from snaketune.train.lean_llama import LeanLlama
from snaketune.train.models import build_model, count_parameters, load_trained
from snaketune.train.settings import ModelSettings, TrainSettings
from tests.support.stage_data import run_training

TINY = ModelSettings(arch="llama", n_layer=2, n_embd=32, n_head=2, dropout=0.0)
VOCAB = 100  # padded to 128 rows in the lean model


def lean_llama(vocab: int = VOCAB, context: int = 16) -> LeanLlama:
    torch.manual_seed(0)
    model = build_model(TINY, "causal_lm", vocab, context, 0, 0, [])
    assert isinstance(model, LeanLlama)
    return model


def ids_and_labels() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, VOCAB, (3, 16), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[0, 9:] = -100
    labels[2, :5] = -100
    return ids, labels


def test_the_saved_folder_is_a_llama_with_the_same_logits_loss_and_gradients(tmp_path):
    model = lean_llama()
    model.save_pretrained(tmp_path)
    hf = LlamaForCausalLM.from_pretrained(tmp_path)
    assert load_trained(tmp_path, "causal_lm").__class__ is LlamaForCausalLM
    assert hf.config.vocab_size == VOCAB and model.model.embed_tokens.weight.size(0) == 128
    assert count_parameters(model) == sum(p.numel() for p in hf.parameters())
    ids, labels = ids_and_labels()
    with torch.no_grad():
        ours, theirs = model.eval()(input_ids=ids), hf.eval()(input_ids=ids)
    torch.testing.assert_close(ours.logits, theirs.logits, rtol=0, atol=1e-5)

    model.train(), hf.train()
    our_loss = model(input_ids=ids, labels=labels).loss
    their_loss = hf(input_ids=ids, labels=labels).loss
    our_loss.backward()
    their_loss.backward()
    assert float(our_loss) == pytest.approx(float(their_loss), abs=1e-5)
    grads = {n: p.grad for n, p in model.named_parameters()}
    for name, param in hf.named_parameters():
        ours_grad = grads[name][:VOCAB] if name.endswith("embed_tokens.weight") else grads[name]
        torch.testing.assert_close(ours_grad, param.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_the_memory_plan_counts_the_lean_llama_s_parameters():
    model = lean_llama(VOCAB, 16)
    shape = memory_plan.job_shape(TINY.__dict__ | {"lora_target_modules": []}, VOCAB, 16)
    assert shape.parameters == count_parameters(model)
    assert shape.intermediate == model.config.intermediate_size == 128


def test_adapters_and_classifiers_are_transformers_llamas():
    lora = build_model(replace(TINY, lora_rank=4), "causal_lm", VOCAB, 16, 0, 0, [])
    classifier = build_model(TINY, "sequence_classification", VOCAB, 16, 0, 0, ["a", "b"])
    assert isinstance(lora, LlamaForCausalLM)
    assert isinstance(classifier, LlamaForSequenceClassification)


def test_settings_a_llama_cannot_take_are_refused_by_key():
    with pytest.raises(SettingsError, match="make n_embd / n_head even"):
        ModelSettings(arch="llama", n_embd=30, n_head=2)
    with pytest.raises(SettingsError, match="arch.*use model.arch: gpt2"):
        ModelSettings(arch="llama", init="pretrained", name_or_path="some/llama")


def test_a_scratch_llama_trains_and_saves_a_llama(lm_data, tmp_path):
    settings = TrainSettings(
        max_steps=12, batch_size=8, lr=5e-3, warmup_steps=2, eval_every=6, checkpoint_every=6
    )
    history = run_training(lm_data, tmp_path, "causal_lm", TINY, settings)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    saved = load_trained(tmp_path / "model", "causal_lm")
    assert isinstance(saved, LlamaForCausalLM) and manifest["model_type"] == "llama"
    assert manifest["loss"] == "chunked"
    assert history[-1]["loss"] < history[0]["loss"] and history[-1]["val_loss"] > 0
