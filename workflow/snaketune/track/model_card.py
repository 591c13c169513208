"""The model card: a README.md for the trained model, made from the experiment's results (the
stages' manifests, the eval metrics and the config). The track job writes it beside runs.json,
logs it as README.md into the model's folders in MLflow (the train run's raw `model` artifact and
the logged model), and uses it as the registered version's description.
"""

from __future__ import annotations

import json
from typing import Any

from snaketune.tasks import intended_use
from snaketune.track.tracking_uri import redact

FILE_NAME = "README.md"
"""The card's name in the model's folders."""

HEADLINE = (
    "perplexity",
    "bits_per_byte",
    "next_token_accuracy",
    "answer_perplexity",
    "exact_match",
    "f1",
    "rouge_l",
    "accuracy",
    "macro_f1",
)
"""The metrics a reader compares runs by, in this order (those of the run's task); the other
top-level numbers of metrics.json are counts and sums behind them."""


def headline(metrics: dict[str, Any]) -> dict[str, float]:
    """The top-level numbers of metrics.json, the HEADLINE ones first."""
    numbers = {
        k: v for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)
    }
    first = {k: numbers[k] for k in HEADLINE if k in numbers}
    return {**first, **numbers}


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


def architecture(config: dict[str, Any], manifests: dict[str, dict]) -> str:
    """What the network is and where its weights started, in a phrase."""
    model = config.get("model", {})
    arch = model.get("arch", "n/a")
    if model.get("init") == "pretrained":
        text = f"`{arch}` fine-tuned from `{model.get('name_or_path')}`"
        if model.get("lora_rank"):
            text += f" with LoRA (rank {model['lora_rank']})"
    else:
        text = f"`{arch}` trained from scratch"
        if {"n_layer", "n_embd"} <= set(model):
            text += f" ({model['n_layer']} layers, width {model['n_embd']})"
    parameters = manifests.get("train", {}).get("counts", {}).get("parameters")
    return text + (f", {parameters:,} parameters" if isinstance(parameters, int) else "")


def data_summary(manifests: dict[str, dict], dataset: str) -> str:
    counts = manifests.get("split", {}).get("counts", {})
    rows = " / ".join(f"{counts.get(name, '?')} {name}" for name in ("train", "val", "test"))
    return f"`{dataset}` ({rows} rows)"


def summary(
    experiment: str, config: dict[str, Any], manifests: dict[str, dict], dataset: str
) -> list[str]:
    """What the model is: the card's and the MLflow descriptions' opening lines."""
    return [
        f"A `{config.get('task', 'n/a')}` model trained by snaketune (experiment `{experiment}`).",
        "",
        f"- Task: `{config.get('task', 'n/a')}`",
        f"- Model: {architecture(config, manifests)}",
        f"- Data: {data_summary(manifests, dataset)}",
        "",
    ]


def scores(metrics: dict[str, Any]) -> list[str]:
    """The model's headline metrics beside each baseline's on the same test split."""
    baselines = metrics.get("baselines") or {}
    ours = headline(metrics)
    names = [k for k in HEADLINE if k in ours] or list(ours)
    head = ["metric", "this model", *baselines]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for name in names:
        theirs = [_number(b[name]) if name in b else "" for b in baselines.values()]
        lines.append("| " + " | ".join([name, _number(ours[name]), *theirs]) + " |")
    return lines


def _evaluation(metrics: dict[str, Any]) -> list[str]:
    lines = ["## Evaluation (test split)", "", *scores(metrics), ""]
    if not metrics.get("baselines"):
        lines += ["Baselines: none computed for this task.", ""]
    rest = [(k, _number(v)) for k, v in headline(metrics).items() if k not in HEADLINE]
    if rest:
        lines += ["The counts and sums behind them:", "", *_table(rest, ("count", "value")), ""]
    lines += [f"Protocol: {metrics.get('protocol', 'n/a')}", ""]
    for name, values in (metrics.get("baselines") or {}).items():
        lines.append(f"- {name}: {json.dumps(values, sort_keys=True)}")
    return lines + [""] if metrics.get("baselines") else lines


def model_card(
    experiment: str,
    config: dict[str, Any],
    manifests: dict[str, dict],
    metrics: dict[str, Any],
) -> str:
    """What the model is, its metrics against the baselines, then how they were measured and
    where the data and settings came from."""
    task = config.get("task", "n/a")
    dataset = config.get("dataset", experiment)
    labels = metrics.get("label_names")
    lines = [
        f"# {experiment}",
        "",
        *summary(experiment, config, manifests, dataset),
        *_evaluation(metrics),
        *_data(manifests, dataset),
        *_tokenizer(manifests),
        *_training(manifests, config),
        "## Intended use and limits",
        "",
    ]
    if labels:
        lines += [f"Labels: {', '.join(f'`{label}`' for label in labels)}.", ""]
    lines += [intended_use(task), ""]
    lines += ["Every figure above is from the experiment's results' manifests.", ""]
    return "\n".join(lines)


def experiment_note(
    experiment: str,
    config: dict[str, Any],
    manifests: dict[str, dict],
    metrics: dict[str, Any],
    links: dict[str, str],
) -> str:
    """The parent run's description in MLflow (Markdown): what was trained on what, its
    headline metrics beside the baselines, and links to the stage runs (name: URL)."""
    dataset = config.get("dataset", experiment)
    runs = " · ".join(f"[{name}]({url})" for name, url in links.items())
    lines = [
        *summary(experiment, config, manifests, dataset),
        "Test split:",
        "",
        *scores(metrics),
        "",
        f"Stage runs: {runs}" if runs else "",
    ]
    return "\n".join(lines).strip() + "\n"
