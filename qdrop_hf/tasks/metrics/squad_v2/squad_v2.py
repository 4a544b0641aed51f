"""SQuAD v2.0: exact and F1 (percent) with unanswerable questions, split into HasAns/NoAns, plus the
best no-answer threshold (``best_exact``/``best_f1`` and their ``_thresh``) from the predictions'
``no_answer_probability``."""
import evaluate

from qdrop_hf.tasks.metrics.squad_scoring import best_over_golds, best_threshold, exact, f1, metric_info, predictions_by_id


class SquadV2(evaluate.Metric):
    def _info(self):
        return metric_info("SQuAD v2.0 exact match and F1, with unanswerable questions.", with_no_answer_probability=True)

    def _compute(self, predictions, references):
        by_id = predictions_by_id(predictions, references)
        golds = {r["id"]: r["answers"]["text"] for r in references}
        has_answer = {q: bool(g) for q, g in golds.items()}
        no_answer = {q: float(by_id[q]["no_answer_probability"]) for q in golds}
        results = {}
        for name, score in (("exact", exact), ("f1", f1)):
            scores = {q: best_over_golds(score, by_id[q]["prediction_text"], g) for q, g in golds.items()}
            results[name] = 100.0 * sum(scores.values()) / len(scores)
            for subset, keep in (("HasAns", True), ("NoAns", False)):
                part = [s for q, s in scores.items() if has_answer[q] == keep]
                if part:
                    results[f"{subset}_{name}"] = 100.0 * sum(part) / len(part)
                    results[f"{subset}_total"] = len(part)
            results[f"best_{name}"], results[f"best_{name}_thresh"] = best_threshold(scores, no_answer, has_answer)
        results["total"] = len(golds)
        return results
