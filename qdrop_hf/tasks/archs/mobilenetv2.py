"""MobileNetV2 (width 1.0) with the parameter names of the reference implementation's checkpoint: ``features.0`` the stem
(conv, BN, ReLU6), ``features.1-17`` inverted residuals (``features.N.conv.K``), ``features.18`` the
1x1 head convolution, ``classifier.1`` the linear layer."""
from __future__ import annotations

from torch import nn

from . import IMAGENET, conv_bn, register_arch

# expansion, output channels, repeats, first stride
STAGES = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expansion: int):
        super().__init__()
        hidden = cin * expansion
        expand = conv_bn(cin, hidden, 1, act=nn.ReLU6) if expansion != 1 else []
        self.conv = nn.Sequential(*expand, *conv_bn(hidden, hidden, 3, stride, groups=hidden, act=nn.ReLU6),
                                  *conv_bn(hidden, cout, 1))
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        return x + self.conv(x) if self.residual else self.conv(x)


class MobileNetV2(nn.Module):
    def __init__(self, num_classes: int = 1000):
        super().__init__()
        features, cin = [nn.Sequential(*conv_bn(3, 32, 3, 2, act=nn.ReLU6))], 32
        for expansion, cout, repeats, stride in STAGES:
            for i in range(repeats):
                features.append(InvertedResidual(cin, cout, stride if i == 0 else 1, expansion))
                cin = cout
        features.append(nn.Sequential(*conv_bn(cin, 1280, 1, act=nn.ReLU6)))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(0.0), nn.Linear(1280, num_classes))

    def forward(self, x):
        return self.classifier(self.features(x).mean((2, 3)))


register_arch("mobilenetv2", MobileNetV2, IMAGENET)
