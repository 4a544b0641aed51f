#!/usr/bin/env python
"""Quantize a fine-tuned text classifier with QDrop and evaluate it on GLUE (or your csv/tsv/json).

    python run_glue.py --model_name_or_path ../shared/data/models/minilm-l6-sst2 \
        --train_file ../shared/data/glue/sst2/train.tsv --validation_file ../shared/data/glue/sst2/validation.tsv \
        --n_bits_w 4 --n_bits_a 8 --channel_wise --act_quant --order together --wwq --waq --awq --aaq \
        --prob 0.5 --input_prob 0.5 --iters_w 300 --num_samples 256 --output_dir outputs/sst2-w4a8

Writes ``<output_dir>/results.json`` (FP and quantized metrics, every argument, timings) and the
quantized model.
"""
from __future__ import annotations

import csv
import logging
from dataclasses import dataclass, field

import numpy as np
import torch
from datasets import load_dataset
from datasets.exceptions import DatasetGenerationError
from tqdm.auto import tqdm
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from qdrop_hf.batches import padded_batches
from qdrop_hf.tasks.cli import (HubRunArguments, UserError, check_output_dir, parse_args, quantize_evaluate_save,
                          recorded_arguments, run_main)
from qdrop_hf.tasks.metrics import compute_metrics, glue_metric_names
from qdrop_hf.config import QDropConfig, RuntimeConfig

logger = logging.getLogger("run_glue")

TASK_KEYS = {
    "cola": ("sentence", None), "mnli": ("premise", "hypothesis"), "mrpc": ("sentence1", "sentence2"),
    "qnli": ("question", "sentence"), "qqp": ("question1", "question2"), "rte": ("sentence1", "sentence2"),
    "sst2": ("sentence", None), "stsb": ("sentence1", "sentence2"), "wnli": ("sentence1", "sentence2"),
}
# Text columns recognised in user files, in order of preference.
KNOWN_KEYS = [("sentence1", "sentence2"), ("question1", "question2"), ("premise", "hypothesis"),
              ("question", "sentence"), ("sentence", None), ("text", None)]
# GLUE's STS-B files as distributed without a header row.
STSB_COLUMNS = ["index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1", "sentence2", "label"]


@dataclass
class ModelArguments:
    model_name_or_path: str = field(metadata={"help": "fine-tuned checkpoint: hub id or local folder"})
    tokenizer_name: str | None = field(default=None, metadata={"help": "defaults to the model's"})
    num_labels: int | None = field(default=None, metadata={"help": "give a new head this many outputs (1: regression)"})


@dataclass
class DataArguments:
    task_name: str | None = field(default=None, metadata={"help": "GLUE task: " + ", ".join(TASK_KEYS)})
    train_file: str | None = field(default=None, metadata={"help": "csv/tsv/json(l) with the calibration split"})
    validation_file: str | None = field(default=None, metadata={"help": "csv/tsv/json(l) to evaluate on"})
    text_columns: str | None = field(default=None, metadata={"help": "one or two comma-separated text columns"})
    label_column: str = field(default="label", metadata={"help": "label column"})
    column_names: str | None = field(default=None, metadata={"help": "comma-separated names for a file without header"})
    max_seq_length: int = field(default=128, metadata={"help": "longer inputs are truncated"})
    max_eval_samples: int | None = field(default=None, metadata={"help": "evaluate on the first N rows only"})
    eval_batch_size: int = field(default=64, metadata={"help": "evaluation batch size"})


def load_raw(data: DataArguments):
    """The train split and the evaluation splits by name ("validation", plus "mismatched" for MNLI)."""
    if data.task_name is not None and data.task_name not in TASK_KEYS:
        raise UserError(f"unknown --task_name {data.task_name!r}; GLUE tasks: {', '.join(TASK_KEYS)}")
    if data.train_file is None and data.validation_file is None:
        if data.task_name is None:
            raise UserError("give --task_name or --train_file/--validation_file")
        raw = load_dataset("nyu-mll/glue", data.task_name)
        if data.task_name == "mnli":
            return raw["train"], {"validation": raw["validation_matched"], "mismatched": raw["validation_mismatched"]}
        return raw["train"], {"validation": raw["validation"]}
    files = {"train": data.train_file, "validation": data.validation_file}
    for split, path in files.items():
        if path is None:
            raise UserError(f"--{split}_file is required when loading local files")
    ext = files["train"].rsplit(".", 1)[-1].lower()
    kwargs = {}
    if ext in ("tsv", "csv"):
        kwargs["delimiter"] = "\t" if ext == "tsv" else ","
        if ext == "tsv":
            kwargs["quoting"] = csv.QUOTE_NONE  # GLUE's TSVs contain bare quote characters
        names = data.column_names.split(",") if data.column_names else None
        if names is None and data.task_name == "stsb" and not _has_header(files["train"], kwargs["delimiter"]):
            names = STSB_COLUMNS
        if names:
            kwargs["column_names"] = names
        builder = "csv"
    elif ext in ("json", "jsonl"):
        builder = "json"
    else:
        raise UserError(f"unsupported data file type .{ext}: use csv, tsv, json or jsonl")
    try:
        raw = load_dataset(builder, data_files=files, **kwargs)
    except FileNotFoundError as err:
        raise UserError(f"data file not found: {err}") from err
    except DatasetGenerationError as err:
        raise UserError(f"could not read {files}: {err.__cause__ or err}") from err
    return raw["train"], {"validation": raw["validation"]}


def _has_header(path: str, delimiter: str) -> bool:
    with open(path, encoding="utf-8") as f:
        first = f.readline().rstrip("\n").split(delimiter)
    return not any(cell.strip().replace(".", "", 1).isdigit() for cell in first)


def text_keys(data: DataArguments, columns: list[str]) -> tuple[str, str | None]:
    if data.text_columns:
        keys = data.text_columns.split(",")
        keys = (keys[0], keys[1] if len(keys) > 1 else None)
    elif data.task_name in TASK_KEYS and TASK_KEYS[data.task_name][0] in columns:
        keys = TASK_KEYS[data.task_name]
    else:
        found = [k for k in KNOWN_KEYS if k[0] in columns and (k[1] is None or k[1] in columns)]
        if not found:
            raise UserError(f"no text column found among {columns}; name them with --text_columns")
        keys = found[0]
    missing = [k for k in keys if k is not None and k not in columns]
    if missing:
        raise UserError(f"column(s) {missing} not in the data (columns: {columns})")
    return keys


def label_mapping(model_config, train, validation, label_column: str, is_regression: bool):
    """Map raw labels to the model's ids: via its label2id when it names them, else as given."""
    if is_regression:
        return None
    values = sorted(set(train.unique(label_column)) | set(validation.unique(label_column)), key=str)
    label2id = {str(k): v for k, v in (model_config.label2id or {}).items()}
    default_names = all(k.startswith("LABEL_") for k in label2id)
    if not default_names and all(str(v) in label2id for v in values):
        return {v: label2id[str(v)] for v in values}
    if all(isinstance(v, (int, np.integer)) for v in values):
        unknown = [v for v in values if not 0 <= int(v) < model_config.num_labels]
        if unknown:
            raise UserError(f"labels {unknown} are outside the model's {model_config.num_labels} classes")
        return {v: int(v) for v in values}
    unknown = [v for v in values if str(v) not in label2id]
    raise UserError(f"labels {unknown} are unknown to the model (its label2id: {model_config.label2id})")


def encode(tokenizer, rows, keys, max_len):
    first = [str(t) for t in rows[keys[0]]]
    second = [str(t) for t in rows[keys[1]]] if keys[1] else None
    return tokenizer(first, second, truncation=True, max_length=max_len)


@torch.no_grad()
def evaluate_model(model, tokenizer, encodings, references, metric_names, is_regression, batch_size, device, desc):
    model.eval().to(device)
    predictions = np.zeros(len(references), dtype=float if is_regression else int)
    batches = list(padded_batches(encodings, range(len(references)), batch_size, tokenizer))
    for chunk, batch in tqdm(batches, desc=desc):
        logits = model(**{k: v.to(device) for k, v in batch.items()}).logits.float().cpu()
        predictions[chunk] = logits[:, 0].numpy() if is_regression else logits.argmax(-1).numpy()
    return compute_metrics(metric_names, predictions.tolist(), references)


def main():
    model_args, data_args, config, runtime, run_args = parse_args(ModelArguments, DataArguments, QDropConfig, RuntimeConfig,
                                                                 HubRunArguments)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    out = check_output_dir(run_args.output_dir, run_args.overwrite_output_dir)
    train, eval_splits = load_raw(data_args)
    if data_args.max_eval_samples:
        eval_splits = {k: v.select(range(min(data_args.max_eval_samples, len(v)))) for k, v in eval_splits.items()}
    validation = eval_splits["validation"]
    keys = text_keys(data_args, train.column_names)
    if data_args.label_column not in validation.column_names:
        raise UserError(f"label column {data_args.label_column!r} not in {validation.column_names}")
    if config.num_samples > len(train):
        raise UserError(f"--num_samples {config.num_samples} is larger than the {len(train)} training rows")

    tokenizer = AutoTokenizer.from_pretrained(model_args.tokenizer_name or model_args.model_name_or_path)
    head = {"num_labels": model_args.num_labels, "ignore_mismatched_sizes": True} if model_args.num_labels else {}
    model = AutoModelForSequenceClassification.from_pretrained(model_args.model_name_or_path, **head)
    is_regression = data_args.task_name == "stsb" or model.config.num_labels == 1 or \
        validation.features[data_args.label_column].dtype.startswith("float")
    mapping = label_mapping(model.config, train, validation, data_args.label_column, is_regression)
    metric_names = glue_metric_names(data_args.task_name, is_regression)
    evaluation = {
        name: (encode(tokenizer, split, keys, data_args.max_seq_length),
               [float(v) if is_regression else mapping[v] for v in list(split[data_args.label_column])])
        for name, split in eval_splits.items()
    }

    def evaluate_all(model, desc):
        """Metrics on the validation split; other splits (MNLI mismatched) as ``<split>_<metric>``."""
        metrics = {}
        for name, (enc, refs) in evaluation.items():
            values = evaluate_model(model, tokenizer, enc, refs, metric_names, is_regression,
                                    data_args.eval_batch_size, device, f"{desc} {name}")
            metrics.update(values if name == "validation" else {f"{name}_{k}": v for k, v in values.items()})
        return metrics

    # Calibration: a seeded random subset of the train split, no labels, padding-aware batches.
    rng = np.random.default_rng(config.seed)
    calib_rows = train.select(sorted(rng.choice(len(train), config.num_samples, replace=False).tolist()))
    calib_enc = encode(tokenizer, calib_rows, keys, data_args.max_seq_length)
    calibration = [b for _, b in padded_batches(calib_enc, range(len(calib_rows)), config.batch_size, tokenizer)]

    device = runtime.resolved_device()
    results = {"config": recorded_arguments(model_args, data_args, config, runtime, run_args),
               "text_columns": keys, "metrics": metric_names}
    source = data_args.train_file or f"GLUE {data_args.task_name} train split"
    note = f"{config.num_samples} random rows of {source}"
    quantize_evaluate_save(out, results, model, calibration, config, runtime, evaluate_all, run_args, tokenizer, note)


if __name__ == "__main__":
    run_main(main)
