"""The causal LM's loss and token scores without the whole logits tensor.

A model's own forward pass builds batch x length x vocabulary logits, and its loss an fp32 copy
of them: with Llama 3's 128k vocabulary at 8 x 2048 tokens that is 8.4 GB, more than the
model's activations. Here the final hidden states go through the output head a chunk of
positions at a time (LOGITS_CHUNK_BYTES of fp32 logits each), and only per-token numbers leave
a chunk:
- training: `linear_cross_entropy` takes, in its forward pass, each chunk's summed NLL and its
  gradients with respect to the hidden states and the head (softmax minus one-hot, then two
  matrix products) and keeps only those; its backward pass scales them. The same FLOPs as the
  full computation, nothing recomputed, and the peak of one chunk's logits instead of all.
- evaluation: `target_scores` gives each position's NLL and whether its target ranked first.
Both are the full computation's numbers to fp32 rounding (tests/unit/test_lm_loss.py).

It applies to models whose logits are exactly their output head applied to their final hidden
states: the lean GPT (snaketune.train.lean_gpt), and transformers models (with or without peft
adapters) where `head_of` finds the two and one small forward pass shows they give the model's
own logits. A family that scales or soft-caps its logits fails that check and keeps its own
forward pass; `loss_path` names which one a model takes, for the train manifest.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace

import torch
from torch import nn
from torch.nn import functional as F

from snaketune.train.batches import IGNORED_LABEL

LOGITS_CHUNK_BYTES = 256 * 2**20
"""fp32 logits per chunk of positions: large enough that each chunk's matrix product fills a
GPU (1,310 positions of GPT-2's 50,257 tokens, 512 of a 128k vocabulary)."""
CHECK_TOKENS = 8  # the length of the one forward pass that checks a model's head
CHUNKED, OWN_FORWARD = "chunked", "model's own forward"


def chunk_positions(vocab_size: int) -> int:
    return max(1, LOGITS_CHUNK_BYTES // (4 * vocab_size))


@dataclass(frozen=True)
class Head:
    """A causal LM split into its final hidden states and the output head that maps them to
    logits; `vocab_size` of the head's rows are real (the lean GPT pads its embedding)."""

    hidden: Callable[..., torch.Tensor]
    """(input_ids, attention_mask=None, position_ids=None) -> final hidden states [B, T, H]."""
    head: nn.Linear
    vocab_size: int

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head(hidden)[..., : self.vocab_size]


def transformers_head(model: nn.Module) -> Head | None:
    """The final hidden states and output head of a transformers causal LM (or a peft model
    around one): the base model under its `base_model_prefix`, and `get_output_embeddings`."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    body = getattr(base, getattr(base, "base_model_prefix", ""), None)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if not isinstance(body, nn.Module) or not isinstance(head, nn.Linear):
        return None

    def hidden(input_ids, attention_mask=None, position_ids=None):
        out = body(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
        )
        return out[0]

    return Head(hidden, head, head.out_features)


_checked: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def head_of(model: nn.Module) -> Head | None:
    """The model's Head when its logits are exactly head(hidden states), else None. Checked
    once per model by one forward pass of CHECK_TOKENS tokens (remembered while it lives).
    None for a model sharded by FSDP: only its own forward gathers its weights."""
    from snaketune.train.distributed import sharded

    if sharded(model):
        return None
    own = getattr(model, "lm_head_parts", None)
    if own is not None:
        return own()
    if model not in _checked:
        parts = None if reshapes_logits(model) else transformers_head(model)
        _checked[model] = parts if parts is not None and gives_own_logits(model, parts) else None
    return _checked[model]


LOGIT_RESHAPING = {"final_logit_softcapping": None, "logit_scale": 1.0, "logits_scaling": 1.0}
"""Config keys with which families change logits after the head (Gemma 2 and 3, Cohere,
Granite), and the values that leave them unchanged."""


def reshapes_logits(model: nn.Module) -> bool:
    config = getattr(model, "config", None)
    return any(
        getattr(config, key, neutral) not in (neutral, None)
        for key, neutral in LOGIT_RESHAPING.items()
    )


@torch.no_grad()
def gives_own_logits(model: nn.Module, parts: Head) -> bool:
    """Whether head(hidden) reproduces the model's logits on a few tokens: a family that
    scales or soft-caps its logits (Gemma 2's final_logit_softcapping, ...) does not."""
    was_training = model.training
    model.eval()
    try:
        device = parts.head.weight.device
        ids = (torch.arange(CHECK_TOKENS, device=device) % parts.vocab_size)[None]
        own = model(input_ids=ids).logits.float()
        split = parts.logits(parts.hidden(ids)).float()
    except TypeError:  # a body that takes other arguments (no position ids): its own forward
        return False
    finally:
        model.train(was_training)
    if own.shape != split.shape:
        return False
    scale = float(own.abs().max().clamp(min=1.0))
    # The same modules on the same input: equal but for the order of a few sums.
    return bool(torch.allclose(own, split, rtol=1e-5, atol=1e-5 * scale))


def loss_path(model: nn.Module) -> str:
    """How the model's causal LM loss is computed (for the manifest)."""
    return CHUNKED if head_of(model) is not None else OWN_FORWARD


# --- training ----------------------------------------------------------------------------------


class LinearCrossEntropy(torch.autograd.Function):
    """Sum over positions of -log softmax(hidden @ weight[:vocab].T + bias)[target], positions
    with an IGNORED_LABEL target skipped; gradients taken chunk by chunk in the forward pass."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, vocab_size):
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_bias = bias is not None and ctx.needs_input_grad[2]
        # The dtype autocast would multiply in, cast once (not once per chunk and product:
        # for a 128k x 4096 head that is a 1 GB copy each time); the loop runs without it.
        device = hidden.device.type
        compute = (
            torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
        )
        w = weight[:vocab_size].to(compute)
        hidden_c = hidden.to(compute)
        b = None if bias is None else bias[:vocab_size].float()
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.zeros_like(hidden) if need_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if need_weight else None
        grad_bias = torch.zeros_like(bias, dtype=torch.float32) if need_bias else None
        with torch.autocast(device, enabled=False):
            LinearCrossEntropy.chunks(
                hidden_c, w, b, targets, vocab_size, total, grad_hidden, grad_weight, grad_bias
            )
        ctx.weight_dtype = weight.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        return total

    @staticmethod
    def chunks(hidden, w, b, targets, vocab_size, total, grad_hidden, grad_weight, grad_bias):
        """The loop over chunks of positions: sums into `total` and the gradients given."""
        step = chunk_positions(vocab_size)
        for start in range(0, hidden.size(0), step):
            h, t = hidden[start : start + step], targets[start : start + step]
            logits = (h @ w.t()).float()
            if b is not None:
                logits += b
            valid = t != IGNORED_LABEL
            picked = t.clamp(min=0)[:, None]
            target_logit = logits.gather(1, picked)[:, 0]
            # log-sum-exp in the logits' own buffer (torch.logsumexp would take another one):
            # the shifted exponentials stay there, the softmax's numerators.
            peak = logits.amax(dim=-1)
            sums = logits.sub_(peak[:, None]).exp_().sum(dim=-1)
            total += ((peak + sums.log() - target_logit) * valid).sum()
            if grad_hidden is None and grad_weight is None and grad_bias is None:
                continue
            # d(NLL)/d(logits) = softmax - one_hot(target), zero where ignored; in place.
            grad = logits.div_(sums[:, None])
            grad.scatter_add_(1, picked, -torch.ones_like(picked, dtype=grad.dtype))
            grad.mul_(valid[:, None])
            if grad_bias is not None:
                grad_bias[:vocab_size] += grad.sum(0)
            grad = grad.to(hidden.dtype)
            if grad_hidden is not None:
                grad_hidden[start : start + step] = grad @ w
            if grad_weight is not None:
                grad_weight[:vocab_size] += (grad.t() @ h).float()

    @staticmethod
    def backward(ctx, grad_total):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        if grad_hidden is not None:
            # Scaled by the fp32 factor (in bf16 it would round 1/N itself: a uniform error).
            grad_hidden = grad_hidden * grad_total
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_total).to(ctx.weight_dtype)
        if grad_bias is not None:
            grad_bias = (grad_bias * grad_total).to(ctx.bias_dtype)
        return grad_hidden, grad_weight, grad_bias, None, None


def next_token_targets(labels: torch.Tensor) -> torch.Tensor:
    """Position j's target: label j + 1 (the last position predicts nothing)."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORED_LABEL)


def causal_lm_loss(parts: Head, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean NLL of the labelled next tokens, as transformers' models compute it (labels
    shifted left, -100 skipped), without the whole logits."""
    targets = labels[:, 1:].reshape(-1)
    hidden = hidden[:, :-1].reshape(-1, hidden.size(-1))
    head = parts.head
    total = LinearCrossEntropy.apply(hidden, head.weight, head.bias, targets, parts.vocab_size)
    return total / (targets != IGNORED_LABEL).sum()


class ChunkedLoss(nn.Module):
    """A transformers causal LM called as the trainer calls every model, model(input_ids=...,
    labels=...) -> .loss, with the loss from `causal_lm_loss`. The LM is its one submodule, so
    DDP and FSDP see the same parameters; what it returns has no logits."""

    def __init__(self, lm: nn.Module, parts: Head):
        super().__init__()
        self.lm = lm
        self._parts = (parts,)  # a tuple: not registered again as a submodule

    def forward(self, input_ids, labels=None, attention_mask=None, position_ids=None, **_):
        (parts,) = self._parts
        hidden = parts.hidden(input_ids, attention_mask=attention_mask, position_ids=position_ids)
        if labels is None:
            return SimpleNamespace(logits=parts.logits(hidden), loss=None)
        return SimpleNamespace(logits=None, loss=causal_lm_loss(parts, hidden, labels))


def with_chunked_loss(model: nn.Module) -> nn.Module:
    """What the training steps call: a transformers causal LM wrapped in ChunkedLoss where its
    head allows; the lean GPT (chunked in its own forward) and other models as they are."""
    if hasattr(model, "lm_head_parts"):
        return model
    parts = head_of(model)
    return model if parts is None else ChunkedLoss(model, parts)


# --- evaluation --------------------------------------------------------------------------------


class CompiledScoring(nn.Module):
    """A causal LM to score with (target_scores), compiled: its final hidden states by
    torch.compile where its head allows the chunked scores (the chunks' matrix products and
    log-sum-exp stay as they are), else its whole forward pass. The LM is its one submodule."""

    def __init__(self, lm: nn.Module, mode: str):
        super().__init__()
        self.lm = lm
        parts = head_of(lm)
        hidden = parts and torch.compile(parts.hidden, mode=mode)
        self._parts = (parts and Head(hidden, parts.head, parts.vocab_size),)
        self._forward = torch.compile(lm, mode=mode) if parts is None else lm

    def lm_head_parts(self) -> Head | None:
        return self._parts[0]

    def forward(self, *args, **kwargs):
        return self._forward(*args, **kwargs)


def scoring(model: nn.Module, compile_mode: str | None) -> nn.Module:
    """The model that evaluation's scores (target_scores) take: compiled in `compile_mode`
    (train.compile), or the model itself."""
    return CompiledScoring(model, compile_mode) if compile_mode else model


@torch.no_grad()
def target_scores(
    model: nn.Module, input_ids: torch.Tensor, targets: torch.Tensor, **inputs
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each position's NLL of its target (fp32, [B, T]) and whether the target's logit is the
    largest (a tie counts as right); targets are token ids (mask what is not scored after). A
    chunk of positions at a time where the model's head allows, else from its logits."""
    parts = head_of(model)
    if parts is None:
        if "position_ids" in inputs:  # packed runs: transformers masks them apart without a cache
            inputs["use_cache"] = False
        logits = model(input_ids=input_ids, **inputs).logits.float()
        return scores_of_logits(logits, targets)
    hidden = parts.hidden(input_ids, **inputs)
    flat_hidden, flat_targets = hidden.reshape(-1, hidden.size(-1)), targets.reshape(-1)
    nll = torch.empty(flat_targets.shape, dtype=torch.float32, device=hidden.device)
    top = torch.empty(flat_targets.shape, dtype=torch.bool, device=hidden.device)
    step = chunk_positions(parts.vocab_size)
    for start in range(0, len(flat_targets), step):
        logits = parts.logits(flat_hidden[start : start + step]).float()
        chunk_nll, chunk_top = scores_of_logits(logits, flat_targets[start : start + step])
        nll[start : start + step], top[start : start + step] = chunk_nll, chunk_top
    return nll.view_as(targets), top.view_as(targets)


def scores_of_logits(
    logits: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """NLL and first rank of each target, from fp32 logits of shape targets.shape + (vocab,),
    which it overwrites (the log-sum-exp in their own buffer: no second one)."""
    flat = logits.reshape(-1, logits.size(-1))
    picked = flat.gather(1, targets.reshape(-1, 1).clamp(min=0))[:, 0]
    # amax is ~10x cheaper than argmax on the CPU, and no index is needed.
    peak = flat.amax(-1)
    top = picked >= peak
    nll = peak + flat.sub_(peak[:, None]).exp_().sum(dim=-1).log() - picked
    return nll.view_as(targets), top.view_as(targets)
