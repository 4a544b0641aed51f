"""Hugging Face convolutional classifiers: ResNet (basic and bottleneck blocks).

BatchNorm is folded into the preceding convolution first, as a deployed integer network would have
it. Activations are quantized after each ReLU inside a block and at each block's output (after the
residual add), as in BRECQ/QDrop.
"""
import re

from torch import nn

from ..fold_bn import fold_batchnorm
from . import Family, register_family


def _act_output(name: str, module: nn.Module) -> bool:
    """Stem output, block outputs, pooled features, and every ReLU'd convolution inside a block."""
    if re.search(r"(resnet\.embedder|layers\.\d+|resnet\.pooler)$", name):
        return True
    return type(module).__name__ == "ResNetConvLayer" and ".layers." in name and not isinstance(module.activation, nn.Identity)


register_family(Family(
    name="resnet",
    model_types=("resnet",),
    body=r"stages\.\d+\.layers\.\d+$",
    stem=r"resnet\.embedder$",
    head=r"^classifier$",
    act_outputs=_act_output,
    prepare=fold_batchnorm,
))
