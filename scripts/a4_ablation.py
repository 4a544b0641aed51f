"""Which 4-bit activations cost MiniLM-L6-SST2 the most? W8A4 round-to-nearest, with each group of
activation quantizers removed in turn (by narrowing the BERT family's activation points), without
outlier migration, with the FFN activation's, and with the LayerNorm outputs' too.

    python scripts/a4_ablation.py [--migration off ffn all]   # SST-2 validation accuracy per variant
"""
import argparse
import dataclasses
import random
import sys
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from qdrop_hf import QDropConfig, quantize_model  # noqa: E402
from qdrop_hf.families import find_family  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
MODEL = DATA / "models" / "minilm-l6-sst2"
MIGRATION = {"off": dict(outlier_migration=False), "ffn": dict(outlier_migration=True, migrate=["ffn_act"]),
             "all": dict(outlier_migration=True, migrate=["layernorm", "ffn_act"])}


def read_tsv(path):
    return [line.rstrip("\n").split("\t") for line in path.read_text().splitlines()[1:]]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--migration", nargs="+", default=list(MIGRATION), choices=list(MIGRATION))
    args = parser.parse_args()
    tok = AutoTokenizer.from_pretrained(MODEL)
    calib_rows = random.Random(0).sample(read_tsv(DATA / "glue/sst2/train.tsv"), 256)
    val = read_tsv(DATA / "glue/sst2/validation.tsv")

    def batches(rows, size):
        return [dict(tok([r[0] for r in rows[i:i + size]], padding=True, truncation=True, max_length=66,
                         return_tensors="pt")) for i in range(0, len(rows), size)]

    val_batches, labels = batches(val, 64), torch.tensor([int(r[1]) for r in val])

    @torch.no_grad()
    def accuracy(model):
        preds = torch.cat([model(**b).logits.argmax(-1) for b in val_batches])
        return (preds == labels).float().mean().item()

    base = find_family(AutoModelForSequenceClassification.from_pretrained(MODEL))
    variants = {
        "all activations 4-bit": base,
        "attention (Q/K/V/probs/context) float": dataclasses.replace(base, attention=None),
        "FFN activation (GELU output) float": dataclasses.replace(
            base, act_outputs=r"(embeddings|embeddings_project|attention\.output|encoder\.layer\.\d+|pooler)$"),
        "LayerNorm outputs (attention and layer outputs) float": dataclasses.replace(
            base, act_outputs=r"(embeddings|embeddings_project|intermediate|pooler)$"),
    }
    for migration in args.migration:
        for name, family in variants.items():
            model = AutoModelForSequenceClassification.from_pretrained(MODEL)
            config = QDropConfig(n_bits_w=8, n_bits_a=4, iters_w=0, num_samples=256, **MIGRATION[migration])
            quantize_model(model, batches(calib_rows, 32), config, family=family, progress=False)
            print(f"W8A4 RTN, outlier migration {migration:3s}, {name:55s} accuracy "
                  f"{accuracy(model) * 100:.2f}", flush=True)


if __name__ == "__main__":
    main()
