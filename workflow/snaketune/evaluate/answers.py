"""Scores of a generated answer against its reference, per example.

Answers are compared as SQuAD's evaluation compares them: lower-cased, punctuation and the
articles a/an/the removed, whitespace collapsed (`normalize`), then split on whitespace
(`words`). exact_match is 1 when the normalized strings are equal; token F1 is the harmonic
mean of precision and recall of the words in common (as a multiset); ROUGE-L is the F-measure
of the longest common subsequence of the words (Lin 2004, beta = 1, as rouge_score's rougeL
computes it without stemming). Two empty answers agree fully; an empty one against a non-empty
one scores 0. The `evaluate` modules in snaketune/metrics wrap these.
"""

from __future__ import annotations

import re
import string
from collections import Counter

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize(text: str) -> str:
    text = text.lower().translate(_PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def words(text: str) -> list[str]:
    return normalize(text).split()


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize(prediction) == normalize(reference))


def token_f1(prediction: str, reference: str) -> float:
    predicted, expected = words(prediction), words(reference)
    if not predicted or not expected:
        return float(predicted == expected)
    common = sum((Counter(predicted) & Counter(expected)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(expected)
    return 2 * precision * recall / (precision + recall)


def longest_common_subsequence(a: list[str], b: list[str]) -> int:
    """Length of the LCS, by dynamic programming over one row (O(len(a) * len(b)) time)."""
    row = [0] * (len(b) + 1)
    for x in a:
        diagonal = 0
        for j, y in enumerate(b, start=1):
            above = row[j]
            row[j] = diagonal + 1 if x == y else max(row[j], row[j - 1])
            diagonal = above
    return row[-1]


def rouge_l(prediction: str, reference: str) -> float:
    predicted, expected = words(prediction), words(reference)
    if not predicted or not expected:
        return float(predicted == expected)
    lcs = longest_common_subsequence(predicted, expected)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(predicted), lcs / len(expected)
    return 2 * precision * recall / (precision + recall)


SCORES = {"exact_match": exact_match, "f1": token_f1, "rouge_l": rouge_l}
"""Each answer score by the name it is reported under, and its `evaluate` module's folder."""
METRIC_MODULES = {"exact_match": "exact_match", "f1": "token_f1", "rouge_l": "rouge_l"}


class AnswerMetric:
    """What the three answer modules share (mixed into each one's evaluate.Metric): strings
    in, the mean and the per-example scores of SCORES[key] out. Not a Metric itself, so that
    evaluate.load finds each module's own class."""

    key: str
    title: str

    def _info(self):
        import datasets
        import evaluate

        return evaluate.MetricInfo(
            description=f"{self.title}, SQuAD-normalized (snaketune.evaluate.answers).",
            citation="",
            inputs_description="predictions, references: answer strings of equal length",
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions, references):
        score = SCORES[self.key]
        scores = [score(p, r) for p, r in zip(predictions, references, strict=True)]
        return {self.key: sum(scores) / len(scores) if scores else 0.0, "per_example": scores}
