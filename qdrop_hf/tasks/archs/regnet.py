"""RegNetX-600MF and RegNetX-3.2GF with the parameter names of the pycls checkpoints the reference implementation uses:
``stem.conv/bn``, stages ``sN.bM`` of residual bottleneck blocks (``proj``/``bn`` shortcut,
``f.a/a_bn, f.b/b_bn, f.c/c_bn`` with a grouped 3x3), ``head.fc``. Stage widths and depths are the
published RegNetX values (bottleneck ratio 1, stem width 32)."""
from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from . import IMAGENET, register_arch

# (depths, widths, group width)
CONFIGS = {"regnetx_600m": ((1, 3, 5, 7), (48, 96, 240, 528), 24),
           "regnetx_3200m": ((2, 6, 15, 2), (96, 192, 432, 1008), 48)}


class Stem(nn.Module):
    def __init__(self, cout: int):
        super().__init__()
        self.conv = nn.Conv2d(3, cout, 3, 2, 1, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.bn(self.conv(x)))


class Bottleneck(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, group_width: int):
        super().__init__()
        self.a, self.a_bn, self.a_relu = nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()
        self.b = nn.Conv2d(cout, cout, 3, stride, 1, groups=cout // group_width, bias=False)
        self.b_bn, self.b_relu = nn.BatchNorm2d(cout), nn.ReLU()
        self.c, self.c_bn = nn.Conv2d(cout, cout, 1, bias=False), nn.BatchNorm2d(cout)

    def forward(self, x):
        x = self.a_relu(self.a_bn(self.a(x)))
        return self.c_bn(self.c(self.b_relu(self.b_bn(self.b(x)))))


class ResBottleneckBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, group_width: int):
        super().__init__()
        self.has_proj = cin != cout or stride != 1
        if self.has_proj:
            self.proj, self.bn = nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
        self.f = Bottleneck(cin, cout, stride, group_width)

    def forward(self, x):
        return F.relu((self.bn(self.proj(x)) if self.has_proj else x) + self.f(x))


class Head(nn.Module):
    def __init__(self, cin: int, num_classes: int):
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        return self.fc(self.avg_pool(x).flatten(1))


class Sequence(nn.Module):
    """Children run in order; unlike nn.Sequential, children keep the checkpoint's names (``b1``, ``s1``)."""

    def forward(self, x):
        for child in self.children():
            x = child(x)
        return x


class RegNet(Sequence):
    def __init__(self, depths, widths, group_width: int, num_classes: int = 1000):
        super().__init__()
        self.stem = Stem(32)
        cin = 32
        for index, (depth, width) in enumerate(zip(depths, widths)):
            stage = Sequence()
            for j in range(depth):
                stage.add_module(f"b{j + 1}", ResBottleneckBlock(cin if j == 0 else width, width, 2 if j == 0 else 1, group_width))
            setattr(self, f"s{index + 1}", stage)
            cin = width
        self.head = Head(cin, num_classes)


for _name, (_depths, _widths, _gw) in CONFIGS.items():
    register_arch(_name, lambda d=_depths, w=_widths, g=_gw: RegNet(d, w, g), IMAGENET)
