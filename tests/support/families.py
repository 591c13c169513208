"""Tiny random causal LMs of the model families people fine-tune (GPT-2, Llama, Qwen2, Mistral,
GPT-NeoX, Gemma 2), built from configs: a few layers of width 32, for checks that must hold
whatever the family. torch and transformers are imported when a helper runs."""

from __future__ import annotations

FAMILIES = ("gpt2", "llama", "qwen2", "mistral", "gpt_neox", "gemma2")
WIDTH, LAYERS, HEADS = 32, 2, 4


def tiny_config(family: str, vocab_size: int, attention: str = "sdpa"):
    """The family's config at a tiny size (no dropout, positions for 128 tokens)."""
    import transformers

    if family == "gemma2":
        attention = "eager"  # transformers runs Gemma 2 with eager attention only
    common = {"vocab_size": vocab_size, "attn_implementation": attention}
    if family == "gpt2":
        return transformers.GPT2Config(
            n_embd=WIDTH,
            n_layer=LAYERS,
            n_head=HEADS,
            n_positions=128,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=0,
            eos_token_id=0,
            **common,
        )
    config_class = {
        "llama": transformers.LlamaConfig,
        "qwen2": transformers.Qwen2Config,
        "mistral": transformers.MistralConfig,
        "gpt_neox": transformers.GPTNeoXConfig,
        "gemma2": transformers.Gemma2Config,
    }[family]
    sizes = {
        "hidden_size": WIDTH,
        "intermediate_size": 2 * WIDTH,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "max_position_embeddings": 128,
        "bos_token_id": 0,
        "eos_token_id": 0,
        "pad_token_id": 0,
    }
    if family != "gpt_neox":
        sizes["num_key_value_heads"] = HEADS // 2  # grouped-query attention, as these ship
    if family == "gemma2":
        sizes["head_dim"] = WIDTH // HEADS
    return config_class(**sizes, **common)


def tiny_causal_lm(family: str, vocab_size: int, attention: str = "sdpa"):
    """A random model of the family (seed it before calling for the same weights)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_config(tiny_config(family, vocab_size, attention))
