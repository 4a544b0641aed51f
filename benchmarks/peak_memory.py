"""Peak memory of a whole-model QDrop reconstruction against the model's size plus one block's cache.

    python benchmarks/peak_memory.py [ITERS] [SAMPLES] [MICRO_BATCH|-] [CACHE_DTYPE|-] [CACHE_DIR]

MiniLM-L6-SST2, W4A8, SAMPLES SST-2 sentences (default 1024, the method's default), batch 32 (run in
chunks of MICRO_BATCH samples with accumulated gradients when given; "-" for none), block caches stored
in CACHE_DTYPE (float16 or bfloat16) when given, and in a temporary file in CACHE_DIR when given
(``cache_dir``: read back a batch at a time). The target's cache is always the full-precision one
(a half-precision cache counted at twice its size; its float32 attention mask makes that a slight
overcount). RSS is sampled every 2 ms in a thread. Printed:

* the peak during ``quantize_model`` minus the RSS before the model was loaded (interpreter, torch,
  transformers), against model bytes + 2 x the largest block cache;
* where it goes: the one-off cost of the first forward pass (oneDNN/MKL workspaces, measured on a
  float forward before quantizing), the RSS at the start of each unit's reconstruction (model + that
  unit's cache + the rest alive) and the largest rise above it during the loop (autograd
  intermediates of one batch, AdaRound/Adam state, drop-mask pool).

On a GPU the CUDA peak (``max_memory_allocated``) is compared with the same target.
"""
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import qdrop_hf.quantize as engine  # noqa: E402
from qdrop_hf import QDropConfig, quantize_model  # noqa: E402
from qdrop_hf.batches import run_model  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class PeakRSS(threading.Thread):
    """The peak RSS of the whole run, and of a window that ``start_window`` opens."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak = self.window_peak = rss_mb()
        self.running = True

    def start_window(self) -> float:
        self.window_peak = now = rss_mb()
        return now

    def run(self):
        while self.running:
            now = rss_mb()
            self.peak, self.window_peak = max(self.peak, now), max(self.window_peak, now)
            time.sleep(0.002)


def main():
    iters = int(sys.argv[1]) if len(sys.argv) > 1 else 50
    samples = int(sys.argv[2]) if len(sys.argv) > 2 else 1024
    micro = int(sys.argv[3]) if len(sys.argv) > 3 and sys.argv[3] != "-" else None
    cache_dtype = sys.argv[4] if len(sys.argv) > 4 and sys.argv[4] != "-" else None
    cache_dir = sys.argv[5] if len(sys.argv) > 5 else None
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    base = rss_mb()
    path = SHARED / "models" / "minilm-l6-sst2"
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path)
    rows = (SHARED / "glue/sst2/train.tsv").read_text().splitlines()[1:samples + 1]
    sentences = [r.split("\t")[0] for r in rows]
    batches = [dict(tokenizer(sentences[i:i + 32], padding=True, return_tensors="pt")) for i in range(0, samples, 32)]
    model_mb = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]) / 1e6
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.eval().to(device)
    loaded = rss_mb()
    with torch.no_grad():
        run_model(model, batches[0], device)
    first_forward = rss_mb() - loaded
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()

    monitor = PeakRSS()
    monitor.start()
    rises = []
    reconstruct = engine.reconstruct_unit

    def watched(unit, *args, **kwargs):  # the RSS at the loop's start and its largest rise during it
        start = monitor.start_window()
        out = reconstruct(unit, *args, **kwargs)
        rises.append((monitor.window_peak - start, start - base, unit.name))
        return out

    engine.reconstruct_unit = watched
    config = QDropConfig(n_bits_w=4, n_bits_a=8, iters_w=iters, num_samples=samples, batch_size=32,
                         micro_batch_size=micro, cache_dtype=cache_dtype, cache_dir=cache_dir, device=device)
    model = quantize_model(model, batches, config, progress=False)
    monitor.running = False
    monitor.join()
    engine.reconstruct_unit = reconstruct
    peak = monitor.peak
    cache_mb = max(u["cache_mb"] for u in model.qdrop_report["units"]) * (2 if cache_dtype else 1)
    target = model_mb + 2 * cache_mb
    print(f"{samples} samples, {iters} iterations/block, batch 32 in micro-batches of {micro or 32}, "
          f"cache stored in {cache_dtype or 'float32'}{' on disk in ' + cache_dir if cache_dir else ' in memory'}, torch {torch.__version__}, device {device}")
    print(f"model {model_mb:.1f} MB, largest block cache (float32) {cache_mb:.1f} MB -> target model + 2 x cache = {target:.1f} MB")
    print(f"RSS before loading {base:.0f} MB, peak during quantization {peak:.0f} MB: "
          f"{peak - base:.1f} MB above the interpreter ({(peak - base) / target:.2f} x target)")
    rise, start, name = max(rises)
    print(f"  one-off first-forward workspaces {first_forward:.1f} MB; at the start of {name}'s loop "
          f"{start:.1f} MB above the interpreter, largest rise during a loop {rise:.1f} MB")
    if device == "cuda":
        cuda_peak = torch.cuda.max_memory_allocated() / 1e6
        print(f"CUDA peak {cuda_peak:.1f} MB ({cuda_peak / target:.2f} x target)")


if __name__ == "__main__":
    main()
