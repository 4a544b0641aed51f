"""Calibration batches: taking them from any iterable, moving them, and feeding them to a model.

A batch is what a user would feed the model: a dict of keyword tensors (tokenizer/collator output),
a tensor, or a tuple/list whose first element is the input (an ``(images, labels)`` pair).
"""
from __future__ import annotations

from typing import Any, Iterable

import torch

LABEL_KEYS = ("labels", "label", "start_positions", "end_positions")


class CalibrationDataError(ValueError):
    """The calibration data is empty or not something a model can be called on."""


def map_tensors(obj: Any, fn) -> Any:
    """``obj`` (a tensor, or dicts/lists/tuples of them) with ``fn`` applied to every tensor."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: map_tensors(v, fn) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(map_tensors(v, fn) for v in obj)
    return obj


def to_device(obj: Any, device) -> Any:
    return map_tensors(obj, lambda t: t.to(device))


def to_channels_last(obj: Any) -> Any:
    """``obj`` with its 4-D floating-point tensors (images) in channels-last memory order, values unchanged."""
    return map_tensors(obj, lambda t: t.contiguous(memory_format=torch.channels_last)
                       if t.dim() == 4 and t.is_floating_point() else t)


def is_channels_last(x: torch.Tensor) -> bool:
    """Dense in channels-last memory order and not also contiguous: the one strided layout the fused
    kernels read in place (``flat_order`` in csrc/fake_quant.cpp) and the block caches keep."""
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def model_inputs(batch: Any) -> Any:
    """Drop labels, so that calibration never computes a loss or needs labels."""
    if isinstance(batch, dict) or hasattr(batch, "keys"):
        return {k: v for k, v in dict(batch).items() if k not in LABEL_KEYS}
    if isinstance(batch, (list, tuple)):
        return batch[0]
    return batch


def batch_len(batch: Any) -> int:
    first = next(iter(batch.values())) if isinstance(batch, dict) else batch
    if not isinstance(first, torch.Tensor):
        raise CalibrationDataError(f"calibration batches must hold tensors, got {type(first).__name__}")
    return first.shape[0]


def take_batches(data: Iterable, num_samples: int) -> list:
    """The first ``num_samples`` samples of ``data`` as a list of model-input batches."""
    batches, seen = [], 0
    for batch in data:
        batch = model_inputs(batch)
        n = batch_len(batch)
        if seen + n > num_samples:
            keep = num_samples - seen
            batch = {k: v[:keep] for k, v in batch.items()} if isinstance(batch, dict) else batch[:keep]
            n = keep
        if n:
            batches.append(batch)
            seen += n
        if seen >= num_samples:
            break
    if not batches:
        raise CalibrationDataError("the calibration data is empty: QDrop needs at least one sample")
    return batches


def run_model(model: torch.nn.Module, batch: Any, device) -> Any:
    batch = to_device(batch, device)
    return model(**batch) if isinstance(batch, dict) else model(batch)


def token_mask(batch: Any) -> torch.Tensor | None:
    """The padding mask of a text batch (1 = real token), used to keep padding out of the loss."""
    return batch.get("attention_mask") if isinstance(batch, dict) else None


def padded_batches(encodings, indices, batch_size: int, tokenizer, keys=None):
    """Padding-aware text batches: ``(indices, batch)`` pairs with samples sorted by length and each
    batch padded only to its own longest sample. ``keys`` picks the model inputs (default: all)."""
    keys = list(keys or encodings.keys())
    order = sorted(indices, key=lambda i: len(encodings["input_ids"][i]))
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        yield chunk, dict(tokenizer.pad([{k: encodings[k][i] for k in keys} for i in chunk], return_tensors="pt"))
