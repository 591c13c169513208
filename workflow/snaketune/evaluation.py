"""Stage 7, evaluate_model: held-out metrics, with the protocol written next to each number.

Causal LM: token perplexity = exp(sum NLL / predicted tokens) over the test shards, next-token
accuracy and bits per byte, plus generation samples. Classification: accuracy, macro-F1 and a
confusion matrix from the shipped `evaluate` modules, beside two baselines on the same split
(majority class; bag-of-words logistic regression).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from snaketune import plots
from snaketune.batches import Examples, load_examples
from snaketune.fileio import atomic_path, write_json
from snaketune.manifest import stage_manifest
from snaketune.metrics import load_metric
from snaketune.models import load_trained
from snaketune.names import CAUSAL_LM, TEST
from snaketune.settings import EvalJob, EvalSettings
from snaketune.stages import EvaluatePaths
from snaketune.tokenize.shards import TokenizedData, read_shards

log = logging.getLogger(__name__)
MAX_LOG_PERPLEXITY = 700.0  # exp(709) overflows float64; report inf beyond this


def perplexity(nll_sum: float, tokens: int) -> float:
    mean = nll_sum / max(tokens, 1)
    return math.exp(mean) if mean < MAX_LOG_PERPLEXITY else float("inf")


def byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-to-printable-character table, inverted: each character stands for one byte."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    chars, extra = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


def token_byte_lengths(tokenizer) -> np.ndarray:
    """UTF-8 bytes each token id stands for (special tokens count as one separator byte).

    Byte-level BPE tokens can hold part of a multi-byte character, which decodes to U+FFFD on
    its own; their length is read from the byte alphabet instead.
    """
    lengths = np.ones(len(tokenizer), dtype=np.int64)
    special = set(tokenizer.all_special_ids)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    byte_level = backend is not None and "ByteLevel" in type(backend.decoder).__name__
    alphabet = byte_level_alphabet()
    for token, idx in tokenizer.get_vocab().items():
        if idx in special or idx >= len(lengths):
            continue
        if byte_level and all(ch in alphabet for ch in token):
            lengths[idx] = len(token)
        else:
            lengths[idx] = len(tokenizer.convert_tokens_to_string([token]).encode("utf-8"))
    return lengths


def windows(length: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first_target) of each scoring window over a stream of `length` tokens.

    Window k covers [k*stride, k*stride + context); it scores only the positions no earlier
    window scored, so every token from position 1 on is counted once when stride <= context
    (with stride == context, the first token of each window has no context and is skipped).
    """
    out, scored_to = [], 1
    for begin in range(0, max(length - 1, 1), stride):
        end = min(begin + context, length)
        first = max(begin + 1, scored_to)
        if first < end:
            out.append((begin, end, first))
            scored_to = end
        if end == length:
            break
    return out


@torch.no_grad()
def score_lm(
    model,
    stream: torch.Tensor,
    context: int,
    stride: int,
    batch_size: int,
    byte_lengths: np.ndarray,
) -> dict:
    """Sliding-window NLL over a token stream, summed in float64."""
    model.eval()
    nll_sum, tokens, correct, n_bytes = 0.0, 0, 0, 0
    by_position = torch.zeros(context, dtype=torch.float64)
    count_by_position = torch.zeros_like(by_position)
    spans = windows(stream.numel(), context, stride)
    # Windows of equal length are batched; the stream's tail window may be shorter.
    for size in sorted({end - begin for begin, end, _ in spans}, reverse=True):
        same = [w for w in spans if w[1] - w[0] == size]
        for i in range(0, len(same), batch_size):
            group = same[i : i + batch_size]
            ids = torch.stack([stream[begin:end] for begin, end, _ in group])
            logits = model(input_ids=ids).logits[:, :-1].double()
            targets = ids[:, 1:]
            # Position j of `targets` is stream index begin + 1 + j; score those >= first.
            offsets = torch.arange(1, size)
            mask = torch.stack([begin + offsets >= first for begin, _, first in group])
            nll = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="none"
            ).view_as(targets)
            nll_sum += float(nll[mask].sum())
            by_position[1:size] += (nll * mask).sum(dim=0)
            count_by_position[1:size] += mask.sum(dim=0)
            tokens += int(mask.sum())
            correct += int((logits.argmax(-1) == targets)[mask].sum())
            n_bytes += int(byte_lengths[targets[mask].numpy()].sum())
    mean_by_position = by_position / count_by_position
    return {
        "perplexity": perplexity(nll_sum, tokens),
        "nll_sum": nll_sum,
        "nll_per_token": nll_sum / tokens,
        "next_token_accuracy": correct / tokens,
        "bits_per_byte": nll_sum / math.log(2) / max(n_bytes, 1),
        "predicted_tokens": tokens,
        "scored_bytes": n_bytes,
        "nll_by_position": mean_by_position[1:].tolist(),
    }


@torch.no_grad()
def generate(model, tokenizer, prompt: str, settings: EvalSettings, context: int) -> str:
    """Top-k sampling with a seeded generator; the same loop serves GPT-2 and the LSTM."""
    generator = torch.Generator().manual_seed(settings.seed)
    ids = torch.tensor([tokenizer.encode(prompt, add_special_tokens=False)], dtype=torch.long)
    prompt_len = ids.size(1)
    for _ in range(settings.max_new_tokens):
        logits = model(input_ids=ids[:, -context:]).logits[0, -1].float()
        logits = logits / max(settings.temperature, 1e-6)
        top = torch.topk(logits, min(settings.top_k, logits.numel()))
        probs = torch.softmax(top.values, dim=-1)
        next_id = top.indices[torch.multinomial(probs, 1, generator=generator)]
        if int(next_id) == tokenizer.eos_token_id:
            break
        ids = torch.cat([ids, next_id.view(1, 1)], dim=1)
    return tokenizer.decode(ids[0, prompt_len:], skip_special_tokens=True)


def evaluate_lm(
    model, tokenizer, test: Examples, block: int, settings: EvalSettings, samples_path: Path
):
    context = settings.context_length or block
    stride = settings.stride or context
    if stride > context:
        raise ValueError(f"evaluate.stride ({stride}) must not exceed context_length ({context})")
    limit = getattr(getattr(model, "config", None), "n_positions", None)
    if limit is not None and context > limit:
        raise ValueError(
            f"evaluate.context_length ({context}) exceeds the model's {limit} positions"
        )
    # The test rows' tokens, padding left out, end to end are the test split's token stream
    # (documents joined with EOS) whichever packing made them; across_documents packing misses
    # only its final partial block.
    stream = test.input_ids[test.attention_mask.bool()]
    metrics = score_lm(
        model, stream, context, stride, settings.batch_size, token_byte_lengths(tokenizer)
    )
    words = len(tokenizer.decode(stream[1:], skip_special_tokens=True).split())
    metrics["words"] = words
    metrics["word_perplexity"] = perplexity(metrics["nll_sum"], words)
    metrics["context_length"], metrics["stride"] = context, stride
    metrics["protocol"] = (
        f"test split as one token stream ({stream.numel()} tokens: documents joined with EOS), "
        f"scored in windows of context_length={context} tokens every stride={stride} tokens; "
        "each token is counted once, in the first window that scores it with context before it "
        f"({metrics['predicted_tokens']} predicted tokens). perplexity = exp(sum NLL / predicted "
        "tokens); word_perplexity = exp(sum NLL / whitespace-separated words of the scored text); "
        "bits_per_byte = sum NLL in bits / UTF-8 bytes of the predicted tokens (special tokens "
        "count one byte)"
    )
    with atomic_path(samples_path) as tmp:
        lines = [
            json.dumps(
                {"prompt": p, "completion": generate(model, tokenizer, p, settings, context)}
            )
            for p in settings.prompts
        ]
        tmp.write_text("".join(line + "\n" for line in lines))
    return metrics


@torch.no_grad()
def predict_classes(model, data: Examples, batch_size: int) -> np.ndarray:
    model.eval()
    predictions = []
    for start in range(0, len(data), batch_size):
        batch = data.batch(np.arange(start, min(len(data), start + batch_size)))
        logits = model(
            input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")
        ).logits
        predictions.append(logits.argmax(-1).numpy())
    return np.concatenate(predictions)


def classification_metrics(
    predictions: np.ndarray, references: np.ndarray, label_names: list[str]
) -> dict:
    n = len(label_names)
    accuracy = load_metric("accuracy").compute(predictions=predictions, references=references)
    f1 = load_metric("macro_f1").compute(
        predictions=predictions, references=references, num_classes=n
    )
    matrix = load_metric("confusion_matrix").compute(
        predictions=predictions, references=references, num_classes=n
    )
    return {
        "accuracy": accuracy["accuracy"],
        "macro_f1": f1["macro_f1"],
        "per_class": {
            name: {"precision": f1["precision"][i], "recall": f1["recall"][i], "f1": f1["f1"][i]}
            for i, name in enumerate(label_names)
        },
        "confusion_matrix": matrix["confusion_matrix"],
    }


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
    with atomic_path(samples_path) as tmp:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))


def evaluate_model(paths: EvaluatePaths, job: EvalJob) -> dict:
    from transformers import AutoTokenizer

    data = TokenizedData.read(paths.tokenize_manifest, paths.shards)
    settings, test_shards = job.evaluate, data.split(TEST)
    with stage_manifest(paths, job) as record:
        record.add_input("test_shards", test_shards)
        torch.manual_seed(settings.seed)
        model = load_trained(paths.model, job.task)
        tokenizer = AutoTokenizer.from_pretrained(paths.model)
        test = load_examples(test_shards, job.task, data.pad_token_id)
        if job.task == CAUSAL_LM:
            metrics = evaluate_lm(model, tokenizer, test, data.block_size, settings, paths.samples)
        else:
            labels = data.label_names
            predictions = predict_classes(model, test, settings.batch_size)
            metrics = classification_metrics(predictions, test.labels.numpy(), labels)
            metrics["label_names"] = labels
            metrics["baselines"] = baselines(paths.train, paths.test, labels)
            metrics["protocol"] = (
                f"{len(test)} test examples, truncated to "
                f"{test.input_ids.size(1)} tokens; argmax prediction"
            )
            write_predictions(paths.test, test_shards, predictions, labels, paths.samples)
        metrics["test_rows"] = len(test)
        if job.task == CAUSAL_LM:
            plots.nll_by_position(metrics.pop("nll_by_position"), paths.plot)
        else:
            plots.confusion_matrix(metrics["confusion_matrix"], metrics["label_names"], paths.plot)
        write_json(paths.metrics, metrics)
        record.counts = {"test_rows": len(test)}
    headline = {k: v for k, v in metrics.items() if not isinstance(v, dict | list)}
    log.info("metrics: %s", json.dumps(headline))
    return metrics
