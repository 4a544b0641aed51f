"""Metric modules shipped with the package and loaded through ``evaluate``'s own API.

``evaluate.load("glue", ...)`` fetches scripts from the Hub; these local modules give the same
metrics offline: ``load_metric("accuracy")`` is ``evaluate.load(<package dir>/metrics/accuracy)``.
"""
from __future__ import annotations

from pathlib import Path

import evaluate

METRICS_DIR = Path(__file__).resolve().parent

GLUE_METRICS = {
    "cola": ["matthews_correlation"],
    "stsb": ["pearsonr", "spearmanr"],
    "mrpc": ["accuracy", "f1"],
    "qqp": ["accuracy", "f1"],
}


def load_metric(name: str) -> evaluate.EvaluationModule:
    path = METRICS_DIR / name
    if not (path / f"{name}.py").exists():
        available = sorted(p.name for p in METRICS_DIR.iterdir() if (p / f"{p.name}.py").exists())
        raise ValueError(f"no shipped metric {name!r}; available: {available}")
    return evaluate.load(str(path))


def glue_metric_names(task: str | None, is_regression: bool) -> list[str]:
    if task in GLUE_METRICS:
        return GLUE_METRICS[task]
    return ["pearsonr", "spearmanr"] if is_regression else ["accuracy"]


def compute_metrics(names: list[str], predictions, references) -> dict[str, float]:
    results = {}
    for name in names:
        results.update({k: float(v) for k, v in load_metric(name).compute(predictions=predictions, references=references).items()})
    return results
