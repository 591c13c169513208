"""The model card: a README.md for the trained model, made from the experiment's results (the
stages' manifests, the eval metrics and the config). The track job writes it beside runs.json,
logs it as README.md into the model's folders in MLflow (the train run's raw `model` artifact and
the logged model), and uses it as the registered version's description.
"""

from __future__ import annotations

import json
from typing import Any

from snaketune.names import CAUSAL_LM, SEQUENCE_CLASSIFICATION
from snaketune.tracking_uri import redact

FILE_NAME = "README.md"
"""The card's name in the model's folders."""

INTENDED_USE = {
    CAUSAL_LM: (
        "Continues text in the style and domain of its training corpus (the sampled "
        "continuations in the evaluate run show what that looks like). It is a small model "
        "trained from this corpus alone: it does not know facts beyond it, states wrong things "
        "fluently, and repeats what the corpus says, its biases and personal data that "
        "cleaning did not catch included. Use it to compare runs of this pipeline, or as a "
        "draft generator whose output a person checks; not to answer users unchecked."
    ),
    SEQUENCE_CLASSIFICATION: (
        "Assigns each text one of the labels above, as learned from the training split. Every "
        "input gets one of them, however far it is from the training data; its errors follow "
        "the confusion matrix of the evaluate run, and label noise in the data bounds what it "
        "can learn. Use it on texts like the training corpus, and check its accuracy on your own "
        "labelled sample before relying on it."
    ),
}


def headline(metrics: dict[str, Any]) -> dict[str, float]:
    """The top-level numbers of metrics.json."""
    return {
        k: v for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)
    }


def _table(rows: list[tuple[str, str]], head: tuple[str, str]) -> list[str]:
    lines = [f"| {head[0]} | {head[1]} |", "| --- | --- |"]
    return lines + [f"| {a} | {b} |" for a, b in rows]


def _number(value: float) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _data(manifests: dict[str, dict], dataset: str) -> list[str]:
    download, split = manifests.get("download", {}), manifests.get("split", {})
    params = download.get("params", {})
    digest = download.get("fetched_sha256") or params.get("sha256") or "n/a"
    lines = [
        "## Data",
        "",
        f"Dataset `{dataset}` from `{redact(str(params.get('url', 'n/a')))}` (sha256 `{digest}`).",
        "",
    ]
    outputs, counts = split.get("outputs", {}), split.get("counts", {})
    rows = [
        (name, f"{counts.get(name, '?')} rows, sha256 `{outputs.get(name, 'n/a')}`")
        for name in ("train", "val", "test")
    ]
    return lines + _table(rows, ("split", "file")) + [""]


def _tokenizer(manifests: dict[str, dict]) -> list[str]:
    tokenizer, tokenize = manifests.get("tokenizer", {}), manifests.get("tokenize", {})
    params = json.dumps(tokenizer.get("params", {}), sort_keys=True)
    return [
        "## Tokenizer",
        "",
        f"Settings `{params}`; vocabulary {tokenize.get('vocab_size', 'n/a')} tokens.",
        "",
    ]


def _training(manifests: dict[str, dict], config: dict[str, Any]) -> list[str]:
    train = manifests.get("train", {})
    counts = train.get("counts", {})
    rows = [(k, _number(v)) for k, v in counts.items() if not isinstance(v, dict | list)]
    rows.append(("device", str(train.get("device", "n/a"))))
    return [
        "## Model and training",
        "",
        f"Model `{json.dumps(config.get('model', {}), sort_keys=True)}`.",
        "",
        f"Training `{json.dumps(config.get('train', {}), sort_keys=True)}`.",
        "",
        *_table(rows, ("count", "value")),
        "",
    ]


def _evaluation(metrics: dict[str, Any]) -> list[str]:
    rows = [(k, _number(v)) for k, v in headline(metrics).items()]
    lines = ["## Evaluation (test split)", "", *_table(rows, ("metric", "value")), ""]
    lines += [f"Protocol: {metrics.get('protocol', 'n/a')}", ""]
    baselines = metrics.get("baselines")
    if baselines:
        lines += ["Baselines on the same test documents:", ""]
        for name, values in baselines.items():
            lines.append(f"- {name}: {json.dumps(values, sort_keys=True)}")
        lines.append("")
    else:
        lines += ["Baselines: none computed for this task.", ""]
    return lines


def model_card(
    experiment: str,
    config: dict[str, Any],
    manifests: dict[str, dict],
    metrics: dict[str, Any],
) -> str:
    task = config.get("task", "n/a")
    dataset = config.get("dataset", experiment)
    labels = metrics.get("label_names")
    lines = [
        f"# {experiment}",
        "",
        f"A {task} model trained on `{dataset}` by snaketune "
        f"(experiment `{experiment}`; every figure below is from its results' manifests).",
        "",
        *_data(manifests, dataset),
        *_tokenizer(manifests),
        *_training(manifests, config),
        *_evaluation(metrics),
        "## Intended use and limits",
        "",
    ]
    if labels:
        lines += [f"Labels: {', '.join(f'`{label}`' for label in labels)}.", ""]
    lines += [INTENDED_USE.get(task, "Not stated for this task."), ""]
    return "\n".join(lines)
