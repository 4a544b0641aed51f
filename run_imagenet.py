#!/usr/bin/env python
"""Quantize an image classifier with QDrop and evaluate top-1/top-5 — the seed's ImageNet experiment.

    python run_imagenet.py --arch resnet20 --weights ../shared/data/cifar10-resnet/resnet20-12fca82f.th \
        --train_dir ../shared/data/cifar10/train-subset --validation_dir ../shared/data/cifar10/test \
        --n_bits_w 4 --channel_wise --n_bits_a 4 --act_quant --order together --wwq --waq --awq --aaq \
        --weight 0.01 --input_prob 0.5 --prob 0.5 --iters_w 500 --output_dir outputs/r20-w4a4

Data: ``--data_path`` with ``train/`` and ``val/`` class folders (as the seed), or ``--train_dir`` and
``--validation_dir``. Writes ``<output_dir>/results.json`` and the quantized model (``load_quantized``).
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from qdrop_hf.cli import (QuantArguments, RunArguments, UserError, check_output_dir, parse_args, quantize_and_evaluate,
                          run_main, write_json_atomic)
from qdrop_hf.hf_integration import save_quantized
from qdrop_hf.quantize import resolve_device
from qdrop_hf.vision_archs import PREPROCESS, build_arch

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}


@dataclass
class ModelArguments:
    arch: str = field(metadata={"help": "built-in architecture, e.g. resnet20"})
    weights: str | None = field(default=None, metadata={"help": "checkpoint for --arch (default: random weights)"})


@dataclass
class DataArguments:
    data_path: str | None = field(default=None, metadata={"help": "folder with train/ and val/ class folders"})
    train_dir: str | None = field(default=None, metadata={"help": "class folders to calibrate on"})
    validation_dir: str | None = field(default=None, metadata={"help": "class folders to evaluate on"})
    max_eval_samples: int | None = field(default=None, metadata={"help": "evaluate on N seeded random images"})
    eval_batch_size: int = field(default=256, metadata={"help": "evaluation batch size"})


def image_folder(root: str) -> tuple[list[Path], list[int]]:
    """Images under ``root/<class>/``, labelled by the sorted class-folder names."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"image folder not found: {root}")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    paths, labels = [], []
    for index, name in enumerate(classes):
        for p in sorted((root / name).iterdir()):
            if p.suffix.lower() in IMAGE_SUFFIXES:
                paths.append(p)
                labels.append(index)
    if not paths:
        raise UserError(f"no images found in class folders under {root}")
    return paths, labels


def load_images(paths: list[Path], pre: dict) -> torch.Tensor:
    mean = torch.tensor(pre["mean"]).view(3, 1, 1)
    std = torch.tensor(pre["std"]).view(3, 1, 1)
    out = []
    for p in paths:
        try:
            image = Image.open(p).convert("RGB")
        except (UnidentifiedImageError, OSError) as err:
            raise UserError(f"cannot read image {p}: {err}") from err
        if image.size != (pre["size"], pre["size"]):
            image = image.resize((pre["size"], pre["size"]), Image.BILINEAR)
        x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
        out.append((x - mean) / std)
    return torch.stack(out)


@torch.no_grad()
def evaluate(model, paths, labels, pre, batch_size, device, desc) -> dict[str, float]:
    model.eval().to(device)
    top1 = top5 = 0
    for start in tqdm(range(0, len(paths), batch_size), desc=desc):
        x = load_images(paths[start:start + batch_size], pre).to(device)
        y = torch.tensor(labels[start:start + batch_size], device=device)
        out = model(x)
        logits = getattr(out, "logits", out)
        best = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
        top1 += (best[:, 0] == y).sum().item()
        top5 += (best == y[:, None]).any(-1).sum().item()
    return {"top1": 100.0 * top1 / len(paths), "top5": 100.0 * top5 / len(paths)}


def main():
    model_args, data_args, quant_args, run_args = parse_args(ModelArguments, DataArguments, QuantArguments, RunArguments)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    config = quant_args.to_config()
    out = check_output_dir(run_args.output_dir, run_args.overwrite_output_dir)
    train_dir = data_args.train_dir or (data_args.data_path and str(Path(data_args.data_path) / "train"))
    val_dir = data_args.validation_dir or (data_args.data_path and str(Path(data_args.data_path) / "val"))
    if not train_dir or not val_dir:
        raise UserError("give --data_path (with train/ and val/) or --train_dir and --validation_dir")
    try:
        model = build_arch(model_args.arch, model_args.weights)
    except ValueError as err:
        raise UserError(str(err)) from err
    pre = PREPROCESS[model_args.arch]
    train_paths, _ = image_folder(train_dir)
    val_paths, val_labels = image_folder(val_dir)
    rng = np.random.default_rng(quant_args.seed)
    if data_args.max_eval_samples and data_args.max_eval_samples < len(val_paths):
        keep = sorted(rng.choice(len(val_paths), data_args.max_eval_samples, replace=False).tolist())
        val_paths, val_labels = [val_paths[i] for i in keep], [val_labels[i] for i in keep]
    if quant_args.num_samples > len(train_paths):
        raise UserError(f"--num_samples {quant_args.num_samples} is larger than the {len(train_paths)} images in {train_dir}")
    calib_paths = [train_paths[i] for i in rng.choice(len(train_paths), quant_args.num_samples, replace=False)]
    calib = load_images(calib_paths, pre)
    calibration = list(calib.split(quant_args.batch_size))

    device = resolve_device(config)
    results = {"config": {**asdict(model_args), **asdict(data_args), **asdict(quant_args), **asdict(run_args)}}

    def evaluate_on_val(model, desc):
        return evaluate(model, val_paths, val_labels, pre, data_args.eval_batch_size, device, desc)

    model, measured = quantize_and_evaluate(model, calibration, config, evaluate_on_val, run_args.skip_fp_eval)
    results.update(measured)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "results.json", results)
    save_quantized(model, None, out, results, calibration=f"{quant_args.num_samples} random images of {train_dir}")


if __name__ == "__main__":
    run_main(main)
