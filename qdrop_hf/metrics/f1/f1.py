"""Binary F1 of the positive class (label 1), as GLUE reports it for MRPC and QQP."""
import datasets
import evaluate
import numpy as np


class F1(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Harmonic mean of precision and recall for the positive class.",
            citation="",
            inputs_description="predictions, references: lists of 0/1 labels.",
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references, pos_label=1):
        p, r = np.asarray(predictions) == pos_label, np.asarray(references) == pos_label
        tp = float(np.sum(p & r))
        denom = float(np.sum(p) + np.sum(r))
        return {"f1": 2 * tp / denom if denom else 0.0}
