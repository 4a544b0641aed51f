"""Peak memory of a whole-model QDrop reconstruction against the model's size plus one block's cache.

    python benchmarks/peak_memory.py [ITERS]

MiniLM-L6-SST2, W4A8, 256 SST-2 sentences. RSS is sampled every 5 ms in a thread: the figure is the
peak during ``quantize_model`` minus the RSS before the model was loaded (interpreter, torch,
transformers), compared with model bytes + 2 x the largest block cache (the issue-7 target). On a GPU
the CUDA peak (``max_memory_allocated``) is compared the same way.
"""
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from qdrop_hf import QDropConfig, quantize_model  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class PeakRSS(threading.Thread):
    def __init__(self):
        super().__init__(daemon=True)
        self.peak, self.running = rss_mb(), True

    def run(self):
        while self.running:
            self.peak = max(self.peak, rss_mb())
            time.sleep(0.005)


def main():
    iters = int(sys.argv[1]) if len(sys.argv) > 1 else 50
    N = int(sys.argv[2]) if len(sys.argv) > 2 else 1024
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    base = rss_mb()
    path = SHARED / "models" / "minilm-l6-sst2"
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path)
    rows = (SHARED / "glue/sst2/train.tsv").read_text().splitlines()[1:N + 1]
    sentences = [r.split("\t")[0] for r in rows]
    batches = [dict(tokenizer(sentences[i:i + 32], padding=True, return_tensors="pt")) for i in range(0, N, 32)]
    model_mb = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]) / 1e6
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    monitor = PeakRSS()
    monitor.start()
    config = QDropConfig(n_bits_w=4, n_bits_a=8, iters_w=iters, num_samples=N, batch_size=32, device=device)
    model = quantize_model(model, batches, config, progress=False)
    monitor.running = False
    monitor.join()
    cache_mb = max(u["cache_mb"] for u in model.qdrop_report["units"])
    target = model_mb + 2 * cache_mb
    print(f"model {model_mb:.1f} MB, largest block cache {cache_mb:.1f} MB -> target model + 2 x cache = {target:.1f} MB")
    print(f"RSS before loading {base:.0f} MB, peak during quantization {monitor.peak:.0f} MB: "
          f"{monitor.peak - base:.1f} MB above the interpreter ({(monitor.peak - base) / target:.2f} x target)")
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() / 1e6
        print(f"CUDA peak {peak:.1f} MB ({peak / target:.2f} x target)")


if __name__ == "__main__":
    main()
