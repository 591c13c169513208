"""The lean GPT is transformers' GPT-2, numerically: the same logits, loss and gradients from
the same weights, a saved folder transformers loads, and training through the trainer that
takes the same steps as GPT2LMHeadModel would."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from transformers import GPT2LMHeadModel

from snaketune.train import trainer as train
from snaketune.train.lean_gpt import LeanGPT, to_hf_state
from snaketune.train.models import build_model, count_parameters, load_trained
from snaketune.train.settings import ModelSettings, TrainSettings
from tests.support.stage_data import rows_of, run_training

TINY = ModelSettings(n_layer=2, n_embd=32, n_head=2, dropout=0.0)
QUICK = TrainSettings(
    max_steps=12, batch_size=8, lr=5e-3, warmup_steps=2, eval_every=6, checkpoint_every=6
)
VOCAB = 100  # not a multiple of 64: the lean model pads its embedding to 128 rows


def lean_model(vocab: int = VOCAB, context: int = 16, settings: ModelSettings = TINY) -> LeanGPT:
    torch.manual_seed(0)
    model = build_model(settings, "causal_lm", vocab, context, 0, 0, [])
    assert isinstance(model, LeanGPT)
    return model


def as_hf(model: LeanGPT) -> GPT2LMHeadModel:
    """transformers' GPT-2 with the lean model's weights."""
    hf = GPT2LMHeadModel(model.config)
    hf.load_state_dict(to_hf_state(model.state_dict(), model.config.vocab_size))
    return hf


def ids_and_labels() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, VOCAB, (3, 16), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[0, 9:] = -100  # a padded row's tail
    labels[2, :5] = -100  # an instruction row's prompt
    return ids, labels


def test_the_saved_folder_is_a_gpt2_transformers_loads_with_the_same_logits(tmp_path):
    model = lean_model().eval()
    model.save_pretrained(tmp_path)
    loaded = GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    ids, labels = ids_and_labels()

    assert loaded.config.vocab_size == VOCAB and model.transformer.wte.weight.size(0) == 128
    assert loaded.transformer.wte.weight.shape == (VOCAB, 32)
    assert count_parameters(model) == sum(p.numel() for p in loaded.parameters())
    with torch.no_grad():
        ours, theirs = model(input_ids=ids), loaded(input_ids=ids, labels=labels)
        # With labels the lean GPT computes its loss without the whole logits (lm_loss).
        our_loss = model(input_ids=ids, labels=labels).loss
    assert ours.logits.shape == theirs.logits.shape == (3, 16, VOCAB)
    torch.testing.assert_close(ours.logits, theirs.logits, rtol=0, atol=1e-5)
    assert float(our_loss) == pytest.approx(float(theirs.loss), abs=1e-5)
    assert load_trained(tmp_path, "causal_lm").__class__ is GPT2LMHeadModel


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_from_gpt2_weights_the_loss_and_every_gradient_are_gpt2s(attention):
    torch.manual_seed(3)
    hf = as_hf(lean_model(settings=replace(TINY, attention=attention)))
    model = LeanGPT.from_hf(hf)
    ids, labels = ids_and_labels()

    ours, theirs = model(input_ids=ids, labels=labels), hf(input_ids=ids, labels=labels)
    ours.loss.backward()
    theirs.loss.backward()

    assert float(ours.loss.detach()) == pytest.approx(float(theirs.loss.detach()), abs=1e-5)
    grads = to_hf_state({n: p.grad for n, p in model.named_parameters()}, VOCAB)
    for name, param in hf.named_parameters():
        torch.testing.assert_close(grads[name], param.grad, rtol=1e-4, atol=1e-6, msg=name)
    # The padded rows: no token id reaches them and the softmax never sees their logits.
    assert not model.transformer.wte.weight.grad[VOCAB:].any()


def test_right_padded_rows_need_no_attention_mask(lm_per_document_data):
    """Per-document rows are padded on the right: under a causal mask the padding changes no
    real position, so the lean model's loss and real logits are GPT-2's with the mask."""
    info = json.loads(lm_per_document_data["tokenize_manifest"].read_text())
    rows = rows_of(lm_per_document_data, "train").with_targets()
    batch = rows.batch(np.arange(min(16, len(rows))))
    mask = batch["attention_mask"]
    assert not mask.all() and bool((mask[:, 1:] <= mask[:, :-1]).all())  # padding: right only
    model = lean_model(info["vocab_size"], 32).eval()
    hf = as_hf(model).eval()

    with torch.no_grad():
        ours, theirs = model(input_ids=batch["input_ids"]), hf(**batch)
        our_loss = model(**batch).loss
    real = mask.bool()
    torch.testing.assert_close(ours.logits[real], theirs.logits[real], rtol=0, atol=1e-5)
    assert float(our_loss) == pytest.approx(float(theirs.loss), abs=1e-5)


def test_fsdp_shards_each_block_and_best_weights_of_either_layout_load(tmp_path):
    from safetensors.torch import save_model

    from snaketune.train.checkpoint import BEST_WEIGHTS, load_best
    from snaketune.train.distributed import transformer_blocks

    model = lean_model()
    assert len(transformer_blocks(model)) == TINY.n_layer
    hf = as_hf(lean_model())
    with torch.no_grad():
        for param in hf.parameters():
            param.add_(0.5)  # other weights than the lean model's
    save_model(hf, str(tmp_path / BEST_WEIGHTS))  # kept from before the switch
    load_best(tmp_path, model)
    ids, _ = ids_and_labels()
    with torch.no_grad():
        torch.testing.assert_close(
            model.eval()(input_ids=ids).logits, hf.eval()(input_ids=ids).logits, rtol=0, atol=1e-5
        )


def test_scratch_gpt2_for_classification_or_lora_stays_transformers_model():
    classifier = build_model(TINY, "sequence_classification", 64, 16, 0, 0, ["neg", "pos"])
    lora = build_model(replace(TINY, lora_rank=4), "causal_lm", 64, 16, 0, 0, [])
    assert not isinstance(classifier, LeanGPT) and isinstance(lora, GPT2LMHeadModel)


def train_as_hf(monkeypatch) -> None:
    """The trainer builds the scratch model as GPT2LMHeadModel with the lean model's initial
    weights: scratch GPT-2 as it trained before the lean module."""
    lean = train.build_model
    monkeypatch.setattr(train, "build_model", lambda *args, **kwargs: as_hf(lean(*args, **kwargs)))


def losses(history: list[dict]) -> list[float]:
    return [row["loss"] for row in history]


def test_training_takes_the_steps_gpt2_would_and_saves_a_gpt2(lm_data, tmp_path, monkeypatch):
    ours = run_training(lm_data, tmp_path / "lean", "causal_lm", TINY, QUICK)
    saved = load_trained(tmp_path / "lean" / "model", "causal_lm")
    manifest = json.loads((tmp_path / "lean" / "manifest.json").read_text())
    train_as_hf(monkeypatch)
    theirs = run_training(lm_data, tmp_path / "hf", "causal_lm", TINY, QUICK)

    assert isinstance(saved, GPT2LMHeadModel) and saved.config.n_positions == 32
    assert manifest["counts"]["parameters"] == sum(p.numel() for p in saved.parameters())
    assert losses(ours) == pytest.approx(losses(theirs), abs=1e-5)
    val = [
        (r["val_loss"], t["val_loss"]) for r, t in zip(ours, theirs, strict=True) if "val_loss" in r
    ]
    assert len(val) == 2 and all(a == pytest.approx(b, abs=1e-5) for a, b in val)
    expected = load_trained(tmp_path / "hf" / "model", "causal_lm").state_dict()
    # The key projection's bias has a true gradient of zero (softmax ignores a shift of all
    # scores), so Adam turns its rounding noise into steps of the learning rate's size: its
    # entries differ by up to a few 1e-5 after 12 steps where every other weight agrees to 1e-5.
    for name, value in saved.state_dict().items():
        atol = 5e-5 if name.endswith("attn.c_attn.bias") else 1e-5
        torch.testing.assert_close(value, expected[name], rtol=0, atol=atol, msg=name)


def test_a_run_checkpointed_as_transformers_gpt2_continues_as_the_lean_one(
    lm_data, tmp_path, monkeypatch
):
    """A finished run's final state from before the switch (GPT2LMHeadModel's layout, Adam's
    moments included) continues to a larger max_steps as if it had stayed GPT2LMHeadModel."""
    first = replace(QUICK, max_steps=6)
    with monkeypatch.context() as patch:
        train_as_hf(patch)
        for name in ("lean", "hf"):
            run_training(lm_data, tmp_path / name, "causal_lm", TINY, first)
        theirs = run_training(lm_data, tmp_path / "hf", "causal_lm", TINY, QUICK)
    ours = run_training(lm_data, tmp_path / "lean", "causal_lm", TINY, QUICK)

    manifest = json.loads((tmp_path / "lean" / "manifest.json").read_text())
    assert manifest["counts"]["resumed_from_step"] == 6 and len(ours) == 12
    assert losses(ours) == pytest.approx(losses(theirs), abs=1e-5)


def test_generation_with_the_kv_cache_static_or_not_is_generation_without_it(lm_data, tmp_path):
    """The saved lean GPT generates through transformers' KV cache the tokens it would without
    a cache, and with the static cache train.compile gives it on CUDA (prompts padded to a
    multiple of 64 tokens; on the CPU generate() does not compile it) the same again."""
    from transformers import AutoTokenizer

    from snaketune.evaluate.evaluation import CPU
    from snaketune.evaluate.generation import compile_generation, generate_many, uses_static_cache
    from snaketune.evaluate.settings import EvalSettings

    tokenizer = AutoTokenizer.from_pretrained(lm_data["tokenizer"])
    lean_model(len(tokenizer), 128).save_pretrained(tmp_path)
    model = load_trained(tmp_path, "causal_lm").eval()
    prompts = ["Customer: where is my parcel?\nAgent:", "Customer: hi\nAgent:"]
    settings = EvalSettings(max_new_tokens=12)

    ids = torch.tensor([tokenizer.encode(prompts[0])])
    with torch.no_grad():
        cached = model.generate(input_ids=ids, max_new_tokens=12, do_sample=False)
        uncached = model.generate(
            input_ids=ids, max_new_tokens=12, do_sample=False, use_cache=False
        )
    assert cached.tolist() == uncached.tolist()

    dynamic, _ = generate_many(model, tokenizer, prompts, settings, 128, CPU, batch_size=2)
    compile_generation(model, "max-autotune")
    assert (
        uses_static_cache(model) and model.generation_config.compile_config.mode == "max-autotune"
    )
    static, _ = generate_many(model, tokenizer, prompts, settings, 128, CPU, batch_size=2)
    assert static == dynamic and all(dynamic)
