"""Spearman rank correlation (ties get their average rank), as GLUE reports it for STS-B."""
import evaluate
import numpy as np

from qdrop_hf.tasks.metrics.info import pairwise_info


def _ranks(values):
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values), dtype=float)
    sorted_vals = values[order]
    start = 0
    for end in range(1, len(values) + 1):
        if end == len(values) or sorted_vals[end] != sorted_vals[start]:
            ranks[order[start:end]] = (start + end - 1) / 2.0
            start = end
    return ranks


class Spearmanr(evaluate.Metric):
    def _info(self):
        return pairwise_info("Spearman rank-order correlation coefficient.", "float64")

    def _compute(self, predictions, references):
        x, y = np.asarray(predictions, dtype=float), np.asarray(references, dtype=float)
        return {"spearmanr": float(np.corrcoef(_ranks(x), _ranks(y))[0, 1])}
