"""Binary F1 of the positive class (label 1), as GLUE reports it for MRPC and QQP."""
import evaluate
import numpy as np

from qdrop_hf.tasks.metrics.info import pairwise_info


class F1(evaluate.Metric):
    def _info(self):
        return pairwise_info("Harmonic mean of precision and recall for the positive class.", "int64")

    def _compute(self, predictions, references, pos_label=1):
        p, r = np.asarray(predictions) == pos_label, np.asarray(references) == pos_label
        tp = float(np.sum(p & r))
        denom = float(np.sum(p) + np.sum(r))
        return {"f1": 2 * tp / denom if denom else 0.0}
