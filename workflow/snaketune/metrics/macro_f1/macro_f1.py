"""Macro-F1 with per-class precision and recall (classes absent from both sides are skipped)."""

import datasets
import evaluate
import numpy as np


class MacroF1(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Unweighted mean of per-class F1, plus per-class precision and recall.",
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
        precision, recall, f1 = [], [], []
        for c in range(num_classes):
            tp = int(((predictions == c) & (references == c)).sum())
            predicted = int((predictions == c).sum())
            actual = int((references == c).sum())
            p = tp / predicted if predicted else 0.0
            r = tp / actual if actual else 0.0
            precision.append(p)
            recall.append(r)
            f1.append(2 * p * r / (p + r) if p + r else 0.0)
        present = [
            c for c in range(num_classes) if (predictions == c).any() or (references == c).any()
        ]
        macro = float(np.mean([f1[c] for c in present])) if present else 0.0
        return {"macro_f1": macro, "precision": precision, "recall": recall, "f1": f1}
