#!/usr/bin/env python
"""Quantize an extractive QA model with QDrop and evaluate exact match / F1 on SQuAD v1.1 or v2.0.

    python run_squad.py --model_name_or_path outputs/minilm-squad \
        --train_file outputs/minilm-squad/train.jsonl --validation_file outputs/minilm-squad/validation.jsonl \
        --n_bits_w 4 --n_bits_a 8 --channel_wise --act_quant --order together --wwq --waq --awq --aaq \
        --prob 0.5 --input_prob 0.5 --iters_w 200 --num_samples 256 --output_dir outputs/squad-w4a8

``--dataset_name squad`` (or ``squad_v2`` with ``--version_2_with_negative``) reads the Hub instead.
Calibration windows come from the train split (no answers used); evaluation windows, post-processing
(n-best, ``max_answer_length``, the v2 null threshold) and the metric follow transformers' ``run_qa.py``.
Writes ``<output_dir>/results.json`` and the quantized model.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import torch
from datasets import load_dataset
from tqdm.auto import tqdm
from transformers import AutoModelForQuestionAnswering, AutoTokenizer

from qdrop_hf.batches import padded_batches
from qdrop_hf.tasks.cli import (HubRunArguments, UserError, check_output_dir, parse_args, quantize_evaluate_save,
                          recorded_arguments, run_main)
from qdrop_hf.tasks.metrics import load_metric
from qdrop_hf.tasks.qa import SquadDataError, check_windows, load_squad_file, postprocess_predictions, prepare_features
from qdrop_hf.config import QDropConfig, RuntimeConfig

logger = logging.getLogger("run_squad")


@dataclass
class ModelArguments:
    model_name_or_path: str = field(metadata={"help": "extractive QA checkpoint: hub id or local folder"})
    tokenizer_name: str | None = field(default=None, metadata={"help": "defaults to the model's"})


@dataclass
class DataArguments:
    dataset_name: str | None = field(default=None, metadata={"help": "hub dataset: squad or squad_v2"})
    dataset_config_name: str | None = field(default=None, metadata={"help": "its configuration, if any"})
    train_file: str | None = field(default=None, metadata={"help": "SQuAD json (nested or flattened) or jsonl: calibration"})
    validation_file: str | None = field(default=None, metadata={"help": "SQuAD json or jsonl to evaluate on"})
    version_2_with_negative: bool = field(default=False, metadata={"help": "some questions have no answer (SQuAD v2)"})
    max_seq_length: int = field(default=384, metadata={"help": "window length in tokens"})
    doc_stride: int = field(default=128, metadata={"help": "overlap between windows of a long context"})
    n_best_size: int = field(default=20, metadata={"help": "start/end candidates per window"})
    max_answer_length: int = field(default=30, metadata={"help": "longest answer in tokens"})
    null_score_diff_threshold: float = field(default=0.0, metadata={"help": "v2: answer '' when null - best > this"})
    max_eval_samples: int | None = field(default=None, metadata={"help": "evaluate on the first N questions only"})
    eval_batch_size: int = field(default=64, metadata={"help": "evaluation batch size"})


def load_examples(data: DataArguments) -> tuple[list[dict], list[dict]]:
    """(train, validation) examples as ``id, title, context, question, answers`` dicts."""
    if data.train_file or data.validation_file:
        if not (data.train_file and data.validation_file):
            raise UserError("give both --train_file and --validation_file")
        try:
            return load_squad_file(data.train_file), load_squad_file(data.validation_file)
        except SquadDataError as err:
            raise UserError(str(err)) from err
    if not data.dataset_name:
        raise UserError("give --dataset_name (squad, squad_v2) or --train_file/--validation_file")
    raw = load_dataset(data.dataset_name, data.dataset_config_name)
    return [dict(r) for r in raw["train"]], [dict(r) for r in raw["validation"]]


def model_input_keys(tokenizer, features) -> list[str]:
    return [k for k in tokenizer.model_input_names if k in features]


@torch.no_grad()
def evaluate_model(model, tokenizer, examples, features, data: DataArguments, device, desc) -> dict[str, float]:
    """Logits for every window, post-processed into answers, scored with the shipped squad metric."""
    model.eval().to(device)
    n = len(features["input_ids"])
    start_logits, end_logits = [None] * n, [None] * n
    batches = list(padded_batches(features, range(n), data.eval_batch_size, tokenizer, model_input_keys(tokenizer, features)))
    for chunk, batch in tqdm(batches, desc=desc):
        out = model(**{k: v.to(device) for k, v in batch.items()})
        for row, i in enumerate(chunk):
            start_logits[i] = out.start_logits[row].float().cpu().numpy()
            end_logits[i] = out.end_logits[row].float().cpu().numpy()
    answers, null_diffs = postprocess_predictions(
        examples, features, start_logits, end_logits, data.version_2_with_negative, data.n_best_size,
        data.max_answer_length, data.null_score_diff_threshold)
    references = [{"id": e["id"], "answers": e["answers"]} for e in examples]
    if data.version_2_with_negative:
        predictions = [{"id": q, "prediction_text": a, "no_answer_probability": float(np.clip(null_diffs[q], -1e30, 1e30))}
                       for q, a in answers.items()]
        metric = load_metric("squad_v2")
    else:
        predictions = [{"id": q, "prediction_text": a} for q, a in answers.items()]
        metric = load_metric("squad")
    return {k: float(v) for k, v in metric.compute(predictions=predictions, references=references).items()}


def calibration_batches(tokenizer, train, data: DataArguments, num_samples: int, batch_size: int, seed: int) -> list:
    """``num_samples`` seeded random windows of the train split, padding-aware batches; answers unused."""
    rng = np.random.default_rng(seed)
    chosen = [train[i] for i in sorted(rng.choice(len(train), min(num_samples, len(train)), replace=False))]
    features = prepare_features(tokenizer, chosen, data.max_seq_length, data.doc_stride)
    n = len(features["input_ids"])
    if num_samples > n:
        raise UserError(f"--num_samples {num_samples} is larger than the {n} windows of the training data")
    windows = sorted(rng.choice(n, num_samples, replace=False).tolist())
    keys = model_input_keys(tokenizer, features)
    return [b for _, b in padded_batches(features, windows, batch_size, tokenizer, keys)]


def main():
    model_args, data_args, config, runtime, run_args = parse_args(ModelArguments, DataArguments, QDropConfig, RuntimeConfig,
                                                                 HubRunArguments)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        check_windows(data_args.max_seq_length, data_args.doc_stride)  # before any work
    except SquadDataError as err:
        raise UserError(str(err)) from err
    out = check_output_dir(run_args.output_dir, run_args.overwrite_output_dir)
    train, validation = load_examples(data_args)
    if data_args.max_eval_samples:
        validation = validation[:data_args.max_eval_samples]
    if not data_args.version_2_with_negative and any(not e["answers"]["text"] for e in validation):
        raise UserError("the validation data has unanswerable questions: pass --version_2_with_negative")

    tokenizer = AutoTokenizer.from_pretrained(model_args.tokenizer_name or model_args.model_name_or_path)
    model = AutoModelForQuestionAnswering.from_pretrained(model_args.model_name_or_path)
    calibration = calibration_batches(tokenizer, train, data_args, config.num_samples, config.batch_size,
                                      config.seed)
    features = prepare_features(tokenizer, validation, data_args.max_seq_length, data_args.doc_stride)
    device = runtime.resolved_device()

    def evaluate(model, desc):
        return evaluate_model(model, tokenizer, validation, features, data_args, device, desc)

    results = {"config": recorded_arguments(model_args, data_args, config, runtime, run_args),
               "eval_questions": len(validation), "eval_windows": len(features["input_ids"])}
    source = data_args.train_file or f"{data_args.dataset_name} train split"
    note = f"{config.num_samples} random windows of {source}"
    quantize_evaluate_save(out, results, model, calibration, config, runtime, evaluate, run_args, tokenizer, note)


if __name__ == "__main__":
    run_main(main)
