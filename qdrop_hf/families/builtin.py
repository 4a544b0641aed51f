"""The built-in ``--arch`` networks (qdrop_hf.tasks.archs): CIFAR ResNets, the reference implementation's ImageNet six and
EfficientNet-Lite0.

Blocks are those of the method: basic/bottleneck residual blocks, inverted residuals (MobileNetV2,
MNasNet), RegNet bottlenecks and MBConv blocks. Activations are quantized after every ReLU/ReLU6 module
and at each block's output; the architectures apply a block's final ReLU functionally, so nothing is
quantized twice. The pooled features are quantized where they enter the classifier.
"""
import re

from torch import nn

from ..fold_bn import fold_batchnorm
from . import Family, register_family


def _relus_and(points: str):
    pattern = re.compile(points)
    return lambda name, module: isinstance(module, (nn.ReLU, nn.ReLU6)) or bool(pattern.search(name))


def _family(name: str, class_name: str, body: str, stem: str, head: str, extra_points: str = r"(?!)",
            depthwise: bool = False) -> None:
    register_family(Family(name=name, model_types=(class_name,), body=body, stem=stem, head=head,
                           act_outputs=_relus_and(f"({body})|{extra_points}"), act_inputs=head,
                           prepare=fold_batchnorm, act_range_p=2.4, bias_correction=depthwise,
                           depthwise_range="output" if depthwise else "weight"))


_family("cifar_resnet", "CifarResNet", body=r"^layer\d\.\d+$", stem=r"^conv1$", head=r"^linear$")
_family("resnet_imagenet", "ResNet", body=r"^layer\d\.\d+$", stem=r"^conv1$", head=r"^fc$")
_family("mobilenetv2", "MobileNetV2", body=r"^features\.([1-9]|1[0-7])$", stem=r"^features\.0$", head=r"^classifier\.1$",
        depthwise=True)
_family("regnet_pycls", "RegNet", body=r"^s\d\.b\d+$", stem=r"^stem$", head=r"^head\.fc$")
# layers.7: the BatchNorm (folded to Identity) closing the depthwise-separable layer before the stacks
_family("mnasnet", "MNASNet", body=r"^layers\.(8|9|1[0-3])\.\d+$", stem=r"^layers\.0$", head=r"^classifier\.1$",
        extra_points=r"^layers\.7$", depthwise=True)
_family("efficientnet_lite", "EfficientNetLite", body=r"^_blocks\.\d+$", stem=r"^_conv_stem$", head=r"^_fc$", depthwise=True)
