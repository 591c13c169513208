"""Small models and tokenizers made on the spot: a scratch GPT-2 as evaluation loads it, a tiny
BERT classifier saved like a hub checkpoint, and a chat template of the kind instruction-tuned
tokenizers carry. The library, torch and transformers are imported when a helper runs, not with
this module: tests/conftest.py imports it, and huggingface_hub must not load before the session
has set HF_HUB_OFFLINE."""

from __future__ import annotations

from pathlib import Path

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
"""A chat template of the kind instruction-tuned tokenizers carry."""


def tiny_lm(info: dict, context: int):
    """A scratch GPT-2 as evaluation loads it: the transformers model the trainer saves.
    `info` is the tokenize stage's manifest (vocab_size, pad_token_id, eos_token_id)."""
    import torch

    from snaketune.train.models import build_model
    from snaketune.train.settings import ModelSettings

    torch.manual_seed(0)
    model = build_model(
        ModelSettings(n_layer=1, n_embd=32, n_head=2, dropout=0.0),
        "causal_lm",
        info["vocab_size"],
        context,
        info["pad_token_id"],
        info["eos_token_id"],
        [],
    )
    return model.to_hf().eval()


def bert_checkpoint(train_split: Path, out: Path) -> Path:
    """A tiny BERT classifier with its own WordPiece tokenizer, saved like a hub checkpoint."""
    import pandas as pd
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    backend = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    backend.train_from_iterator(
        pd.read_parquet(train_split)["text"].tolist(),
        trainers.WordPieceTrainer(vocab_size=600, special_tokens=special),
    )
    cls, sep = backend.token_to_id("[CLS]"), backend.token_to_id("[SEP]")
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    tokenizer = BertTokenizerFast(
        tokenizer_object=backend,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=128,
        max_position_embeddings=64,
        num_labels=2,
    )
    torch.manual_seed(0)  # the checkpoint's weights must not depend on which tests ran before
    BertForSequenceClassification(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
