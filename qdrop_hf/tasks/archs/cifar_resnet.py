"""CIFAR ResNets (resnet20/32/44/56) follow the widely used CIFAR-10 recipe: 3x3 stem to 16 channels,
three stages of basic blocks (16/32/64 channels), option-A shortcuts (stride-2 subsampling with zero
channel padding), global average pooling and a linear classifier; their checkpoints store
``{'state_dict': {'module.<name>': tensor}}``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import CIFAR, register_arch


class ZeroPadShortcut(nn.Module):
    """Option-A shortcut: subsample by 2 and pad the new channels with zeros (no parameters)."""

    def __init__(self, extra_channels: int):
        super().__init__()
        self.extra = extra_channels

    def forward(self, x):
        x = x[:, :, ::2, ::2]
        return F.pad(x, (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))


class CifarBasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = ZeroPadShortcut(planes - in_planes) if stride != 1 or in_planes != planes else nn.Identity()

    def forward(self, x):
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(self, depth: int, num_classes: int = 10):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU()
        planes, layers = 16, []
        for stage, width in enumerate((16, 32, 64)):
            blocks = []
            for i in range(n):
                blocks.append(CifarBasicBlock(planes, width, 2 if stage and i == 0 else 1))
                planes = width
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(64, num_classes)

    def forward(self, x):
        x = self.layer3(self.layer2(self.layer1(self.relu(self.bn1(self.conv1(x))))))
        return self.linear(torch.flatten(self.pool(x), 1))


for depth in (20, 32, 44, 56):
    register_arch(f"resnet{depth}", lambda depth=depth: CifarResNet(depth), CIFAR)
