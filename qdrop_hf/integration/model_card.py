"""The model card (README.md) written beside a quantized model."""
from __future__ import annotations

from pathlib import Path

from .plots import PLOT_NAME


def folder_size(path: str | Path) -> int:
    return sum(p.stat().st_size for p in Path(path).iterdir() if p.is_file())


def model_card(model, results: dict | None, calibration: str | None, folder: Path) -> str:
    """A model card: method, bits, calibration data, FP vs quantized metrics, and how to load it."""
    cfg = model.qdrop_config
    acts = f"A{cfg.n_bits_a}" if cfg.act_quant else "A32 (float activations)"
    hf = hasattr(model, "config")
    name = (getattr(model.config, "_name_or_path", "") if hf else model.qdrop_arch) or type(model).__name__
    lines = [
        "---",
        "library_name: transformers",
        f"tags: [qdrop, quantized, post-training-quantization, w{cfg.n_bits_w}]",
        "---",
        f"# {name} — QDrop W{cfg.n_bits_w}{acts}",
        "",
        "Post-training quantized with qdrop_hf, using [QDrop](https://arxiv.org/abs/2203.05740) (AdaRound weights, "
        "LSQ activations, block reconstruction with random quantization drop).",
        "",
        "| setting | value |",
        "|---|---|",
        f"| weights | {cfg.n_bits_w}-bit, {'per output channel' if cfg.channel_wise else 'per tensor'}, "
        "learned rounding, stored bit-packed |",
        f"| activations | {acts}, per tensor, learned step |",
        f"| stem/head | {'as the body' if cfg.disable_8bit_head_stem else '8-bit'} |",
        f"| drop probabilities | prob={cfg.prob}, input_prob={cfg.input_prob} (dropped input: {cfg.input_drop}) |",
        f"| reconstruction | order={cfg.order}, {cfg.iters_w} iterations/block, batch {cfg.batch_size} |",
        f"| calibration | {calibration or f'{cfg.num_samples} samples'} |",
        *_outlier_rows(model),
        f"| folder size | {folder_size(folder) / 1e6:.1f} MB |",
    ]
    if results and "quant" in results:
        lines += ["", "## Evaluation", "", "| metric | full precision | quantized |", "|---|---|---|"]
        for metric, value in results["quant"].items():
            fp = results.get("fp", {}).get(metric)
            lines.append(f"| {metric} | {'-' if fp is None else f'{fp:.4f}'} | {value:.4f} |")
    if (folder / PLOT_NAME).exists():
        lines += ["", "## Reconstruction", "",
                  f"![each block's error at round-to-nearest and after reconstruction]({PLOT_NAME})"]
    cls = type(model).__name__
    load = ([f"from transformers import {cls}", f"model = {cls}.from_pretrained(\"<this repo>\")"] if hf else
            ["from qdrop_hf import load_quantized", "model = load_quantized(\"<local copy of this repo>\")"])
    lines += ["", "## Loading", "", "```python", "import qdrop_hf  # registers quant_method 'qdrop' with transformers",
              *load, "```", ""]
    return "\n".join(lines)


def _outlier_rows(model) -> list[str]:
    """Rows on outlier migration (where it ran) and the activation roles kept at 8 bits."""
    rows = []
    migrated = (getattr(model, "qdrop_report", None) or {}).get("outlier_migration")
    if migrated is not None:
        places = {"layernorm": "LayerNorm outputs", "ffn_act": "FFN activations"}
        done = [f"{len(migrated[part])} {what}" for part, what in places.items() if part in migrated]
        largest = max((v for part in migrated.values() for v in part.values()), default=1.0)
        rows.append(f"| outlier migration | into the Linear layers reading them: {', '.join(done) or 'none'} "
                    f"(largest channel scale {largest:.1f}) |")
    if model.qdrop_config.keep_8bit:
        rows.append(f"| kept at 8 bits | {', '.join(model.qdrop_config.keep_8bit)} |")
    return rows
