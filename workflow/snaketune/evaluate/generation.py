"""Generated continuations of prompts, on the evaluation device, decoded as evaluate.decoding
says: greedy (the most likely token each step) or top-k sampling at a temperature, seeded, so a
rerun writes the same text. GPT-2 generates through transformers' generate(), which keeps the
attention keys and values of the tokens so far (no recomputation per token), many prompts at
once, left-padded; the LSTM carries its hidden state from token to token. A prompt longer than
the context is cut from the left, leaving room for the new tokens, and the sample says how many
tokens it lost. Generation ends at EOS, at the token the tokenizer's chat template ends an
assistant turn with (stop_ids), or after max_new_tokens. With train.compile on CUDA the keys and
values go to a static cache and generate() compiles the decoding step (compile_generation).
"""

from __future__ import annotations

import torch

from snaketune.evaluate.settings import GREEDY, EvalSettings
from snaketune.names import SAMPLING_KEYS
from snaketune.train.devices import Placement

ANSWER_MARKER = "\x00answer\x00"
"""Stands for an answer while a chat template's assistant turn is rendered (end_of_turn_id)."""


def stop_ids(tokenizer) -> list[int]:
    """The tokens generation ends at, none of them in the text it returns: EOS, and the end of
    an assistant turn of the tokenizer's chat template. Examples the template composes are
    trained to end their answer with both (ChatML's `answer<|im_end|>\\n<|endoftext|>`,
    snaketune.data.reading.chat_instructions), so a model stops where its turn ends, as a chat
    model's own generation config does, rather than run on into a turn of its own."""
    ids = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    end = end_of_turn_id(tokenizer)
    return ids if end is None or end in ids else [*ids, end]


def end_of_turn_id(tokenizer) -> int | None:
    """The added token (ChatML's <|im_end|>, Llama 3's <|eot_id|>, Gemma's <end_of_turn>) that
    the tokenizer's chat template writes right after an assistant's answer; None without a
    chat template, or where the answer is followed by plain text (a newline)."""
    from jinja2 import TemplateError

    if not getattr(tokenizer, "chat_template", None):
        return None
    turns = [{"role": "user", "content": "?"}, {"role": "assistant", "content": ANSWER_MARKER}]
    try:
        text = tokenizer.apply_chat_template(turns, tokenize=False)
    except (TemplateError, ValueError):  # a template that takes no such conversation
        return None
    after = text.partition(ANSWER_MARKER)[2]
    ids = tokenizer.encode(after, add_special_tokens=False) if after else []
    return ids[0] if ids and ids[0] in tokenizer.added_tokens_decoder else None


def prompt_ids(tokenizer, prompt: str, context: int, new_tokens: int) -> tuple[list[int], int]:
    """The prompt's ids, cut from the left to leave `new_tokens` of the context free; and how
    many were cut."""
    # verbose=False: the prompt is cut below, so transformers' "longer than the maximum ...
    # will result in indexing errors" warning would mislead whoever reads the log.
    ids = tokenizer.encode(prompt, add_special_tokens=False, verbose=False)
    keep = max(1, context - new_tokens)
    return ids[-keep:], max(0, len(ids) - keep)


def generate(model, tokenizer, prompt: str, settings: EvalSettings, context: int, placement):
    """(continuation, prompt tokens cut) of one prompt."""
    (text,), (cut,) = generate_many(model, tokenizer, [prompt], settings, context, placement)
    return text, cut


@torch.no_grad()
def generate_many(
    model,
    tokenizer,
    prompts: list[str],
    settings: EvalSettings,
    context: int,
    placement: Placement,
    batch_size: int = 1,
) -> tuple[list[str], list[int]]:
    """The continuations of `prompts`, `batch_size` at a time, and each prompt's tokens cut."""
    texts, cuts, stop = [], [], stop_ids(tokenizer)
    for start in range(0, len(prompts), batch_size):
        cut_ids = [
            prompt_ids(tokenizer, p, context, settings.max_new_tokens)
            for p in prompts[start : start + batch_size]
        ]
        batch = [ids for ids, _ in cut_ids]
        torch.manual_seed(settings.seed)
        if hasattr(model, "generate"):
            new = with_cache(model, tokenizer, batch, settings, placement, stop)
        else:
            new = [with_state(model, tokenizer, ids, settings, placement, stop) for ids in batch]
        texts += [tokenizer.decode(ids, skip_special_tokens=True) for ids in new]
        cuts += [cut for _, cut in cut_ids]
    return texts, cuts


def with_cache(
    model,
    tokenizer,
    batch: list[list[int]],
    settings: EvalSettings,
    placement: Placement,
    stop: list[int] | None = None,
) -> list[list[int]]:
    """Each prompt's new tokens up to (not including) the first stop token (stop_ids when
    `stop` is None); prompts left-padded to one width."""
    stop = stop_ids(tokenizer) if stop is None else stop
    width = max(map(len, batch))
    if uses_static_cache(model):  # a few widths, so a few compiled shapes
        width = -(-width // STATIC_WIDTH_STEP) * STATIC_WIDTH_STEP
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    inputs = torch.tensor([[pad] * (width - len(ids)) + ids for ids in batch])
    mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in batch])
    sampling = {"do_sample": False}
    if settings.decoding != GREEDY:
        sampling = {"do_sample": True, **{key: getattr(settings, key) for key in SAMPLING_KEYS}}
    out = model.generate(
        input_ids=inputs.to(placement.device),
        attention_mask=mask.to(placement.device),
        max_new_tokens=settings.max_new_tokens,
        pad_token_id=pad,
        eos_token_id=stop or None,
        **sampling,
    )
    return [until_stop(row, stop) for row in out[:, width:].tolist()]


STATIC_WIDTH_STEP = 64
"""With a static cache, prompts are left-padded to a multiple of this many tokens: the cache and
the compiled decoding step then come in a few shapes, not one per prompt length."""


def uses_static_cache(model) -> bool:
    config = getattr(model, "generation_config", None)
    return getattr(config, "cache_implementation", None) == "static"


def compile_generation(model, mode: str) -> None:
    """Generation for evaluate.compile on CUDA: a static KV cache, with which transformers'
    generate() compiles the decoding step in torch.compile's `mode` (once per shape: see
    STATIC_WIDTH_STEP). The LSTM, and a model generate() cannot compile, generate as they are."""
    from transformers import CompileConfig

    if getattr(model, "_can_compile_fullgraph", False) and hasattr(model, "generation_config"):
        model.generation_config.cache_implementation = "static"
        model.generation_config.compile_config = CompileConfig(mode=mode)


def until_stop(ids: list[int], stop: list[int]) -> list[int]:
    """`ids` up to (not including) the first of the stop tokens."""
    ends = [ids.index(token) for token in stop if token in ids]
    return ids[: min(ends)] if ends else ids


def with_state(
    model,
    tokenizer,
    ids: list[int],
    settings: EvalSettings,
    placement: Placement,
    stop: list[int] | None = None,
):
    """The LSTM: the prompt once, then one token at a time from the carried state, up to the
    first stop token (stop_ids when `stop` is None)."""
    stop = stop_ids(tokenizer) if stop is None else stop
    new: list[int] = []
    logits, state = model.next_token_logits(torch.tensor([ids], device=placement.device))
    for _ in range(settings.max_new_tokens):
        next_id = pick(logits[0], settings)
        if next_id in stop:
            break
        new.append(next_id)
        step = torch.tensor([[next_id]], device=placement.device)
        logits, state = model.next_token_logits(step, state)
    return new


def pick(logits: torch.Tensor, settings: EvalSettings) -> int:
    if settings.decoding == GREEDY:
        return int(torch.argmax(logits))
    logits = logits.float() / max(settings.temperature, 1e-6)
    top = torch.topk(logits, min(settings.top_k, logits.numel()))  # most likely first
    weights = torch.softmax(top.values, dim=-1)
    if settings.top_p < 1.0:  # the tokens until their mass reaches top_p, the first always
        weights = weights * (weights.cumsum(-1) - weights < settings.top_p)
    choice = torch.multinomial(weights, 1)
    return int(top.indices[choice])
