"""Pearson correlation between predicted and reference scores (GLUE STS-B)."""
import evaluate
import numpy as np

from qdrop_hf.tasks.metrics.info import pairwise_info


class Pearsonr(evaluate.Metric):
    def _info(self):
        return pairwise_info("Pearson linear correlation coefficient.", "float64")

    def _compute(self, predictions, references):
        x, y = np.asarray(predictions, dtype=float), np.asarray(references, dtype=float)
        return {"pearsonr": float(np.corrcoef(x, y)[0, 1])}
