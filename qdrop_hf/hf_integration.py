"""Saving a quantized model the Hugging Face way.

The quantization settings travel in ``config.json`` as ``quantization_config`` with
``quant_method="qdrop"``; the weights, quantizer scales and integer codes are one safetensors file.
"""
from __future__ import annotations

from pathlib import Path


def save_quantized(model, tokenizer, output_dir: str | Path) -> None:
    """``save_pretrained`` for the model (safetensors only) and its tokenizer/processor, if any."""
    output_dir = Path(output_dir)
    model.config.quantization_config = {"quant_method": "qdrop", **model.qdrop_config.to_dict()}
    model.save_pretrained(output_dir, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(output_dir)
