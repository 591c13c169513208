"""A lean Llama for training from scratch (model.arch: llama): the lean GPT's plan
(snaketune.train.lean_gpt) with Llama's blocks, in plain torch.

Rotary position embeddings on the queries and keys (no position table), RMSNorm before each
sub-layer and at the end, a SwiGLU MLP (down(silu(gate(x)) * up(x)), its inner width 8/3 of the
model's rounded up to a multiple of 64), no biases, torch's scaled_dot_product_attention with
is_causal, the output head tied to the token embedding, whose rows are padded to a multiple of
64; dropout on the residual branches (training only: Llama itself has none). Modules and
parameters carry transformers' LlamaForCausalLM names, so the model saves as a Llama folder by
dropping the padded rows, which evaluation, generation (with its KV cache), serving and the
registry load with transformers, its logits equal to this module's.

Packed examples (position ids that restart per example) get their own rotary positions and a
block-diagonal causal mask, as in the lean GPT.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from snaketune.train.lean_gpt import LeanCausalLM, attend, example_mask, padded_vocab
from snaketune.train.settings import llama_inner_width

EMBEDDING = "model.embed_tokens.weight"
HEAD = "lm_head.weight"
ROPE_THETA = 10000.0
RMS_EPS = 1e-5


def llama_config(
    settings, vocab_size: int, context: int, pad_token_id, eos_token_id, attention: str, **extra
):
    """The transformers LlamaConfig a scratch Llama is (and saves as), with the model settings'
    sizes; `extra`: a classifier's labels."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=settings.n_embd,
        intermediate_size=llama_inner_width(settings.n_embd),
        num_hidden_layers=settings.n_layer,
        num_attention_heads=settings.n_head,
        num_key_value_heads=settings.n_head,
        max_position_embeddings=context,
        rms_norm_eps=RMS_EPS,
        rope_theta=ROPE_THETA,
        tie_word_embeddings=True,
        attention_dropout=settings.dropout,
        attn_implementation=attention,
        pad_token_id=pad_token_id,
        bos_token_id=eos_token_id,
        eos_token_id=eos_token_id,
        **extra,
    )


def rotary_tables(positions: torch.Tensor, head_width: int, dtype: torch.dtype):
    """cos and sin of each position's rotation angles ([B or 1, T, head_width]), computed in
    fp32 as transformers' LlamaRotaryEmbedding does."""
    inverse = 1.0 / (
        ROPE_THETA ** (torch.arange(0, head_width, 2, device=positions.device).float() / head_width)
    )
    angles = positions.float()[..., None] * inverse
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, heads, T, d] rotated by the tables [B, T, d] (Llama's rotate_half convention)."""
    first, second = x.chunk(2, dim=-1)
    return x * cos[:, None] + torch.cat([-second, first], dim=-1) * sin[:, None]


class RMSNorm(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # In fp32, as Llama's: the mean of squares of bf16 activations loses digits.
        normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + RMS_EPS)
        return self.weight * normed.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, config, attention: str):
        super().__init__()
        width, self.heads = config.hidden_size, config.num_attention_heads
        self.q_proj = nn.Linear(width, width, bias=False)
        self.k_proj = nn.Linear(width, width, bias=False)
        self.v_proj = nn.Linear(width, width, bias=False)
        self.o_proj = nn.Linear(width, width, bias=False)
        self.dropout = config.attention_dropout
        self.eager = attention == "eager"

    def forward(self, x, rotary, mask=None) -> torch.Tensor:
        batch, length, width = x.shape
        q, k, v = (
            proj(x).view(batch, length, self.heads, width // self.heads).transpose(1, 2)
            for proj in (self.q_proj, self.k_proj, self.v_proj)
        )
        q, k = rotate(q, *rotary), rotate(k, *rotary)
        y = attend(q, k, v, self.dropout if self.training else 0.0, mask, self.eager)
        return self.o_proj(y.transpose(1, 2).reshape(batch, length, width))


class Mlp(nn.Module):
    def __init__(self, config):
        super().__init__()
        width, inner = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(width, inner, bias=False)
        self.up_proj = nn.Linear(width, inner, bias=False)
        self.down_proj = nn.Linear(inner, width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, config, attention: str):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size)
        self.self_attn = Attention(config, attention)
        self.post_attention_layernorm = RMSNorm(config.hidden_size)
        self.mlp = Mlp(config)
        self.dropout = nn.Dropout(config.attention_dropout)

    def forward(self, x, rotary, mask=None) -> torch.Tensor:
        x = x + self.dropout(self.self_attn(self.input_layernorm(x), rotary, mask))
        return x + self.dropout(self.mlp(self.post_attention_layernorm(x)))


class LeanLlama(LeanCausalLM):
    """Llama for causal LM. `config` is the transformers LlamaConfig it saves as."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        attention = config._attn_implementation or "sdpa"
        rows = padded_vocab(config.vocab_size)
        self.model = nn.ModuleDict(
            {
                "embed_tokens": nn.Embedding(rows, config.hidden_size),
                "layers": nn.ModuleList(
                    Block(config, attention) for _ in range(config.num_hidden_layers)
                ),
                "norm": RMSNorm(config.hidden_size),
            }
        )
        self.tie_head(config.hidden_size)

    @property
    def embedding(self) -> nn.Embedding:
        return self.model.embed_tokens

    def _init_weights(self, module: nn.Module) -> None:
        # N(0, 0.02), with the projections that add to the residual stream scaled down by
        # sqrt(2 x layers), as the lean GPT (GPT-2) starts.
        std = self.config.initializer_range
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        scaled = std / math.sqrt(2 * self.config.num_hidden_layers)
        if isinstance(module, Attention):
            nn.init.normal_(module.o_proj.weight, 0.0, scaled)
        if isinstance(module, Mlp):
            nn.init.normal_(module.down_proj.weight, 0.0, scaled)

    def hidden_states(self, input_ids, attention_mask=None, position_ids=None) -> torch.Tensor:
        """The final RMSNorm's output; `position_ids` that restart mark packed examples."""
        if position_ids is None:
            positions, mask = torch.arange(input_ids.size(1), device=input_ids.device)[None], None
        else:
            positions, mask = position_ids, example_mask(position_ids)
        x = self.model.embed_tokens(input_ids)
        head_width = self.config.hidden_size // self.config.num_attention_heads
        rotary = rotary_tables(positions, head_width, x.dtype)
        return self.model.norm(self.run_blocks(self.model.layers, x, rotary, mask))

    def to_hf(self, state_dict: dict | None = None):
        """The LlamaForCausalLM it saves as, with its weights (or `state_dict`'s)."""
        from transformers import LlamaForCausalLM

        state = state_dict if state_dict is not None else self.state_dict()
        hf = LlamaForCausalLM(self.config)
        vocab = self.config.vocab_size
        hf.load_state_dict(
            {
                name: value.detach()[:vocab] if name in (EMBEDDING, HEAD) else value.detach()
                for name, value in state.items()
            }
        )
        return hf
