"""SQuAD answer scoring (the official v1.1/v2.0 rules): normalise, exact match, token F1, and the
no-answer threshold search of v2. Used by the ``squad`` and ``squad_v2`` metric modules."""
from __future__ import annotations

import re
import string
from collections import Counter

import datasets
import evaluate

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower case, drop punctuation and the articles a/an/the, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def f1(prediction: str, gold: str) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not pred or not ref:  # an empty answer scores 1 only against an empty gold answer
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def best_over_golds(score, prediction: str, golds: list[str]) -> float:
    """A prediction's score is its best against any gold answer; no gold answer means "" is right."""
    return max(score(prediction, g) for g in (golds or [""]))


def metric_info(description: str, with_no_answer_probability: bool) -> evaluate.MetricInfo:
    """The MetricInfo of the squad (v1.1) and squad_v2 modules: predictions and references matched by id."""
    prediction = {"id": datasets.Value("string"), "prediction_text": datasets.Value("string")}
    if with_no_answer_probability:
        prediction["no_answer_probability"] = datasets.Value("float32")
    answers = datasets.Sequence({"text": datasets.Value("string"), "answer_start": datasets.Value("int32")})
    return evaluate.MetricInfo(
        description=description, citation="",
        inputs_description=f"predictions: [{{{', '.join(map(repr, prediction))}}}]; references: [{{'id', 'answers': "
                           "{'text': [...], 'answer_start': [...]}}] (empty lists for no answer), matched by id.",
        features=datasets.Features({"predictions": prediction,
                                    "references": {"id": datasets.Value("string"), "answers": answers}}))


def predictions_by_id(predictions: list[dict], references: list[dict]) -> dict[str, dict]:
    """Each reference's prediction, by question id; a reference without one is an error."""
    by_id = {p["id"]: p for p in predictions}
    missing = [r["id"] for r in references if r["id"] not in by_id]
    if missing:
        raise ValueError(f"no prediction for {len(missing)} question(s), e.g. {missing[:3]}")
    return by_id


def best_threshold(scores: dict[str, float], no_answer: dict[str, float], has_answer: dict[str, bool]):
    """The no-answer-probability threshold that maximises the mean score when every question above it
    is answered "", scanned in one sorted pass. Returns (best score in %, threshold)."""
    current = sum(not has_answer[q] for q in scores)  # everything answered "": right on the no-answer ones
    best, threshold = current, 0.0
    for q in sorted(scores, key=lambda q: no_answer[q]):
        current += scores[q] - (0.0 if has_answer[q] else 1.0)
        if current > best:
            best, threshold = current, no_answer[q]
    return 100.0 * best / len(scores), threshold
