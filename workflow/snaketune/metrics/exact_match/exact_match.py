"""Exact match of generated answers against their references (snaketune.evaluate.answers): the
mean and the per-example scores."""

import evaluate

from snaketune.evaluate.answers import AnswerMetric


class ExactMatch(AnswerMetric, evaluate.Metric):
    key = "exact_match"
    title = "Exact match"
