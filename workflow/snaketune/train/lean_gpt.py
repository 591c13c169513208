"""A lean GPT-2 for training from scratch: the GPT-2 architecture, numerically, in plain torch.

transformers' GPT2LMHeadModel pays for generality the trainer never uses (Conv1D layers, head
splitting through views of views, a loss written for every model); on an H200 it reached 32.5%
model FLOPs utilisation at the 124M shape where a nanoGPT-style model reached 41.5%. This module
is that model: learned positions, pre-LayerNorm blocks, one fused qkv projection, torch's
scaled_dot_product_attention with is_causal (FlashAttention on a GPU), GELU's tanh
approximation, the output head tied to the token embedding, dropout where GPT-2 has it, and
GPT-2's initialisation (residual projections scaled by 1/sqrt(2 x layers)).

The embedding (and so the head) has rows for a vocabulary padded to a multiple of 64, which
matrix kernels tile without a ragged edge; the padded columns of the head's output are dropped
before the softmax, so the loss and the logits are those of GPT2LMHeadModel with the same
weights. Modules and parameters carry GPT-2's names and order (transformer.h.0.attn.c_attn,
...), so converting either way is a transpose (Conv1D stores [in, out]) and a slice: the model
saves as a plain GPT-2 folder, which evaluation, generation and serving load with transformers.

Padding: the trainer's rows are padded on the right, and under a causal mask a position never
attends to a later one, so padding changes no real position's output; its labels are -100 and
the loss skips them. The attention mask is therefore not needed for attention (and not taken:
a mask would keep SDPA off its causal fast kernels).

Packed examples: rows that hold several instruction examples come with `position_ids` that
restart at 0 where each example starts (snaketune.train.batches); each example then has its own
positions and attends only within itself (a block-diagonal causal mask), so it trains as it
would alone. Without position_ids the row is one sequence, on the causal fast path.

The loss is snaketune.train.lm_loss's, a chunk of positions at a time: the whole logits tensor is
never built when labels are given (the output then has no logits).
"""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from snaketune.train import lm_loss

PAD_MULTIPLE = 64
CONV1D_WEIGHTS = (
    "attn.c_attn.weight",
    "attn.c_proj.weight",
    "mlp.c_fc.weight",
    "mlp.c_proj.weight",
)
"""GPT-2's Conv1D weights, stored [in, out] by transformers and [out, in] by nn.Linear."""
EMBEDDING = "transformer.wte.weight"
HEAD = "lm_head.weight"


def padded_vocab(vocab_size: int) -> int:
    return math.ceil(vocab_size / PAD_MULTIPLE) * PAD_MULTIPLE


class Attention(nn.Module):
    def __init__(self, config, attention: str):
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.attn_pdrop = config.attn_pdrop
        self.resid_dropout = nn.Dropout(config.resid_pdrop)
        self.eager = attention == "eager"

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """`mask`: where each position may attend ([B, 1, T, T], True: may); None: causal."""
        batch, length, width = x.shape
        q, k, v = (
            t.view(batch, length, self.n_head, width // self.n_head).transpose(1, 2)
            for t in self.c_attn(x).split(width, dim=2)
        )
        dropout = self.attn_pdrop if self.training else 0.0
        y = attend(q, k, v, dropout, mask, self.eager)
        y = y.transpose(1, 2).contiguous().view(batch, length, width)
        return self.resid_dropout(self.c_proj(y))


def attend(q, k, v, dropout: float, mask: torch.Tensor | None, eager: bool) -> torch.Tensor:
    """Causal attention of [B, heads, T, d] queries, keys and values: torch's fused kernel on
    its causal fast path without a `mask` (where each position may attend), else with it."""
    if eager:
        return eager_attention(q, k, v, dropout, mask)
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)


def eager_attention(q, k, v, dropout: float, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Attention written out (model.attention: eager), as GPT-2's original implementation."""
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))
    if mask is None:
        mask = causal_mask(q.size(-2), q.device)
    weights = scores.masked_fill(~mask, torch.finfo(scores.dtype).min).softmax(dim=-1)
    return F.dropout(weights.to(v.dtype), dropout, training=dropout > 0) @ v


def causal_mask(length: int, device: torch.device) -> torch.Tensor:
    return torch.ones(length, length, dtype=torch.bool, device=device).tril()


def example_mask(position_ids: torch.Tensor) -> torch.Tensor:
    """[B, 1, T, T]: a position attends to earlier ones of its own example (an example starts
    where its position id is 0)."""
    example = (position_ids == 0).cumsum(-1)
    same = example[:, :, None] == example[:, None, :]
    return (same & causal_mask(position_ids.size(-1), position_ids.device))[:, None]


class Mlp(nn.Module):
    def __init__(self, config):
        super().__init__()
        inner = config.n_inner or 4 * config.n_embd
        self.c_fc = nn.Linear(config.n_embd, inner)
        self.c_proj = nn.Linear(inner, config.n_embd)
        self.dropout = nn.Dropout(config.resid_pdrop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    def __init__(self, config, attention: str):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = Attention(config, attention)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = Mlp(config)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), mask)
        return x + self.mlp(self.ln_2(x))


class LeanCausalLM(nn.Module):
    """What the lean models share: called as every model here is, model(input_ids=...,
    labels=...) returning .loss and .logits (the loss a chunk of positions at a time), a head
    tied to a token embedding with padded rows, blocks checkpointed on demand, and a transformers
    model to save as. A subclass makes `embedding`, `hidden_states` and `to_hf`."""

    _no_split_modules = ["Block"]  # what FSDP shards one by one (snaketune.train.distributed)
    embedding: nn.Embedding

    def tie_head(self, width: int) -> None:
        """The output head: the embedding itself; its padded rows zero (no token id reaches
        them, so no gradient moves them)."""
        self.lm_head = nn.Linear(width, self.embedding.weight.size(0), bias=False)
        self.lm_head.weight = self.embedding.weight
        self.checkpointing: dict | None = None
        self.apply(self._init_weights)
        with torch.no_grad():
            self.embedding.weight[self.config.vocab_size :].zero_()

    def _init_weights(self, module: nn.Module) -> None:
        raise NotImplementedError

    def forward(self, input_ids, attention_mask=None, labels=None, position_ids=None, **_):
        # attention_mask: padding is on the right, which a causal mask already keeps from every
        # real position (see the module's docstring); the loss skips it through the labels.
        hidden = self.hidden_states(input_ids, position_ids=position_ids)
        parts = self.lm_head_parts()
        if labels is None:
            return SimpleNamespace(logits=parts.logits(hidden), loss=None)
        return SimpleNamespace(logits=None, loss=lm_loss.causal_lm_loss(parts, hidden, labels))

    def hidden_states(self, input_ids, attention_mask=None, position_ids=None) -> torch.Tensor:
        raise NotImplementedError

    def run_blocks(self, blocks: nn.ModuleList, x: torch.Tensor, *args) -> torch.Tensor:
        """x through each block, recomputed in the backward pass when checkpointing."""
        for block in blocks:
            if self.checkpointing is not None and self.training:
                x = checkpoint(block, x, *args, **self.checkpointing)
            else:
                x = block(x, *args)
        return x

    def lm_head_parts(self) -> lm_loss.Head:
        """The hidden states and the tied head, its padded rows left out (lm_loss.py)."""
        return lm_loss.Head(self.hidden_states, self.lm_head, self.config.vocab_size)

    # --- what the trainer asks of a transformers model ---------------------------------------

    def activation_checkpointing_enable(self, kwargs: dict | None = None) -> None:
        """Recompute each block's activations in the backward pass (model.gradient_checkpointing);
        use_reentrant=False replays the RNG, so the recomputation sees the same dropout masks."""
        self.checkpointing = {"use_reentrant": False, **(kwargs or {})}

    @property
    def is_activation_checkpointing(self) -> bool:
        return self.checkpointing is not None

    def real_parameter_count(self) -> int:
        """Parameters of the transformers model it saves as: without the padded embedding rows."""
        rows, width = self.embedding.weight.shape
        return sum(p.numel() for p in self.parameters()) - (rows - self.config.vocab_size) * width

    def save_pretrained(self, out_dir: Path, state_dict: dict | None = None) -> None:
        """A transformers folder of the model it saves as; `state_dict`: whole weights gathered
        from FSDP shards."""
        self.to_hf(state_dict).save_pretrained(out_dir)

    def to_hf(self, state_dict: dict | None = None):
        raise NotImplementedError


class LeanGPT(LeanCausalLM):
    """GPT-2 for causal LM. `config` is the transformers GPT2Config it saves as."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        attention = config._attn_implementation or "sdpa"
        self.transformer = nn.ModuleDict(
            {
                "wte": nn.Embedding(padded_vocab(config.vocab_size), config.n_embd),
                "wpe": nn.Embedding(config.n_positions, config.n_embd),
                "drop": nn.Dropout(config.embd_pdrop),
                "h": nn.ModuleList(Block(config, attention) for _ in range(config.n_layer)),
                "ln_f": nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon),
            }
        )
        self.tie_head(config.n_embd)

    @property
    def embedding(self) -> nn.Embedding:
        return self.transformer.wte

    def _init_weights(self, module: nn.Module) -> None:
        # GPT-2's: N(0, 0.02) weights, zero biases, and the projections that add to the
        # residual stream (two per block) scaled down by sqrt(2 x layers).
        std = self.config.initializer_range
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        if isinstance(module, Attention | Mlp):
            nn.init.normal_(module.c_proj.weight, 0.0, std / math.sqrt(2 * self.config.n_layer))

    def hidden_states(self, input_ids, attention_mask=None, position_ids=None) -> torch.Tensor:
        """The final LayerNorm's output; `position_ids` that restart mark packed examples."""
        if position_ids is None:
            positions, mask = torch.arange(input_ids.size(1), device=input_ids.device), None
        else:
            positions, mask = position_ids, example_mask(position_ids)
        wte, wpe = self.transformer.wte, self.transformer.wpe
        x = self.transformer.drop(wte(input_ids) + wpe(positions))
        return self.transformer.ln_f(self.run_blocks(self.transformer.h, x, mask))

    def to_hf(self, state_dict: dict | None = None):
        """The GPT2LMHeadModel it saves as, with its weights (or `state_dict`'s): the model
        evaluation, generation and serving load."""
        from transformers import GPT2LMHeadModel

        state = state_dict if state_dict is not None else self.state_dict()
        hf = GPT2LMHeadModel(self.config)
        hf.load_state_dict(to_hf_state(state, self.config.vocab_size))
        return hf

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Weights in either layout: this module's, or GPT2LMHeadModel's (a checkpoint or best
        weights kept from when scratch GPT-2 trained as transformers' model)."""
        if is_hf_layout(self, state_dict):
            state_dict = from_hf_state(state_dict, self.state_dict())
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    @classmethod
    def from_hf(cls, hf_model) -> LeanGPT:
        """The same model with a GPT2LMHeadModel's weights."""
        model = cls(hf_model.config)
        model.load_state_dict(hf_model.state_dict())
        return model


def to_hf_state(state: dict[str, torch.Tensor], vocab_size: int) -> dict[str, torch.Tensor]:
    """Lean weights as GPT2LMHeadModel's state dict: Conv1D weights transposed, padded rows
    dropped (the tied head is the embedding there too)."""
    out = {}
    for name, value in state.items():
        value = value.detach()
        if name.endswith(CONV1D_WEIGHTS):
            value = value.t()
        elif name in (EMBEDDING, HEAD):
            value = value[:vocab_size]
        out[name] = value.contiguous()
    return out


def from_hf_state(
    hf_state: dict[str, torch.Tensor], like: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """GPT2LMHeadModel's weights in the lean layout of `like` (padded rows zero)."""
    return {name: from_hf_tensor(name, v, like[name].shape) for name, v in hf_state.items()}


def from_hf_tensor(name: str, value: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """One parameter (or its optimizer moment) from GPT-2's layout into the lean one."""
    if name.endswith(CONV1D_WEIGHTS):
        return value.t().contiguous()
    if name in (EMBEDDING, HEAD) and value.size(0) < shape[0]:
        return torch.cat([value, value.new_zeros(shape[0] - value.size(0), *value.shape[1:])])
    return value


def is_hf_layout(model: LeanGPT, state: dict[str, torch.Tensor]) -> bool:
    """A state saved from GPT2LMHeadModel (Conv1D's [in, out] fc weight: width rows, not 4x)."""
    fc = state.get("transformer.h.0.mlp.c_fc.weight")
    return fc is not None and fc.size(0) == model.config.n_embd


def adopt_optimizer_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, model_state: dict, optimizer_state: dict
) -> dict:
    """Adam's moments from a checkpoint written while scratch GPT-2 trained as transformers'
    GPT2LMHeadModel, in the lean layout (transposed and padded as the weights are, which
    LeanGPT.load_state_dict converts), so that such a run continues after the switch. Any
    other optimizer state unchanged."""
    if not isinstance(model, LeanGPT) or not is_hf_layout(model, model_state):
        return optimizer_state
    like = model.state_dict()
    names = {id(p): n for n, p in model.named_parameters()}
    order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    moments = {}
    for key, values in optimizer_state["state"].items():
        name = order[key] if isinstance(key, int) else key  # an index, or FSDP's parameter name
        moments[key] = {
            k: from_hf_tensor(name, v, like[name].shape) if v.dim() else v
            for k, v in values.items()
        }
    return {**optimizer_state, "state": moments}
