"""MNasNet (depth multiplier 2.0, as the reference implementation uses) with torchvision's parameter names: ``layers.0-7``
the stem and a depthwise-separable convolution, ``layers.8-13`` stacks of inverted residuals,
``layers.14-16`` the 1x1 head convolution, ``classifier.1`` the linear layer."""
from __future__ import annotations

from torch import nn

from . import IMAGENET, conv_bn, register_arch

# kernel, first stride, expansion, repeats per stack (output widths follow from the multiplier)
STACKS = ((3, 2, 3, 3), (5, 2, 3, 3), (5, 2, 6, 3), (3, 1, 6, 2), (5, 2, 6, 4), (3, 1, 6, 1))
BASE_DEPTHS = (32, 16, 24, 40, 80, 96, 192, 320)


def _round_depth(value: float, divisor: int = 8) -> int:
    """Round to a multiple of 8, preferring to round up (as MobileNet's reference code does)."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded if rounded >= 0.9 * value else rounded + divisor


class MNasBlock(nn.Module):
    """Inverted residual: 1x1 expand, kxk depthwise, 1x1 linear projection; identity skip when shapes allow."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expansion: int):
        super().__init__()
        hidden = cin * expansion
        self.layers = nn.Sequential(*conv_bn(cin, hidden, 1, act=nn.ReLU),
                                    *conv_bn(hidden, hidden, kernel, stride, groups=hidden, act=nn.ReLU),
                                    *conv_bn(hidden, cout, 1))
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        return x + self.layers(x) if self.residual else self.layers(x)


class MNASNet(nn.Module):
    def __init__(self, scale: float = 2.0, num_classes: int = 1000):
        super().__init__()
        d = [_round_depth(c * scale) for c in BASE_DEPTHS]
        layers = [*conv_bn(3, d[0], 3, 2, act=nn.ReLU), *conv_bn(d[0], d[0], 3, groups=d[0], act=nn.ReLU),
                  *conv_bn(d[0], d[1], 1)]
        cin = d[1]
        for (kernel, stride, expansion, repeats), cout in zip(STACKS, d[2:]):
            layers.append(nn.Sequential(*[MNasBlock(cin if i == 0 else cout, cout, kernel, stride if i == 0 else 1, expansion)
                                          for i in range(repeats)]))
            cin = cout
        layers += conv_bn(cin, 1280, 1, act=nn.ReLU)
        self.layers = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(0.0), nn.Linear(1280, num_classes))

    def forward(self, x):
        return self.classifier(self.layers(x).mean((2, 3)))


register_arch("mnasnet", MNASNet, IMAGENET)
