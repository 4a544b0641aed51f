"""Matthews correlation coefficient (multi-class form), as GLUE reports it for CoLA."""
import evaluate
import numpy as np

from qdrop_hf.tasks.metrics.info import pairwise_info


class MatthewsCorrelation(evaluate.Metric):
    def _info(self):
        return pairwise_info("Matthews correlation coefficient between predicted and reference labels.", "int64")

    def _compute(self, predictions, references):
        y_pred, y_true = np.asarray(predictions), np.asarray(references)
        classes = np.union1d(y_pred, y_true)
        conf = np.array([[np.sum((y_true == a) & (y_pred == b)) for b in classes] for a in classes], dtype=float)
        t, p = conf.sum(1), conf.sum(0)
        c, s = np.trace(conf), conf.sum()
        denom = np.sqrt((s**2 - p @ p) * (s**2 - t @ t))
        return {"matthews_correlation": float((c * s - t @ p) / denom) if denom else 0.0}
