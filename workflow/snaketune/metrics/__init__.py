"""The metrics every stage scores with the same way (validation during training, the evaluate
stage): perplexity from summed NLL, and classification scores through the `evaluate` modules
shipped in this folder, loaded by path (no hub needed)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

METRICS_DIR = Path(__file__).parent
MAX_LOG_PERPLEXITY = 700.0  # exp(709) overflows float64; report inf beyond this


def load_metric(name: str):
    import evaluate

    return evaluate.load(str(METRICS_DIR / name))


def ratio(numerator: float, denominator: int) -> float | None:
    """A mean over `denominator` things; None (null in metrics.json) when there is none: a
    number from nothing (0 / 0 reported as 0, or exp(0) = 1) would read as a result."""
    return numerator / denominator if denominator else None


def perplexity(nll_sum: float, count: int) -> float | None:
    """exp(mean NLL), inf past float64's range; None when nothing was scored."""
    mean = ratio(nll_sum, count)
    if mean is None:
        return None
    return math.exp(mean) if mean < MAX_LOG_PERPLEXITY else float("inf")


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
