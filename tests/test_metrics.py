import pytest

from qdrop_hf.metrics import compute_metrics, load_metric


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
