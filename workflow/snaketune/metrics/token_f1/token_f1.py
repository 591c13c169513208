"""Token-level F1 of generated answers against their references (snaketune.evaluate.answers): the
mean and the per-example scores."""

import evaluate

from snaketune.evaluate.answers import AnswerMetric


class TokenF1(AnswerMetric, evaluate.Metric):
    key = "f1"
    title = "Token-level F1"
