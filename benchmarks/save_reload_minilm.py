"""Save/reload of the real MiniLM-L6-SST2 at W4A8: folder sizes against FP32, and bit-identical logits
after reloading in a fresh process.

    python benchmarks/save_reload_minilm.py [ITERS]     (default 0: round-to-nearest, fastest)
"""
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoModelForSequenceClassification, AutoTokenizer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from qdrop_hf import QDropConfig, quantize_model  # noqa: E402
from qdrop_hf.integration.model_card import folder_size
from qdrop_hf.integration.serialization import save_quantized  # noqa: E402
from qdrop_hf.nn import QuantLayer  # noqa: E402

MODEL = ROOT.parent / "shared" / "data" / "models" / "minilm-l6-sst2"
SST2 = ROOT.parent / "shared" / "data" / "glue" / "sst2"


def main():
    iters = int(sys.argv[1]) if len(sys.argv) > 1 else 0
    tok = AutoTokenizer.from_pretrained(MODEL)
    texts = [line.split("\t")[0] for line in (SST2 / "train.tsv").read_text().splitlines()[1:257]]
    calib = [dict(tok(texts[i:i + 32], padding=True, return_tensors="pt")) for i in range(0, 256, 32)]
    probe = dict(tok([line.split("\t")[0] for line in (SST2 / "validation.tsv").read_text().splitlines()[1:65]],
                     padding=True, return_tensors="pt"))
    model = AutoModelForSequenceClassification.from_pretrained(MODEL)
    layers = {n: m.weight.numel() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    model = quantize_model(model, calib, QDropConfig(n_bits_w=4, n_bits_a=8, iters_w=iters, num_samples=256),
                           progress=False)
    with torch.no_grad():
        expected = model(**probe).logits
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "minilm-w4a8"
        save_quantized(model, tok, out)
        torch.save(probe, Path(tmp) / "probe.pt")
        code = (f"import sys, torch; sys.path.insert(0, {str(ROOT)!r});"
                "from qdrop_hf.integration.serialization import load_quantized;"
                f"m = load_quantized({str(out)!r}); p = torch.load({str(Path(tmp) / 'probe.pt')!r}, weights_only=True);"
                f"torch.save(m(**p).logits.detach(), {str(Path(tmp) / 'logits.pt')!r})")
        subprocess.run([sys.executable, "-c", code], check=True)
        reloaded = torch.load(Path(tmp) / "logits.pt")
        with safe_open(str(out / "model.safetensors"), "pt") as f:
            packed = sum(f.get_slice(k).get_shape()[0] for k in f.keys() if k.endswith("weight_quantizer.packed"))
            scales = sum(torch.Size(f.get_slice(k).get_shape()).numel() * 4 for k in f.keys()
                         if ".weight_quantizer." in k and (k.endswith("scale") or k.endswith("zero_point")))
        quant_names = {n for n, m in model.named_modules() if isinstance(m, QuantLayer)}
        fp32 = sum(4 * v for n, v in layers.items() if n in quant_names)
        print(f"reloaded logits bit-identical: {torch.equal(reloaded, expected)}")
        print(f"quantized Linear weights: {packed + scales:,} bytes (codes {packed:,} + scales/zero points {scales:,}) "
              f"vs FP32 {fp32:,} bytes = 1/{fp32 / (packed + scales):.2f}")
        print(f"folder: quantized {folder_size(out):,} bytes vs FP32 checkpoint {folder_size(MODEL):,} bytes "
              "(the float word embeddings, 11.7M parameters, stay float)")


if __name__ == "__main__":
    main()
