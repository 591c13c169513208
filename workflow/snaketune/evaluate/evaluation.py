"""Stage 7, evaluate_model: held-out metrics, with the protocol written next to each number,
on the device and in the precision training used (snaketune.train.devices).

Causal LM: perplexity, word and byte perplexity, bits per byte and next-token accuracy over the
test split's token stream (evaluate.perplexity), beside a Kneser-Ney bigram's perplexity on the
same stream (evaluate.ngram), plus sampled continuations of the configured prompts
(snaketune.evaluate.generation). Classification: accuracy, macro-F1 and a confusion matrix from
the shipped `evaluate` modules, beside two baselines on the same split (majority class;
bag-of-words logistic regression).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from snaketune import plots, tables
from snaketune.context import IN_PROCESS, JobContext
from snaketune.evaluate.generation import compile_generation, generate_many
from snaketune.evaluate.ngram import bigram_baseline
from snaketune.evaluate.paths import EvaluatePaths
from snaketune.evaluate.perplexity import count_words, score_lm, token_byte_lengths, word_perplexity
from snaketune.evaluate.qa import answer_nll, answer_protocol, evaluate_answers
from snaketune.evaluate.settings import EvalJob, EvalSettings
from snaketune.fileio import atomic_path, write_json
from snaketune.manifest import stage_manifest
from snaketune.metrics import classification_metrics, load_metric
from snaketune.names import TEST, TRAIN
from snaketune.settings import SettingsError
from snaketune.tasks import task_of
from snaketune.tokenize.shards import TokenizedData, read_shards
from snaketune.train import compile_cache, lm_loss
from snaketune.train.batches import TokenRows
from snaketune.train.devices import Placement, place, to_device
from snaketune.train.models import is_quantized, load_trained
from snaketune.train.positions import model_positions

log = logging.getLogger(__name__)
CPU = Placement(torch.device("cpu"), None)


def evaluate_lm(
    model, tokenizer, test: TokenRows, data: TokenizedData, job: EvalJob, paths, placement
) -> dict:
    """A language model's metrics (perplexities, their baselines, the answers of instruction
    data), its samples (continued prompts, answers) and its plot (the loss by position)."""
    settings = job.evaluate
    context = settings.context_length or data.block_size
    stride = settings.stride or context - 1
    limit = model_positions(model)
    if stride >= context or (limit is not None and context > limit):
        raise SettingsError(
            [
                (
                    "evaluate.stride",
                    f"{stride} must be below the context length ({context}), which must not "
                    f"exceed the model's positions ({limit}): lower evaluate.stride or "
                    "evaluate.context_length",
                )
            ]
        )
    # The test rows' tokens end to end are the test split's token stream (documents joined
    # with EOS) whichever packing made them; across_documents packing misses only its final
    # partial block. Read from the memory-mapped array a window at a time.
    stream = test.stream()
    byte_lengths = token_byte_lengths(tokenizer)
    scorer = lm_loss.scoring(model, job.compile_mode)
    metrics = score_lm(
        scorer,
        stream,
        context,
        stride,
        settings.batch_size,
        byte_lengths,
        placement,
        data.eos_token_id,
        test.separator,
    )
    counted = count_words(tokenizer, stream, data.eos_token_id)
    metrics["words"] = counted.words
    metrics["word_perplexity"], reason = word_perplexity(metrics["nll_sum"], counted)
    if reason:
        metrics["word_perplexity_note"] = reason
    metrics["context_length"], metrics["stride"] = context, stride
    train = TokenRows.open(data, TRAIN).stream()
    metrics["baselines"] = {
        "kneser_ney_bigram": bigram_baseline(
            train, stream, data.eos_token_id, data.vocab_size, test.arrays.targets
        )
    }
    prompt_rows = prompt_samples(model, tokenizer, settings, context, placement)
    if data.job.instruction:
        answers, baseline, table = evaluate_answers(
            model, tokenizer, paths.train, paths.test, settings, context, placement
        )
        metrics.update(answer_nll(scorer, test, settings.batch_size, placement, data.eos_token_id))
        metrics.update(answers)
        metrics["baselines"]["retrieval"] = baseline
        metrics["answer_protocol"] = answer_protocol(settings, metrics)
        write_table(pd.concat([prompt_rows, table], ignore_index=True), paths.samples)
    else:
        write_table(prompt_rows, paths.samples)
    metrics["protocol"] = (
        f"test split as one token stream ({len(stream)} tokens: documents joined with EOS), "
        f"after one EOS, in windows of context_length={context} tokens every stride={stride} "
        "tokens; every token is predicted once, in the first window that predicts it "
        f"({metrics['predicted_tokens']} predicted tokens)"
        f"{DOCUMENTS_APART_PROTOCOL if test.separator is not None else ''}. "
        "perplexity = exp(sum NLL / predicted tokens); word_perplexity = exp(sum NLL / "
        "whitespace-separated words of the documents); byte_perplexity = exp(sum NLL / UTF-8 "
        "bytes of the documents); "
        "bits_per_byte = sum NLL in bits / those bytes (EOS is predicted and adds no byte)"
    )
    plots.nll_by_position(metrics.pop("nll_by_position"), paths.plot)
    return metrics


def evaluate_classifier(
    model, tokenizer, test: TokenRows, data: TokenizedData, job: EvalJob, paths, placement
) -> dict:
    """A classifier's metrics (accuracy, F1s, the confusion matrix, their baselines), its
    samples (each test text's prediction) and its plot (the confusion matrix)."""
    labels = data.label_names
    scorer = torch.compile(model, mode=job.compile_mode) if job.compile_mode else model
    predictions = predict_classes(scorer, test, job.evaluate.batch_size, placement)
    metrics = classification_metrics(predictions, test.labels(), labels)
    metrics["label_names"] = labels
    metrics["baselines"] = baselines(paths.train, paths.test, labels)
    metrics["protocol"] = (
        f"{len(test)} test examples, truncated to {test.width()} tokens; argmax prediction"
    )
    write_predictions(paths.test, data.split(TEST), predictions, labels, paths.samples)
    plots.confusion_matrix(metrics["confusion_matrix"], labels, paths.plot)
    return metrics


DOCUMENTS_APART_PROTOCOL = (
    "; documents kept apart (tokenize.packing: documents_apart): within a window, positions "
    "restart at each EOS, so a token's context is its own document after the EOS before it"
)


def prompt_samples(model, tokenizer, settings: EvalSettings, context: int, placement):
    """The configured prompts' continuations (prompt tokens cut from the left to fit)."""
    generated, cuts = generate_many(
        model, tokenizer, settings.prompts, settings, context, placement, settings.batch_size
    )
    return pd.DataFrame(
        {"prompt": settings.prompts, "generated": generated, "prompt_tokens_cut": cuts}
    )


def write_table(table: pd.DataFrame, out: Path) -> None:
    with atomic_path(out) as tmp:
        table.to_csv(tmp, index=False)


@torch.no_grad()
def predict_classes(model, data: TokenRows, batch_size: int, placement=CPU) -> np.ndarray:
    model.eval()
    predictions = []
    for start in range(0, len(data), batch_size):
        batch = data.batch(np.arange(start, min(len(data), start + batch_size)))
        batch = to_device({k: v for k, v in batch.items() if k != "labels"}, placement)
        with placement.autocasting():
            logits = model(**batch).logits
        predictions.append(logits.argmax(-1))
    return torch.cat(predictions).cpu().numpy()


def baselines(train_split: Path, test_split: Path, label_names: list[str]) -> dict:
    """Majority class and bag-of-words logistic regression, on the same test documents. A
    baseline that cannot run on this data is reported as skipped, with the reason; it never
    costs the model's metrics."""
    train, test = pd.read_parquet(train_split), pd.read_parquet(test_split)
    label_ids = {n: i for i, n in enumerate(label_names)}
    y_train = train["label"].map(label_ids).to_numpy()
    y_test = test["label"].map(label_ids).to_numpy()
    majority = int(np.bincount(y_train).argmax())
    return {
        "majority_class": {
            "label": label_names[majority],
            "accuracy": float((y_test == majority).mean()),
        },
        "bow_logistic_regression": bag_of_words(train, test, y_train, y_test, len(label_names)),
    }


def bag_of_words(train, test, y_train, y_test, num_classes: int) -> dict:
    from sklearn.feature_extraction.text import CountVectorizer
    from sklearn.linear_model import LogisticRegression

    vectorizer = CountVectorizer(ngram_range=(1, 2), min_df=1)
    try:
        features = vectorizer.fit_transform(train["text"])
    except ValueError as err:  # e.g. no word of two or more characters in any document
        return {"skipped": f"no bag of words could be built from the train split ({err})"}
    classifier = LogisticRegression(max_iter=2000).fit(features, y_train)
    predicted = classifier.predict(vectorizer.transform(test["text"]))
    return {
        "accuracy": float((predicted == y_test).mean()),
        "macro_f1": load_metric("macro_f1").compute(
            predictions=predicted, references=y_test, num_classes=num_classes
        )["macro_f1"],
    }


def write_predictions(
    test_split: Path,
    shard_dir: Path,
    predictions: np.ndarray,
    label_names: list[str],
    samples_path: Path,
    limit: int = 50,
) -> None:
    """The first test examples with their true and predicted labels, for a reader to skim."""
    doc_ids = read_shards(shard_dir).column("doc_id").to_pylist()
    texts = pd.read_parquet(test_split).set_index("doc_id")
    rows = []
    for doc_id, predicted in list(zip(doc_ids, predictions, strict=True))[:limit]:
        rows.append(
            {
                "text": texts.at[doc_id, "text"],
                "label": texts.at[doc_id, "label"],
                "predicted": label_names[int(predicted)],
            }
        )
    write_table(pd.DataFrame(rows, columns=["text", "label", "predicted"]), samples_path)


def evaluate_model(paths: EvaluatePaths, job: EvalJob, context: JobContext = IN_PROCESS) -> dict:
    from transformers import AutoTokenizer

    data = TokenizedData.read(paths.tokenize_manifest, paths.shards)
    settings, test_shards = job.evaluate, data.split(TEST)
    placement = place(job.device, job.precision)
    with stage_manifest(paths, job, context=context) as record:
        record.add_input("test_shards", test_shards)
        torch.manual_seed(settings.seed)
        model = load_trained(paths.model, job.task, placement.device.type)
        if not is_quantized(model):  # a quantized base is on its GPU already
            model = model.to(placement.device)
        tokenizer = AutoTokenizer.from_pretrained(paths.model)
        if job.compile_mode and placement.cuda:
            compile_generation(model, job.compile_mode)
        test = TokenRows.open(data, TEST)
        evaluate_task = evaluate_lm if task_of(job.task).predicts_tokens else evaluate_classifier
        metrics = evaluate_task(model, tokenizer, test, data, job, paths, placement)
        metrics["test_rows"] = len(test)
        metrics["device"] = placement.describe()
        write_json(paths.metrics, metrics)
        tables.metrics_page(metrics, paths.metrics_html)
        tables.csv_page(paths.samples, paths.samples_html, "Samples")
        record.tracker.log_evaluation(metrics)
        record.counts = {"test_rows": len(test)}
        if job.compile_mode:  # what the compiled scoring found in the compile cache
            record.extra["compile_cache"] = compile_cache.usage()
    headline = {k: v for k, v in metrics.items() if not isinstance(v, dict | list)}
    log.info("metrics: %s", json.dumps(headline))
    return metrics
