"""Extractive question answering: SQuAD-format data, windowed features, and answer post-processing.

Shared by ``run_squad.py`` (calibrate, evaluate) and ``scripts/finetune_qa.py`` (train a QA head), so
the two see exactly the same features. The feature and post-processing logic follows the behaviour users
of transformers' ``run_qa.py`` know: long contexts are split into windows of ``max_seq_length`` tokens
overlapping by ``doc_stride``; each window keeps the offsets of its context tokens only; an answer is the
best-scoring (start, end) pair over all windows of an example, and for SQuAD v2 the empty answer wins
when the best span does not beat the null (CLS) score by ``null_score_diff_threshold``.
"""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np


class SquadDataError(ValueError):
    """SQuAD input that cannot be used: a file with the wrong layout or missing fields, bad windows."""


def load_squad_file(path: str | Path) -> list[dict]:
    """Examples from SQuAD's nested JSON (``data/paragraphs/qas``) or a flattened json/jsonl file.

    Each example: ``id, title, context, question, answers={"text": [...], "answer_start": [...]}``;
    unanswerable v2 questions have empty answer lists.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"SQuAD file not found: {path}")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".jsonl":
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            payload = json.loads(text)
            rows = payload if isinstance(payload, list) else payload.get("data")
    except json.JSONDecodeError as err:
        raise SquadDataError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(rows, list) or not rows:
        raise SquadDataError(f"{path}: expected SQuAD JSON with a non-empty 'data' list, or flattened rows")
    if "paragraphs" in rows[0]:
        rows = _flatten(rows)
    missing = {"id", "context", "question", "answers"} - set(rows[0])
    if missing:
        raise SquadDataError(f"{path}: rows lack the field(s) {sorted(missing)}")
    return [_normalise(row) for row in rows]


def _flatten(articles: list[dict]) -> list[dict]:
    rows = []
    for article in articles:
        for paragraph in article["paragraphs"]:
            for qa in paragraph["qas"]:
                rows.append({"id": qa["id"], "title": article.get("title", ""), "context": paragraph["context"],
                             "question": qa["question"], "answers": qa.get("answers", [])})
    return rows


def _normalise(row: dict) -> dict:
    answers = row["answers"]
    if isinstance(answers, list):  # SQuAD's list of {"text", "answer_start"}
        answers = {"text": [a["text"] for a in answers], "answer_start": [int(a["answer_start"]) for a in answers]}
    return {"id": str(row["id"]), "title": row.get("title", ""), "context": row["context"],
            "question": row["question"].lstrip(), "answers": answers}


def split_by_article(examples: list[dict], n_held_out: int) -> tuple[list[dict], list[dict]]:
    """(train, held-out): the last ``n_held_out`` articles, in file order, are held out whole, so no
    context seen in training is evaluated."""
    titles = list(dict.fromkeys(e["title"] for e in examples))
    if not 0 < n_held_out < len(titles):
        raise SquadDataError(f"cannot hold out {n_held_out} of {len(titles)} articles")
    held = set(titles[-n_held_out:])
    return [e for e in examples if e["title"] not in held], [e for e in examples if e["title"] in held]


def check_windows(max_seq_length: int, doc_stride: int) -> None:
    """Windows must advance: the overlap ``doc_stride`` has to be shorter than the window."""
    if doc_stride >= max_seq_length:
        raise SquadDataError(f"doc_stride ({doc_stride}) must be smaller than max_seq_length ({max_seq_length})")


def _tokenize(tokenizer, examples, max_seq_length, doc_stride):
    pad_right = tokenizer.padding_side == "right"
    questions, contexts = [e["question"] for e in examples], [e["context"] for e in examples]
    enc = tokenizer(questions if pad_right else contexts, contexts if pad_right else questions,
                    truncation="only_second" if pad_right else "only_first", max_length=max_seq_length,
                    stride=doc_stride, return_overflowing_tokens=True, return_offsets_mapping=True)
    return enc, (1 if pad_right else 0)


def prepare_features(tokenizer, examples: list[dict], max_seq_length: int = 384, doc_stride: int = 128,
                     with_positions: bool = False) -> dict[str, list]:
    """Windowed features. Always: model inputs, ``example_index``, and ``offset_mapping`` with ``None``
    outside the context. With ``with_positions``: ``start_positions``/``end_positions`` of the first
    gold answer, or the CLS index (0) when the answer is not inside the window (training targets)."""
    check_windows(max_seq_length, doc_stride)
    enc, context_id = _tokenize(tokenizer, examples, max_seq_length, doc_stride)
    features = {k: enc[k] for k in enc.keys() if k not in ("offset_mapping", "overflow_to_sample_mapping")}
    features["example_index"] = list(enc["overflow_to_sample_mapping"])
    offsets, starts, ends = [], [], []
    for i, example_index in enumerate(features["example_index"]):
        sequence_ids = enc.sequence_ids(i)
        window = [o if sequence_ids[k] == context_id else None for k, o in enumerate(enc["offset_mapping"][i])]
        offsets.append(window)
        if with_positions:
            start, end = _answer_tokens(window, examples[example_index]["answers"])
            starts.append(start)
            ends.append(end)
    features["offset_mapping"] = offsets
    if with_positions:
        features["start_positions"], features["end_positions"] = starts, ends
    return features


def _answer_tokens(window: list, answers: dict) -> tuple[int, int]:
    if not answers["text"]:
        return 0, 0
    char_start = answers["answer_start"][0]
    char_end = char_start + len(answers["text"][0])
    inside = [k for k, o in enumerate(window) if o is not None]
    if not inside or window[inside[0]][0] > char_start or window[inside[-1]][1] < char_end:
        return 0, 0
    start = next(k for k in inside if window[k][1] > char_start)
    end = next(k for k in reversed(inside) if window[k][0] < char_end)
    return start, end


def postprocess_predictions(examples: list[dict], features: dict, start_logits: list, end_logits: list,
                            version_2_with_negative: bool = False, n_best_size: int = 20, max_answer_length: int = 30,
                            null_score_diff_threshold: float = 0.0) -> tuple[dict[str, str], dict[str, float]]:
    """Answer text per example id, and the null-minus-best score difference per id (v2's
    ``no_answer_probability`` input; higher means "no answer").

    ``start_logits[i]``/``end_logits[i]`` are the logits of feature ``i`` (any length up to its
    ``offset_mapping``; padding beyond it is ignored)."""
    by_example = defaultdict(list)
    for i, example_index in enumerate(features["example_index"]):
        by_example[example_index].append(i)
    answers, null_diffs = {}, {}
    for example_index, example in enumerate(examples):
        best_text, best_score, null_score = "", -np.inf, np.inf
        for i in by_example[example_index]:
            offsets = features["offset_mapping"][i]
            start, end = np.asarray(start_logits[i])[: len(offsets)], np.asarray(end_logits[i])[: len(offsets)]
            null_score = min(null_score, float(start[0] + end[0]))
            best_ends = np.argsort(end)[::-1][:n_best_size]
            for s in np.argsort(start)[::-1][:n_best_size]:
                if offsets[s] is None:
                    continue
                for e in best_ends:
                    if offsets[e] is None or e < s or e - s + 1 > max_answer_length:
                        continue
                    score = float(start[s] + end[e])
                    if score > best_score:
                        best_score = score
                        best_text = example["context"][offsets[s][0]:offsets[e][1]]
        diff = null_score - best_score
        null_diffs[example["id"]] = diff
        answers[example["id"]] = "" if version_2_with_negative and diff > null_score_diff_threshold else best_text
    return answers, null_diffs
