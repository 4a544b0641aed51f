"""Pearson correlation between predicted and reference scores (GLUE STS-B)."""
import datasets
import evaluate
import numpy as np


class Pearsonr(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Pearson linear correlation coefficient.",
            citation="",
            inputs_description="predictions, references: lists of floats.",
            features=datasets.Features({"predictions": datasets.Value("float64"), "references": datasets.Value("float64")}),
        )

    def _compute(self, predictions, references):
        x, y = np.asarray(predictions, dtype=float), np.asarray(references, dtype=float)
        return {"pearsonr": float(np.corrcoef(x, y)[0, 1])}
