"""Sampled continuations of prompts, on the evaluation device: top-k sampling at a temperature,
seeded, so a rerun writes the same samples. GPT-2 generates through transformers' generate(),
which keeps the attention keys and values of the tokens so far (no recomputation per token);
the LSTM carries its hidden state from token to token. A prompt longer than the context is cut
from the left, leaving room for the new tokens, and the sample says how many tokens it lost.
"""

from __future__ import annotations

import torch

from snaketune.devices import Placement
from snaketune.settings import EvalSettings


def prompt_ids(tokenizer, prompt: str, context: int, new_tokens: int) -> tuple[list[int], int]:
    """The prompt's ids, cut from the left to leave `new_tokens` of the context free; and how
    many were cut."""
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    keep = max(1, context - new_tokens)
    return ids[-keep:], max(0, len(ids) - keep)


@torch.no_grad()
def generate(model, tokenizer, prompt: str, settings: EvalSettings, context: int, placement):
    """(continuation, prompt tokens cut) of one prompt."""
    ids, cut = prompt_ids(tokenizer, prompt, context, settings.max_new_tokens)
    torch.manual_seed(settings.seed)
    if hasattr(model, "generate"):
        new = with_cache(model, tokenizer, ids, settings, placement)
    else:
        new = with_state(model, tokenizer, ids, settings, placement)
    return tokenizer.decode(new, skip_special_tokens=True), cut


def with_cache(model, tokenizer, ids: list[int], settings: EvalSettings, placement: Placement):
    inputs = torch.tensor([ids], device=placement.device)
    out = model.generate(
        input_ids=inputs,
        attention_mask=torch.ones_like(inputs),
        do_sample=True,
        top_k=settings.top_k,
        temperature=settings.temperature,
        max_new_tokens=settings.max_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return out[0, len(ids) :].tolist()


def with_state(model, tokenizer, ids: list[int], settings: EvalSettings, placement: Placement):
    """The LSTM: the prompt once, then one token at a time from the carried state."""
    new: list[int] = []
    logits, state = model.next_token_logits(torch.tensor([ids], device=placement.device))
    for _ in range(settings.max_new_tokens):
        next_id = sample(logits[0], settings)
        if next_id == tokenizer.eos_token_id:
            break
        new.append(next_id)
        step = torch.tensor([[next_id]], device=placement.device)
        logits, state = model.next_token_logits(step, state)
    return new


def sample(logits: torch.Tensor, settings: EvalSettings) -> int:
    logits = logits.float() / max(settings.temperature, 1e-6)
    top = torch.topk(logits, min(settings.top_k, logits.numel()))
    choice = torch.multinomial(torch.softmax(top.values, dim=-1), 1)
    return int(top.indices[choice])
