"""Fold eval-mode BatchNorm2d into the convolution right before it."""
import torch
from torch import nn


@torch.no_grad()
def fold_batchnorm(model: nn.Module) -> int:
    """Fold every BatchNorm2d that directly follows a Conv2d among its parent's children; returns the count.

    The BatchNorm is replaced by ``nn.Identity`` and the convolution gains the folded bias, so the
    network computes the same function in eval mode and its weights are what gets quantized.
    """
    folded = 0
    for parent in model.modules():
        children = list(parent.named_children())
        for (_, conv), (bn_name, bn) in zip(children, children[1:]):
            if not (isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)) or conv.out_channels != bn.num_features:
                continue
            factor = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            conv.weight.mul_(factor.reshape(-1, 1, 1, 1))
            bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
            conv.bias = nn.Parameter((bias - bn.running_mean) * factor + bn.bias)
            setattr(parent, bn_name, nn.Identity())
            folded += 1
    return folded
