"""Instruction data at evaluation: how well the model answers the test split's prompts.

- answer perplexity: exp of the mean NLL of the reference answers' tokens (and the EOS that ends
  each) given their prompts, over every test example, one example per row (the tokenize stage
  keeps the test split so), the prompts' tokens scored by no one. Summed in float64 on the
  evaluation device, read back once.
- generated answers: the first `evaluate.answer_examples` test prompts, generated as
  evaluate.decoding says (generation.py), scored against the references with the shipped
  `evaluate` modules exact_match, token_f1 and rouge_l (answers.py).
- the retrieval baseline (snaketune.evaluate.retrieval) on the same examples, scored the same way.
The per-example rows go to the samples table for a reviewer.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from snaketune.evaluate.answers import METRIC_MODULES
from snaketune.evaluate.generation import generate_many, stop_ids
from snaketune.evaluate.retrieval import MAX_TRAIN_EXAMPLES, nearest_answers
from snaketune.evaluate.settings import SAMPLE, EvalSettings
from snaketune.metrics import load_metric, perplexity
from snaketune.names import INSTRUCTION_COLUMNS, PROMPT, RESPONSE
from snaketune.train.batches import IGNORED_LABEL, TokenRows
from snaketune.train.devices import Placement, to_device
from snaketune.train.lm_loss import next_token_targets, target_scores


@torch.no_grad()
def answer_nll(
    model, rows: TokenRows, batch_size: int, placement: Placement, eos_token_id: int
) -> dict:
    """Sum and count of the NLL of every target token (the answers') of `rows`; the answer
    perplexity is null, with the reason, when no answer token is left to score."""
    model.eval()
    examples = len(rows)
    rows = rows.with_targets()  # an example cut at block_size before its answer has none
    nll = torch.zeros((), dtype=torch.float64, device=placement.device)
    count = torch.zeros((), dtype=torch.int64, device=placement.device)
    for start in range(0, len(rows), batch_size):
        batch = to_device(
            rows.batch(np.arange(start, min(len(rows), start + batch_size))), placement
        )
        targets = next_token_targets(batch.pop("labels"))
        scored = targets != IGNORED_LABEL
        with placement.autocasting():
            losses, _ = target_scores(model, targets=targets.clamp(min=0), **batch)
        nll += (losses.double() * scored).sum()
        count += scored.sum()
    nll_sum, tokens = float(nll), int(count)
    scored = {
        "answer_perplexity": perplexity(nll_sum, tokens),
        "answer_nll_sum": nll_sum,
        "answer_tokens": tokens,
        "answer_rows": len(rows),
        "answers_cut_off": examples - len(rows),
        # Cut at block_size inside the answer: scored without the EOS that ends the others.
        "answers_cut_short": int(np.count_nonzero(rows.last_tokens() != eos_token_id)),
    }
    if not tokens:
        scored["answer_perplexity_note"] = (
            f"no answer token to score: the prompts of all {examples} test examples fill "
            "tokenize.block_size; raise it, or shorten the prompts"
        )
    return scored


def answer_scores(predictions: list[str], references: list[str]) -> dict[str, list[float]]:
    """Each answer score of each example, from the shipped evaluate modules."""
    return {
        name: load_metric(module).compute(predictions=predictions, references=references)[
            "per_example"
        ]
        for name, module in METRIC_MODULES.items()
    }


def means(scores: dict[str, list[float]]) -> dict[str, float]:
    return {name: float(np.mean(values)) if values else 0.0 for name, values in scores.items()}


def first_rows(path: Path, limit: int | None) -> pd.DataFrame:
    """The prompt and response of a split's first `limit` examples (None: all), reading no row
    group past them."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    batches, rows = [], 0
    for batch in pq.ParquetFile(path).iter_batches(columns=list(INSTRUCTION_COLUMNS)):
        batches.append(batch)
        rows += batch.num_rows
        if limit is not None and rows >= limit:
            break
    table = pa.Table.from_batches(batches)
    return (table if limit is None else table.slice(0, limit)).to_pandas()


def evaluate_answers(
    model,
    tokenizer,
    train_split: Path,
    test_split: Path,
    settings: EvalSettings,
    context: int,
    placement: Placement,
) -> tuple[dict, dict, pd.DataFrame]:
    """(the model's answer metrics, the retrieval baseline's, the per-example table). Only the
    examples answered and the baseline's bounded index are read."""
    train = first_rows(train_split, MAX_TRAIN_EXAMPLES)
    chosen = first_rows(test_split, settings.answer_examples or None)
    prompts = chosen[PROMPT].tolist()
    references = [answer_text(tokenizer, r) for r in chosen[RESPONSE]]
    generated, cuts = generate_many(
        model, tokenizer, prompts, settings, context, placement, settings.batch_size
    )
    generated = [text.strip() for text in generated]
    retrieved = [
        answer_text(tokenizer, answer)
        for answer in nearest_answers(train[PROMPT].tolist(), train[RESPONSE].tolist(), prompts)
    ]
    model_scores, baseline_scores = (
        answer_scores(generated, references),
        answer_scores(retrieved, references),
    )
    table = pd.DataFrame(
        {
            "prompt": prompts,
            "reference": references,
            "generated": generated,
            **model_scores,
            "retrieved": retrieved,
            **{f"retrieved_{name}": values for name, values in baseline_scores.items()},
            "prompt_tokens_cut": cuts,
        }
    )
    return (
        {**means(model_scores), "answered_examples": len(chosen)},
        {**means(baseline_scores), "answered_examples": len(chosen)},
        table,
    )


def answer_text(tokenizer, response: str) -> str:
    """A response as generation returns an answer: without the special tokens a chat template
    ends it with (ChatML's <|im_end|>, which generation stops at and never returns), stripped;
    otherwise exact match would never hold, and the retrieval baseline, which answers with such
    responses, would be scored on other text than the model. Only at the end: an added token
    that is text (a run of spaces, in GPT-NeoX's vocabulary) stays where it is."""
    text, ends = response.strip(), template_ends(tokenizer)
    while found := next((end for end in ends if text.endswith(end)), None):
        text = text[: -len(found)].rstrip()
    return text


def template_ends(tokenizer) -> list[str]:
    """The text of the tokens generation stops at and of the special tokens, longest first."""
    stops = tokenizer.convert_ids_to_tokens(stop_ids(tokenizer))
    special = [t.content for t in tokenizer.added_tokens_decoder.values() if t.special]
    found = {*stops, *special, *tokenizer.all_special_tokens} - {"", None}
    return sorted(found, key=len, reverse=True)


def answer_protocol(settings: EvalSettings, metrics: dict) -> str:
    sampling = (
        f"top_k={settings.top_k}, top_p={settings.top_p} at temperature={settings.temperature}, "
        f"seed {settings.seed}"
        if settings.decoding == SAMPLE
        else "the most likely token each step"
    )
    return (
        f"answer_perplexity = exp(sum NLL / answer tokens) of the reference answers' "
        f"{metrics['answer_tokens']} tokens (each answer ending with EOS, but the "
        f"{metrics['answers_cut_short']} that block_size cut short) given their prompts, over the "
        f"{metrics['answer_rows']} test examples, one per row; the prompts' tokens are context, "
        f"not scored ({metrics['answers_cut_off']} examples whose prompt fills block_size have "
        "no answer token left and are not counted). exact_match, f1 (token-level) and rouge_l "
        "(LCS F-measure) of the answers "
        f"generated for the first {metrics['answered_examples']} test prompts "
        f"(decoding={settings.decoding}: {sampling}; at most max_new_tokens="
        f"{settings.max_new_tokens}, ending at EOS), lower-cased, punctuation and articles "
        "removed, against the reference answers; the retrieval baseline answers each prompt "
        "with the answer of the most similar train prompt (bag-of-words cosine)"
    )
