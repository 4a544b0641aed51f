"""Accuracy: the fraction of predictions equal to the references."""
import evaluate
import numpy as np

from qdrop_hf.tasks.metrics.info import pairwise_info


class Accuracy(evaluate.Metric):
    def _info(self):
        return pairwise_info("Fraction of predictions that equal their reference.", "int64")

    def _compute(self, predictions, references):
        return {"accuracy": float(np.mean(np.asarray(predictions) == np.asarray(references)))}
