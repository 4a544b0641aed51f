"""Hugging Face convolutional classifiers: ResNet, RegNet (X and Y) and MobileNetV2.

BatchNorm is folded into the preceding convolution first, as a deployed integer network would have
it. Blocks are the residual / RegNet / inverted-residual blocks. Activations are quantized after each
activated convolution (ReLU, ReLU6), at each block's output (after the residual add), after
squeeze-excite gating, at the stem output and at the pooled features, as in BRECQ/QDrop.
"""
import re

from torch import nn

from ..fold_bn import fold_batchnorm
from . import Family, register_family


def _act_outputs(conv_layer: str, points: str, skip: str, classes: tuple[str, ...] = ()):
    """Outputs of ``points`` (regex), of ``classes``, and of every activated ``conv_layer`` not matching ``skip``."""
    def match(name: str, module: nn.Module) -> bool:
        if re.search(points, name) or type(module).__name__ in classes:
            return True
        activation = getattr(module, "activation", None)
        return (type(module).__name__ == conv_layer and activation is not None
                and not isinstance(activation, nn.Identity) and not re.search(skip, name))
    return match


for model_type, prefix, conv_layer in (("resnet", "resnet", "ResNetConvLayer"), ("regnet", "regnet", "RegNetConvLayer")):
    register_family(Family(
        name=model_type,
        model_types=(model_type,),
        body=r"stages\.\d+\.layers\.\d+$",
        stem=rf"{prefix}\.embedder$",
        head=r"^classifier$",
        # the stem's own convolution is followed by its pooling/output point, quantized once there
        act_outputs=_act_outputs(conv_layer, rf"({prefix}\.embedder|layers\.\d+|{prefix}\.pooler)$",
                                 skip=r"embedder\.embedder$", classes=("RegNetSELayer",)),
        prepare=fold_batchnorm,
        act_range_p=2.4,
    ))

register_family(Family(
    name="mobilenet_v2",
    model_types=("mobilenet_v2",),
    body=r"mobilenet_v2\.layer\.\d+$",
    stem=r"mobilenet_v2\.conv_stem$",
    head=r"(^classifier|mobilenet_v2\.conv_1x1)$",
    act_outputs=_act_outputs("MobileNetV2ConvLayer", r"(conv_stem|layer\.\d+|mobilenet_v2\.pooler)$", skip=r"conv_1x1$"),
    prepare=fold_batchnorm,
    act_range_p=2.4,
    bias_correction=True,
    depthwise_range="output",
))
