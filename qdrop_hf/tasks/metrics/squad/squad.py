"""SQuAD v1.1: exact match and token F1 (percent), each the best over a question's gold answers."""
import evaluate

from qdrop_hf.tasks.metrics.squad_scoring import best_over_golds, exact, f1, metric_info, predictions_by_id


class Squad(evaluate.Metric):
    def _info(self):
        return metric_info("SQuAD v1.1 exact match and F1 over normalised answers.", with_no_answer_probability=False)

    def _compute(self, predictions, references):
        by_id = predictions_by_id(predictions, references)
        golds = [(by_id[r["id"]]["prediction_text"], r["answers"]["text"]) for r in references]
        return {"exact_match": 100.0 * sum(best_over_golds(exact, p, g) for p, g in golds) / len(golds),
                "f1": 100.0 * sum(best_over_golds(f1, p, g) for p, g in golds) / len(golds)}
