"""run_glue.py end to end on the real MiniLM-L6-SST2 checkpoint and SST-2 files, with a tiny budget."""
import json
import subprocess
import sys

import pytest

from conftest import ROOT


def run_glue(*args, cwd=ROOT):
    return subprocess.run([sys.executable, str(ROOT / "run_glue.py"), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600)


def sst2_args(shared, out):
    return ["--model_name_or_path", str(shared / "models/minilm-l6-sst2"),
            "--train_file", str(shared / "glue/sst2/train.tsv"), "--validation_file", str(shared / "glue/sst2/validation.tsv"),
            "--output_dir", str(out)]


def test_run_glue_end_to_end_writes_results_and_model(shared_data, tmp_path):
    out = tmp_path / "w4a8"
    proc = run_glue(*sst2_args(shared_data, out), "--n_bits_w", "4", "--n_bits_a", "8", "--channel_wise", "--act_quant",
                    "--order", "together", "--wwq", "--waq", "--awq", "--aaq", "--prob", "0.5", "--input_prob", "0.5",
                    "--num_samples", "32", "--batch_size", "16", "--iters_w", "5", "--max_eval_samples", "128",
                    "--round_lr", "1e-3", "--export_onnx")  # 5 steps: the budget-scaled rate (0.1) would decide on noise
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert set(results) >= {"fp", "quant", "config", "time_s"}
    assert 0.75 < results["fp"]["accuracy"] <= 1.0  # the real fine-tuned checkpoint
    assert 0.5 < results["quant"]["accuracy"] <= 1.0
    assert results["config"]["n_bits_w"] == 4 and results["config"]["prob"] == 0.5
    assert len(results["blocks"]) == 8 and all(b["error"] <= b["rtn_error"] * 1.05 for b in results["blocks"])
    saved = json.loads((out / "config.json").read_text())
    assert saved["quantization_config"]["quant_method"] == "qdrop"
    assert (out / "model.safetensors").exists() and not list(out.glob("*.bin"))
    # the exported model, evaluated by ONNX Runtime on the same 128 sentences: at most 2 decided otherwise
    assert abs(results["onnx"]["accuracy"] - results["quant"]["accuracy"]) <= 2 / 128
    assert results["onnx"]["latency_ms_per_batch"] > 0 and "CPUExecutionProvider" in results["onnx"]["providers"]
    assert sorted(p.name for p in (out / "onnx").iterdir()) == ["config.json", "model.onnx", "tokenizer.json",
                                                               "tokenizer_config.json"]
    assert not list(out.glob(".onnx-*")) and not (out / ".staging").exists()


@pytest.mark.parametrize("change,message", [
    ({"--train_file": "/nonexistent/train.tsv"}, "not found"),
    ({"--n_bits_w": "9"}, "n_bits_w"),
    ({"--prob": "0"}, "prob"),
    ({"--text_columns": "review"}, "review"),
    ({"--num_samples": "100000"}, "larger than"),
])
def test_bad_input_gives_one_clear_error_and_writes_nothing(shared_data, tmp_path, change, message):
    out = tmp_path / "bad"
    args = sst2_args(shared_data, out) + ["--iters_w", "0", "--num_samples", "16"]
    for flag, value in change.items():
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
    proc = run_glue(*args)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists()


@pytest.mark.parametrize("ext,rows,message", [
    ("tsv", "sentence\tlabel\na fine film\t1\na dull film\t2\n", "outside the model's 2 classes"),
    ("jsonl", '{"text": "a fine film", "label": "positive"}\n{"text": "a dull film", "label": "negative"}\n',
     "unknown to the model"),
])
def test_labels_the_model_does_not_know_are_refused(shared_data, tmp_path, ext, rows, message):
    for split in ("train", "validation"):
        (tmp_path / f"{split}.{ext}").write_text(rows)
    out = tmp_path / "out"
    proc = run_glue("--model_name_or_path", str(shared_data / "models/minilm-l6-sst2"),
                    "--train_file", str(tmp_path / f"train.{ext}"), "--validation_file", str(tmp_path / f"validation.{ext}"),
                    "--num_samples", "2", "--iters_w", "0", "--output_dir", str(out))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists()
