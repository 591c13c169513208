"""ROUGE-L F-measure of generated answers against their references (snaketune.evaluate.answers): the
mean and the per-example scores."""

import evaluate

from snaketune.evaluate.answers import AnswerMetric


class RougeL(AnswerMetric, evaluate.Metric):
    key = "rouge_l"
    title = "ROUGE-L F-measure"
