"""Inference cost of a quantized model against its float model, in PyTorch and in ONNX Runtime,
measured in one run.

For MiniLM-L6-SST2 (SST-2 validation sentences, padded per batch, at most 128 tokens), CIFAR ResNet-20
and EfficientNet-Lite0 (real images): the float model and its quantized twin (round-to-nearest at
each bit width, saved and reloaded as a user gets it; the rounding does not change the cost), each
in PyTorch eager and exported to ONNX Runtime (CPU provider, as many threads as torch), at batch 1
and 32. Prints per model and batch size the latency per batch of the four (median of alternating
rounds) and the ratios quantized / float; per model the bytes the quantized layers hold against
float, the saved safetensors and the ONNX files, and how often ONNX Runtime's top class is PyTorch's
beside how often PyTorch's own two paths agree (int8 GEMM and dequantized weights: the same
function, another summation order). The CPU's int8 features are printed first.

    python benchmarks/inference.py [--models minilm resnet20 efficientnet_lite0] [--bits W8A8 W4A8] [--rounds 5]   (needs the onnx extra)
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from qdrop_hf import QDropConfig, load_quantized, quantize_model, save_quantized  # noqa: E402
from qdrop_hf.integration.onnx_export import OnnxModel, export_inputs, export_onnx, trace  # noqa: E402
from qdrop_hf.nn import QuantLayer  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
INT8_FLAGS = ["avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8"]


def cpu_features() -> str:
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown CPU"
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    flags = set(next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), []))
    return f"{name}; int8 features: " + ", ".join(f"{f} {'yes' if f in flags else 'no'}" for f in INT8_FLAGS)


def minilm(batch_size: int):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = DATA / "models" / "minilm-l6-sst2"
    tok = AutoTokenizer.from_pretrained(path)
    rows = [line.split("\t")[0] for line in (DATA / "glue/sst2/validation.tsv").read_text().splitlines()[1:]]
    rows = rows[:64] if batch_size == 1 else rows
    batches = [dict(tok(rows[i:i + batch_size], padding=True, truncation=True, max_length=128, return_tensors="pt"))
               for i in range(0, len(rows), batch_size)]
    return AutoModelForSequenceClassification.from_pretrained(path).eval(), batches, tok


def vision(arch: str, batch_size: int):
    """The built-in network and real images, read and preprocessed as ``run_imagenet.py`` does."""
    from run_imagenet import builtin_preprocess, image_batches, image_folder
    from qdrop_hf.tasks.archs import build_arch, get_arch

    if arch == "resnet20":
        model = build_arch("resnet20", weights=str(DATA / "cifar10-resnet/resnet20-12fca82f.th"))
        images = image_folder(str(DATA / "cifar10/test")).subset(range(0, 256 * 39, 39))  # 256, every class
    else:
        model = build_arch(arch)
        images = image_folder(str(DATA / "imagenet-sample")).subset(range(64))
    if batch_size == 1:
        images = images.subset(range(32))
    preprocess = builtin_preprocess(get_arch(arch).preprocess)
    return model.eval(), [x for x, _ in image_batches(images, preprocess, batch_size)], None


def load(name: str, batch_size: int):
    return minilm(batch_size) if name == "minilm" else vision(name, batch_size)


def run_all(model, batches) -> float:
    t = time.perf_counter()
    with torch.no_grad():
        for b in batches:
            model(**b) if isinstance(b, dict) else model(b)
    return time.perf_counter() - t


def layer_bytes(model) -> int:
    """The quantized layers' tensors, plus the int8 GEMM's packed weight (one byte a weight, the only
    copy of the codes) where a Linear layer or 1x1 convolution has one."""
    held = sum(t.numel() * t.element_size() for m in model.modules() if isinstance(m, QuantLayer)
               for t in [*m.parameters(recurse=False), *m.buffers(recurse=False), *m.weight_quantizer.buffers()])
    return held + sum(m.in_features * m.out_features if isinstance(m, torch.nn.Linear) else m.in_channels * m.out_channels
                      for m in model.modules() if getattr(m, "int8_gemm", None))


def float_layer_bytes(model, names: set[str]) -> int:
    return sum(t.numel() * t.element_size() for n, m in model.named_modules() if n in names
               for t in [*m.parameters(recurse=False), *m.buffers(recurse=False)])


def quantized_copy(name: str, bits: str, tmp: Path):
    """The model at ``bits`` by round-to-nearest, saved and reloaded; its folder and its ONNX file."""
    w, a = (int(v) for v in bits[1:].split("A"))
    model, calib, tok = load(name, 32)
    quantize_model(model, calib[:4], QDropConfig(n_bits_w=w, n_bits_a=a, iters_w=0, num_samples=128 if name != "efficientnet_lite0" else 64),
                   progress=False)
    folder = tmp / f"{name}-{bits}"
    save_quantized(model, tok, folder)
    reloaded = load_quantized(folder)
    return reloaded, folder, export_onnx(reloaded, folder, calib[0])


def float_copy(name: str, tmp: Path):
    """The float model, its safetensors file and its ONNX export (the same inputs and outputs)."""
    from safetensors.torch import save_file

    model, calib, _ = load(name, 32)
    folder = tmp / f"{name}-float"
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    trace(model, export_inputs(calib[0]), folder / "model.onnx")
    return model, folder, folder / "model.onnx"


def agreement(model, runner, batches) -> float:
    """The share of items whose top class is the same from two runners (PyTorch and ONNX Runtime, or two PyTorch paths)."""
    same = total = 0
    with torch.no_grad():
        for b in batches:
            ref = model(**b) if isinstance(b, dict) else model(b)
            out = runner(**b) if isinstance(b, dict) else runner(b)
            ref, out = getattr(ref, "logits", ref), getattr(out, "logits", out)
            same += int((ref.argmax(-1) == out.argmax(-1)).sum())
            total += len(out)
    return same / total


def dequantizing_twin(model):
    """A copy of the quantized model whose Linear layers dequantize their codes instead of running on
    the int8 GEMM: the same function, summed in another order, to tell rounding ties from errors."""
    twin = copy.deepcopy(model)
    for m in twin.modules():
        if getattr(m, "int8_gemm", None) is not None:
            m.int8_gemm = None
    return twin


def rss() -> int:
    return next(int(line.split()[1]) * 1024 for line in Path("/proc/self/status").read_text().splitlines()
                if line.startswith("VmRSS"))


def ort_runner(path: Path, batch) -> tuple[OnnxModel, int]:
    """An ONNX Runtime runner and the resident memory its creation and a first batch added."""
    before = rss()
    runner = OnnxModel(path, ["CPUExecutionProvider"], threads=torch.get_num_threads())
    run_all(runner, [batch])
    return runner, rss() - before


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["minilm", "resnet20", "efficientnet_lite0"], choices=["minilm", "resnet20", "efficientnet_lite0"])
    parser.add_argument("--bits", nargs="+", default=["W8A8", "W4A8"])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, onnxruntime {ort_version()}, {torch.get_num_threads()} threads; {cpu_features()}")
    print("| model | W/A | batch | PyTorch float ms | PyTorch quantized ms | quantized / float | ORT float ms "
          "| ORT quantized ms | ORT quantized / ORT float | ORT quantized items/s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    sizes = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            fp, fp_folder, fp_onnx = float_copy(name, Path(tmp))
            ort_fp, ort_fp_rss = ort_runner(fp_onnx, load(name, 32)[1][0])
            for bits in args.bits:
                quant, folder, q_onnx = quantized_copy(name, bits, Path(tmp))
                ort_q, ort_q_rss = ort_runner(q_onnx, load(name, 32)[1][0])
                names = {n for n, m in quant.named_modules() if isinstance(m, QuantLayer)}
                runners = [fp, quant, ort_fp, ort_q]
                for batch_size in (1, 32):
                    _, batches, _ = load(name, batch_size)
                    items = sum(len(b["input_ids"]) if isinstance(b, dict) else len(b) for b in batches)
                    for r in runners:  # warm-up
                        run_all(r, batches[:2])
                    times = [[] for _ in runners]
                    for _ in range(args.rounds):
                        for r, t in zip(runners, times):
                            t.append(run_all(r, batches))
                    f, q, of, oq = (statistics.median(t) / len(batches) * 1e3 for t in times)
                    if batch_size == 32:
                        agree = agreement(quant, ort_q, batches)
                        agree_twin = agreement(quant, dequantizing_twin(quant), batches)
                    print(f"| {name} | {bits} | {batch_size} | {f:.2f} | {q:.2f} | {q / f:.3f} | {of:.2f} | {oq:.2f} "
                          f"| {oq / of:.3f} | {items / len(batches) / oq * 1e3:.1f} |", flush=True)
                sizes.append((name, bits, layer_bytes(quant), float_layer_bytes(fp, names),
                              (folder / "model.safetensors").stat().st_size, (fp_folder / "model.safetensors").stat().st_size,
                              q_onnx.stat().st_size, fp_onnx.stat().st_size, ort_q_rss, ort_fp_rss, agree, agree_twin))
    print("\n| model | W/A | quantized layers in memory / float | model.safetensors / float "
          "| ONNX file / float ONNX | ORT resident memory, quantized / float | ORT predictions = PyTorch's "
          "| PyTorch dequantizing = PyTorch int8 GEMM |")
    print("|---|---|---|---|---|---|---|---|")
    for name, bits, held, fl, folder, fp_file, q_onnx, fp_onnx, q_rss, f_rss, agree, twin in sizes:
        print(f"| {name} | {bits} | {held / 1e6:.2f} / {fl / 1e6:.2f} MB = {held / fl:.3f} | {folder / 1e6:.2f} / "
              f"{fp_file / 1e6:.2f} MB = {folder / fp_file:.3f} | {q_onnx / 1e6:.2f} / {fp_onnx / 1e6:.2f} MB = "
              f"{q_onnx / fp_onnx:.3f} | {q_rss / 1e6:.1f} / {f_rss / 1e6:.1f} MB | {100 * agree:.2f}% "
              f"| {100 * twin:.2f}% |")


def ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


if __name__ == "__main__":
    main()
