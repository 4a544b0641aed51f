import pytest

from qdrop_hf.tasks.metrics import compute_metrics, load_metric


def test_shipped_metrics_load_offline_and_compute_known_values():
    assert load_metric("accuracy").compute(predictions=[1, 0, 1, 1], references=[1, 1, 1, 0])["accuracy"] == 0.5
    assert compute_metrics(["f1"], [1, 0, 1, 1], [1, 1, 1, 0])["f1"] == pytest.approx(2 * 2 / (3 + 3))
    mcc = compute_metrics(["matthews_correlation"], [1, 1, 0, 0], [1, 1, 0, 0])["matthews_correlation"]
    assert mcc == pytest.approx(1.0)
    assert compute_metrics(["matthews_correlation"], [1, 0, 1, 0], [1, 1, 0, 0])["matthews_correlation"] == pytest.approx(0.0)
    r = compute_metrics(["pearsonr", "spearmanr"], [1.0, 2.0, 3.0, 10.0], [2.0, 3.0, 4.0, 5.0])
    assert r["spearmanr"] == pytest.approx(1.0) and 0.8 < r["pearsonr"] < 1.0
    # ties take their average rank: ranks (0.5, 0.5, 2) vs (0, 1, 2)
    assert compute_metrics(["spearmanr"], [1.0, 1.0, 2.0], [1.0, 2.0, 3.0])["spearmanr"] == pytest.approx(0.8660254)


def test_unknown_metric_is_a_clear_error():
    with pytest.raises(ValueError, match="available"):
        load_metric("bleu")


def _refs(*golds):
    return [{"id": str(i), "answers": {"text": list(g), "answer_start": [0] * len(g)}} for i, g in enumerate(golds)]


def test_squad_exact_match_and_f1_follow_the_official_normalisation():
    preds = [{"id": "0", "prediction_text": "The Eiffel Tower!"},  # articles and punctuation ignored: exact
             {"id": "1", "prediction_text": "in Paris France"},    # 2 of 3 tokens against "Paris, France": F1 0.8
             {"id": "2", "prediction_text": "nothing like it"}]
    refs = _refs(["eiffel tower"], ["Paris, France", "Lyon"], ["1889"])
    r = load_metric("squad").compute(predictions=preds, references=refs)
    assert r["exact_match"] == pytest.approx(100 / 3)
    assert r["f1"] == pytest.approx(100 * (1 + 0.8 + 0) / 3)


def test_squad_v2_scores_no_answer_questions_and_finds_the_best_threshold():
    # q0 answerable and answered right; q1 unanswerable, answered "" (right); q2 unanswerable but answered.
    preds = [{"id": "0", "prediction_text": "1889", "no_answer_probability": -3.0},
             {"id": "1", "prediction_text": "", "no_answer_probability": 2.0},
             {"id": "2", "prediction_text": "Lyon", "no_answer_probability": 1.0}]
    r = load_metric("squad_v2").compute(predictions=preds, references=_refs(["1889"], [], []))
    assert r["exact"] == pytest.approx(200 / 3) and r["HasAns_exact"] == 100 and r["NoAns_exact"] == 50
    assert r["HasAns_total"] == 1 and r["NoAns_total"] == 2 and r["total"] == 3
    # answering only below no_answer_probability -3 (q0) and "" above it gets all three right
    assert r["best_exact"] == pytest.approx(100.0) and r["best_exact_thresh"] == -3.0


def test_squad_metric_refuses_missing_predictions():
    with pytest.raises(ValueError, match="no prediction"):
        load_metric("squad").compute(predictions=[{"id": "0", "prediction_text": "x"}, {"id": "7", "prediction_text": "y"}],
                                     references=_refs(["x"], ["y"]))
