"""ImageNet ResNet-18/50 with torchvision's parameter names (``conv1, bn1, layerN.M.convK/bnK,
layerN.M.downsample.{0,1}, fc``), which the reference implementation's and torchvision's checkpoints use. Two variants
some checkpoints carry are read off the weights: a deep stem (three 3x3 convolutions in ``conv1``)
and average-pool downsampling (``downsample.{1,2}``)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import IMAGENET, conv_bn, register_arch


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int, downsample: nn.Module | None):
        super().__init__()
        self.conv1, self.bn1 = conv_bn(cin, planes, 3, stride)
        self.relu1 = nn.ReLU()
        self.conv2, self.bn2 = conv_bn(planes, planes, 3)
        self.downsample = downsample

    def forward(self, x):
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int, downsample: nn.Module | None):
        super().__init__()
        self.conv1, self.bn1 = conv_bn(cin, planes, 1)
        self.relu1 = nn.ReLU()
        self.conv2, self.bn2 = conv_bn(planes, planes, 3, stride)
        self.relu2 = nn.ReLU()
        self.conv3, self.bn3 = conv_bn(planes, planes * 4, 1)
        self.downsample = downsample

    def forward(self, x):
        out = self.relu2(self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x))))))
        out = self.bn3(self.conv3(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNet(nn.Module):
    def __init__(self, block, depths, num_classes: int = 1000, deep_stem: bool = False, avg_down: bool = False):
        super().__init__()
        if deep_stem:
            self.conv1 = nn.Sequential(*conv_bn(3, 32, 3, 2, act=nn.ReLU), *conv_bn(32, 32, 3, act=nn.ReLU),
                                       nn.Conv2d(32, 64, 3, 1, 1, bias=False))
        else:
            self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin = 64
        for index, (planes, depth) in enumerate(zip((64, 128, 256, 512), depths)):
            stride = 1 if index == 0 else 2
            blocks = []
            for i in range(depth):
                downsample = None
                if i == 0 and (stride != 1 or cin != planes * block.expansion):
                    pool = [nn.AvgPool2d(stride, stride, ceil_mode=True, count_include_pad=False)] if avg_down else []
                    downsample = nn.Sequential(*pool, *conv_bn(cin, planes * block.expansion, 1, 1 if avg_down else stride))
                blocks.append(block(cin, planes, stride if i == 0 else 1, downsample))
                cin = planes * block.expansion
            setattr(self, f"layer{index + 1}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _variant(state: dict) -> dict:
    return {"deep_stem": "conv1.0.weight" in state, "avg_down": "layer2.0.downsample.2.weight" in state}


register_arch("resnet18", lambda **o: ResNet(BasicBlock, (2, 2, 2, 2), **o), IMAGENET, options_from_state=_variant)
register_arch("resnet50", lambda **o: ResNet(Bottleneck, (3, 4, 6, 3), **o), IMAGENET, options_from_state=_variant)
