"""SQuAD v1.1: exact match and token F1 (percent), each the best over a question's gold answers."""
import evaluate

from qdrop_hf.metrics.squad_scoring import best_over_golds, exact, f1, features


class Squad(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="SQuAD v1.1 exact match and F1 over normalised answers.", citation="",
            inputs_description="predictions: [{'id', 'prediction_text'}]; references: [{'id', 'answers': "
                               "{'text': [...], 'answer_start': [...]}}], matched by id.",
            features=features(with_no_answer_probability=False))

    def _compute(self, predictions, references):
        answer = {p["id"]: p["prediction_text"] for p in predictions}
        missing = [r["id"] for r in references if r["id"] not in answer]
        if missing:
            raise ValueError(f"no prediction for {len(missing)} question(s), e.g. {missing[:3]}")
        golds = [(answer[r["id"]], r["answers"]["text"]) for r in references]
        return {"exact_match": 100.0 * sum(best_over_golds(exact, p, g) for p, g in golds) / len(golds),
                "f1": 100.0 * sum(best_over_golds(f1, p, g) for p, g in golds) / len(golds)}
