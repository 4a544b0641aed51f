"""Round-to-nearest MiniLM-L6-SST2 with and without outlier migration (and token-wise activation
ranges), side by side over calibration seeds: what the transforms do before any reconstruction.

    python scripts/outlier_study.py [--bits W8A4 W4A4 W6A6] [--seeds 0 1 2]

Prints SST-2 validation accuracy (872 sentences) per arm and seed, and the mean.
"""
import argparse
import random
import statistics
import sys
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from qdrop_hf import QDropConfig, quantize_model  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
MODEL = DATA / "models" / "minilm-l6-sst2"
ARMS = {
    "no migration": dict(outlier_migration=False),
    "FFN activation migrated": dict(outlier_migration=True, migrate=["ffn_act"]),
    "migration": dict(outlier_migration=True),
    "migration + token-wise ranges": dict(outlier_migration=True, init_amode="tokenwise"),
    "migration + FFN activation 8-bit": dict(outlier_migration=True, keep_8bit=["ffn_act"]),
}


def read_tsv(path):
    return [line.rstrip("\n").split("\t") for line in path.read_text().splitlines()[1:]]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", nargs="+", default=["W8A4", "W4A4", "W6A6"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    args = parser.parse_args()
    tok = AutoTokenizer.from_pretrained(MODEL)
    train, val = read_tsv(DATA / "glue/sst2/train.tsv"), read_tsv(DATA / "glue/sst2/validation.tsv")

    def batches(rows, size):
        return [dict(tok([r[0] for r in rows[i:i + size]], padding=True, truncation=True, max_length=128,
                         return_tensors="pt")) for i in range(0, len(rows), size)]

    val_batches, labels = batches(val, 64), torch.tensor([int(r[1]) for r in val])

    @torch.no_grad()
    def accuracy(model):
        preds = torch.cat([model(**b).logits.argmax(-1) for b in val_batches])
        return 100 * (preds == labels).float().mean().item()

    print("| W/A | arm | " + " | ".join(f"seed {s}" for s in args.seeds) + " | mean |")
    print("|---|---|" + "---|" * (len(args.seeds) + 1))
    for bits in args.bits:
        w, a = (int(v) for v in bits[1:].split("A"))
        for arm in args.arms:
            scores = []
            for seed in args.seeds:
                calib = batches(random.Random(seed).sample(train, 256), 32)
                model = AutoModelForSequenceClassification.from_pretrained(MODEL)
                config = QDropConfig(n_bits_w=w, n_bits_a=a, iters_w=0, num_samples=256, seed=seed, **ARMS[arm])
                quantize_model(model, calib, config, progress=False)
                scores.append(accuracy(model))
            print(f"| {bits} | {arm} | " + " | ".join(f"{s:.2f}" for s in scores)
                  + f" | {statistics.mean(scores):.2f} |", flush=True)


if __name__ == "__main__":
    main()
