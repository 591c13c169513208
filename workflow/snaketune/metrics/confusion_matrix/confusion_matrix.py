"""Confusion matrix: rows are reference classes, columns predicted classes."""

import datasets
import evaluate
import numpy as np


class ConfusionMatrix(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Counts of (reference, prediction) pairs as a num_classes square matrix.",
            citation="",
            inputs_description="predictions, references: integer class ids; num_classes: int",
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references, num_classes=None):
        predictions = np.asarray(predictions)
        references = np.asarray(references)
        if num_classes is None:
            num_classes = int(max(predictions.max(), references.max())) + 1
        matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
        np.add.at(matrix, (references, predictions), 1)
        return {"confusion_matrix": matrix.tolist()}
