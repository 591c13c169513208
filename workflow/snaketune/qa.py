"""Instruction data at evaluation: how well the model answers the test split's prompts.

- answer perplexity: exp of the mean NLL of the reference answers' tokens (and the EOS that ends
  each) given their prompts, over every test example, one example per row (the tokenize stage
  keeps the test split so), the prompts' tokens scored by no one. Summed in float64 on the
  evaluation device, read back once.
- generated answers: the first `evaluate.answer_examples` test prompts, generated as
  evaluate.decoding says (snaketune.generation), scored against the references with the shipped
  `evaluate` modules exact_match, token_f1 and rouge_l (snaketune.answers).
- the retrieval baseline (snaketune.retrieval) on the same examples, scored the same way.
The per-example rows go to the samples table for a reviewer.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from snaketune.answers import METRIC_MODULES
from snaketune.batches import TokenRows
from snaketune.devices import Placement, to_device
from snaketune.generation import generate_many
from snaketune.metrics import load_metric
from snaketune.names import PROMPT, RESPONSE
from snaketune.perplexity import perplexity
from snaketune.retrieval import nearest_answers
from snaketune.settings import EvalSettings


@torch.no_grad()
def answer_nll(model, rows: TokenRows, batch_size: int, placement: Placement) -> dict:
    """Sum and count of the NLL of every target token (the answers') of `rows`."""
    model.eval()
    examples = len(rows)
    rows = rows.with_targets()  # an example cut at block_size before its answer has none
    nll = torch.zeros((), dtype=torch.float64, device=placement.device)
    count = torch.zeros((), dtype=torch.int64, device=placement.device)
    for start in range(0, len(rows), batch_size):
        batch = to_device(
            rows.batch(np.arange(start, min(len(rows), start + batch_size))), placement
        )
        labels = batch.pop("labels")
        with placement.autocasting():
            logits = model(**batch).logits
        targets = labels[:, 1:]
        losses = F.cross_entropy(
            logits[:, :-1].float().transpose(1, 2), targets, ignore_index=-100, reduction="none"
        )
        nll += losses.sum(dtype=torch.float64)
        count += (targets != -100).sum()
    nll_sum, tokens = float(nll), int(count)
    return {
        "answer_perplexity": perplexity(nll_sum, tokens),
        "answer_nll_sum": nll_sum,
        "answer_tokens": tokens,
        "answer_rows": len(rows),
        "answers_cut_off": examples - len(rows),
    }


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


def examples_to_answer(test: pd.DataFrame, settings: EvalSettings) -> pd.DataFrame:
    return test if settings.answer_examples == 0 else test.head(settings.answer_examples)


def evaluate_answers(
    model,
    tokenizer,
    train: pd.DataFrame,
    test: pd.DataFrame,
    settings: EvalSettings,
    context: int,
    placement: Placement,
) -> tuple[dict, dict, pd.DataFrame]:
    """(the model's answer metrics, the retrieval baseline's, the per-example table)."""
    chosen = examples_to_answer(test, settings)
    prompts, references = chosen[PROMPT].tolist(), chosen[RESPONSE].str.strip().tolist()
    generated, cuts = generate_many(
        model, tokenizer, prompts, settings, context, placement, settings.batch_size
    )
    generated = [text.strip() for text in generated]
    retrieved = [
        answer.strip()
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
