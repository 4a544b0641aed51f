#!/usr/bin/env python
"""Quantize an image classifier with QDrop and evaluate top-1/top-5 — the reference implementation's ImageNet experiment.

    python run_imagenet.py --arch resnet18 --weights resnet18_imagenet.pth.tar --data_path /data/imagenet \
        --n_bits_w 2 --channel_wise --n_bits_a 2 --act_quant --order together --wwq --waq --awq --aaq \
        --weight 0.01 --input_prob 0.5 --prob 0.5 --output_dir outputs/r18-w2a2

Models: ``--arch`` names a built-in network (``qdrop_hf.tasks.archs``: the reference implementation's resnet18, resnet50,
mobilenetv2, regnetx_600m, regnetx_3200m, mnasnet; efficientnet_lite0; CIFAR resnet20/32/44/56) with
``--weights``; or ``--model_name_or_path`` any Hugging Face image classifier (ResNet, RegNet,
MobileNetV2, ViT), preprocessed by its own image processor.

Data: ``--data_path`` with ``train/`` and ``val/`` class folders (as the reference implementation); ``--train_dir`` and
``--validation_dir`` (class folders, or a flat folder of ``<wnid>_*.JPEG`` labelled by the sorted wnid
list); ``--dataset_name`` from the Hub. ``--num_calib_from_validation N`` takes N seeded images out of
the validation set for calibration and evaluates on the rest. Writes ``<output_dir>/results.json``
and the quantized model.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from qdrop_hf.tasks.archs import build_arch, get_arch
from qdrop_hf.tasks.cli import (HubRunArguments, UserError, check_output_dir, parse_args, quantize_evaluate_save,
                          recorded_arguments, run_main)
from qdrop_hf.config import QDropConfig, RuntimeConfig

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}
WNID_FILE = re.compile(r"^(n\d{8})_")


@dataclass
class ModelArguments:
    arch: str | None = field(default=None, metadata={"help": "built-in architecture, e.g. resnet18, efficientnet_lite0"})
    weights: str | None = field(default=None, metadata={"help": "checkpoint for --arch (default: its default weights or random)"})
    model_name_or_path: str | None = field(default=None, metadata={"help": "Hugging Face image classifier instead of --arch"})


@dataclass
class DataArguments:
    data_path: str | None = field(default=None, metadata={"help": "folder with train/ and val/ class folders"})
    train_dir: str | None = field(default=None, metadata={"help": "images to calibrate on"})
    validation_dir: str | None = field(default=None, metadata={"help": "images to evaluate on"})
    dataset_name: str | None = field(default=None, metadata={"help": "hub image-classification dataset"})
    dataset_config_name: str | None = field(default=None, metadata={"help": "its configuration, if any"})
    num_calib_from_validation: int | None = field(
        default=None, metadata={"help": "calibrate on N seeded validation images and evaluate on the rest"})
    max_eval_samples: int | None = field(default=None, metadata={"help": "evaluate on N seeded random images"})
    eval_batch_size: int = field(default=128, metadata={"help": "evaluation batch size"})


@dataclass
class Images:
    """An indexable set of labelled images: ``load(i)`` opens image ``i`` as RGB."""

    load: Callable[[int], Image.Image]
    labels: list[int]
    source: str

    def subset(self, indices) -> "Images":
        indices = list(indices)
        return Images(lambda i: self.load(indices[i]), [self.labels[i] for i in indices], self.source)


def image_folder(root: str) -> Images:
    """Class folders (labels: sorted folder names), or a flat folder of ``<wnid>_*`` files (labels:
    the position of the wnid in the sorted list of the folder's wnids, i.e. ImageNet's class order)."""
    path = Path(root)
    if not path.is_dir():
        raise UserError(f"image folder not found: {path}")
    classes = sorted(p.name for p in path.iterdir() if p.is_dir())
    if classes:
        files = [(p, index) for index, name in enumerate(classes) for p in sorted((path / name).iterdir())
                 if p.suffix.lower() in IMAGE_SUFFIXES]
    else:
        flat = [p for p in sorted(path.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES]
        unnamed = [p.name for p in flat if not WNID_FILE.match(p.name)]
        if unnamed:
            raise UserError(f"{path} has no class folders and {unnamed[0]!r} is not named <wnid>_*: cannot label it")
        wnid_of = {p: WNID_FILE.match(p.name).group(1) for p in flat}
        label_of = {wnid: index for index, wnid in enumerate(sorted(set(wnid_of.values())))}
        files = [(p, label_of[wnid_of[p]]) for p in flat]
    if not files:
        raise UserError(f"no images found under {path}")
    return Images(lambda i: _open(files[i][0]), [label for _, label in files], str(path))


def _open(path: Path) -> Image.Image:
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError) as err:
        raise UserError(f"cannot read image {path}: {err}") from err


def hub_images(name: str, config: str | None, split: str) -> Images:
    from datasets import load_dataset

    ds = load_dataset(name, config, split=split)
    image_col = next((c for c in ("image", "img") if c in ds.column_names), None)
    label_col = next((c for c in ("label", "labels", "fine_label") if c in ds.column_names), None)
    if image_col is None or label_col is None:
        raise UserError(f"{name} has no image/label columns (columns: {ds.column_names})")
    return Images(lambda i: ds[i][image_col].convert("RGB"), list(ds[label_col]), f"{name}[{split}]")


def builtin_preprocess(pre) -> Callable[[list[Image.Image]], torch.Tensor]:
    """Resize the short side (or straight to the size), centre-crop, scale to [0, 1], normalise."""
    mean, std = torch.tensor(pre.mean).view(3, 1, 1), torch.tensor(pre.std).view(3, 1, 1)

    def run(images):
        out = []
        for image in images:
            if pre.resize is None:
                image = image.resize((pre.size, pre.size), Image.BILINEAR) if image.size != (pre.size,) * 2 else image
            else:
                w, h = image.size
                scale = pre.resize / min(w, h)
                image = image.resize((round(w * scale), round(h * scale)), Image.BILINEAR)
                left, top = (image.size[0] - pre.size) // 2, (image.size[1] - pre.size) // 2
                image = image.crop((left, top, left + pre.size, top + pre.size))
            x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
            out.append((x - mean) / std)
        return torch.stack(out)
    return run


def load_model(args: ModelArguments):
    """(FP model, preprocessing, HF image processor or None), from ``--arch`` or ``--model_name_or_path``."""
    if bool(args.arch) == bool(args.model_name_or_path):
        raise UserError("give exactly one of --arch and --model_name_or_path")
    if args.model_name_or_path:
        from transformers import AutoImageProcessor, AutoModelForImageClassification

        model = AutoModelForImageClassification.from_pretrained(args.model_name_or_path).eval()
        processor = AutoImageProcessor.from_pretrained(args.model_name_or_path, use_fast=False)  # fast ones need torchvision
        return model, lambda images: processor(images=images, return_tensors="pt")["pixel_values"], processor
    try:
        return build_arch(args.arch, args.weights), builtin_preprocess(get_arch(args.arch).preprocess), None
    except ValueError as err:
        raise UserError(str(err)) from err


def load_data(data: DataArguments, num_samples: int, rng) -> tuple[Images, Images]:
    """(calibration images, evaluation images)."""
    if data.dataset_name:
        train, val = hub_images(data.dataset_name, data.dataset_config_name, "train"), None
        for split in ("validation", "test"):
            try:
                val = hub_images(data.dataset_name, data.dataset_config_name, split)
                break
            except ValueError:
                continue
        if val is None:
            raise UserError(f"{data.dataset_name} has no validation or test split")
    else:
        val_dir = data.validation_dir or (data.data_path and str(Path(data.data_path) / "val"))
        train_dir = data.train_dir or (data.data_path and str(Path(data.data_path) / "train"))
        if not val_dir or not (train_dir or data.num_calib_from_validation):
            raise UserError("give --data_path (train/ and val/), --train_dir and --validation_dir, or --validation_dir "
                            "with --num_calib_from_validation, or --dataset_name")
        val = image_folder(val_dir)
        train = image_folder(train_dir) if train_dir and not data.num_calib_from_validation else None
    if data.num_calib_from_validation:
        n = data.num_calib_from_validation
        if not 0 < n < len(val.labels):
            raise UserError(f"--num_calib_from_validation {n} must be between 1 and {len(val.labels) - 1}")
        order = rng.permutation(len(val.labels))
        train, val = val.subset(sorted(order[:n])), val.subset(sorted(order[n:]))
    if num_samples > len(train.labels):
        raise UserError(f"--num_samples {num_samples} is larger than the {len(train.labels)} images of {train.source}")
    if data.max_eval_samples and data.max_eval_samples < len(val.labels):
        val = val.subset(sorted(rng.choice(len(val.labels), data.max_eval_samples, replace=False)))
    return train, val


def calibration_split(data: DataArguments, num_samples: int, seed: int) -> tuple[Images, Images]:
    """(the ``num_samples`` calibration images, the evaluation images), drawn from ``seed``: the one
    place the split is made, so that a finished run's split can be rebuilt from its arguments."""
    rng = np.random.default_rng(seed)
    train, val = load_data(data, num_samples, rng)
    return train.subset(sorted(rng.choice(len(train.labels), num_samples, replace=False))), val


def image_batches(images: Images, preprocess, batch_size: int):
    """(preprocessed images, labels) of ``images``, in order, ``batch_size`` at a time."""
    n = len(images.labels)
    for start in range(0, n, batch_size):
        idx = range(start, min(start + batch_size, n))
        yield preprocess([images.load(i) for i in idx]), torch.tensor([images.labels[i] for i in idx])


def logits_of(output):
    """An image classifier's logits: a Hugging Face output's ``logits``, a built-in network's output itself."""
    return getattr(output, "logits", output)


@torch.no_grad()
def evaluate(model, images: Images, preprocess, batch_size, device, desc) -> dict[str, float]:
    model.eval().to(device)
    top1 = top5 = 0
    n = len(images.labels)
    for x, y in tqdm(image_batches(images, preprocess, batch_size), desc=desc, total=-(-n // batch_size)):
        x, y = x.to(device), y.to(device)
        logits = logits_of(model(x))
        best = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
        top1 += (best[:, 0] == y).sum().item()
        top5 += (best == y[:, None]).any(-1).sum().item()
    return {"top1": 100.0 * top1 / n, "top5": 100.0 * top5 / n}


def main():
    model_args, data_args, config, runtime, run_args = parse_args(ModelArguments, DataArguments, QDropConfig, RuntimeConfig,
                                                                 HubRunArguments)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    out = check_output_dir(run_args.output_dir, run_args.overwrite_output_dir)
    model, preprocess, processor = load_model(model_args)
    calib, val = calibration_split(data_args, config.num_samples, config.seed)
    images = preprocess([calib.load(i) for i in range(config.num_samples)])
    calibration = list(images.split(config.batch_size))

    device = runtime.resolved_device()
    results = {"config": recorded_arguments(model_args, data_args, config, runtime, run_args),
               "calibration_images": config.num_samples, "eval_images": len(val.labels)}

    def evaluate_on_val(model, desc):
        return evaluate(model, val, preprocess, data_args.eval_batch_size, device, desc)

    note = f"{config.num_samples} random images of {calib.source}"
    quantize_evaluate_save(out, results, model, calibration, config, runtime, evaluate_on_val, run_args, processor, note)


if __name__ == "__main__":
    run_main(main)
