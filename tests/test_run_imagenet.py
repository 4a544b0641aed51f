"""run_imagenet.py end to end on the real CIFAR ResNet-20 weights and CIFAR-10 images, tiny budget."""
import json
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import ROOT
from qdrop_hf import QDropConfig, quantize_model
from qdrop_hf.vision_archs import build_arch


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
    assert 0 <= results["quant"]["top1"] <= 100 and results["config"]["n_bits_w"] == 2
    assert [b["unit"] for b in results["blocks"]][:2] == ["conv1", "layer1.0"] and len(results["blocks"]) == 11
    from qdrop_hf.hf_integration import load_quantized

    reloaded = load_quantized(out)
    assert reloaded.qdrop_config.n_bits_w == 2 and (out / "README.md").exists()


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
