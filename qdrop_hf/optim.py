"""Adam for the reconstruction loop: a fixed handful of tensors, one fused kernel call per step.

``torch.optim.Adam(fused=True)`` runs the same kernel, but its ``step`` spends about 0.1 ms in Python
(grouping, state lookups, hooks) on every call: a tenth of a small block's whole iteration, twice
per iteration (rounding variables and activation steps). This keeps the state in flat lists and
calls the kernel directly; elsewhere (no fused kernel for the device) it defers to torch's Adam.
"""
from __future__ import annotations

import math

import torch


class Adam:
    """Adam (betas 0.9/0.999, eps 1e-8, no weight decay) whose learning rate may change per step."""

    def __init__(self, params: list[torch.Tensor], lr: float):
        self.params = list(params)
        self.lr = lr
        fused = hasattr(torch, "_fused_adam_") and all(p.device.type in ("cpu", "cuda") for p in self.params)
        self.fallback = None if fused else torch.optim.Adam(self.params, lr=lr)
        self.exp_avgs = [torch.zeros_like(p) for p in self.params] if fused else []
        self.exp_avg_sqs = [torch.zeros_like(p) for p in self.params] if fused else []
        self.steps = [torch.zeros((), device=p.device) for p in self.params] if fused else []

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self, lr: float | None = None) -> None:
        lr = self.lr if lr is None else lr
        if self.fallback is not None:
            self.fallback.param_groups[0]["lr"] = lr
            self.fallback.step()
            return
        have = [i for i, p in enumerate(self.params) if p.grad is not None]  # as torch's Adam: skip the unreached
        if not have:
            return
        pick = lambda items: [items[i] for i in have]  # noqa: E731
        steps = pick(self.steps)
        torch._foreach_add_(steps, 1)
        torch._fused_adam_(pick(self.params), [self.params[i].grad for i in have], pick(self.exp_avgs),
                           pick(self.exp_avg_sqs), [], steps, lr=lr, beta1=0.9, beta2=0.999,
                           weight_decay=0.0, eps=1e-8, amsgrad=False, maximize=False)


def cosine_lr(base: float, step: int, total: int) -> float:
    """Cosine annealing from ``base`` at step 0 to 0 at ``total`` (torch's CosineAnnealingLR, closed form)."""
    return base * (1 + math.cos(math.pi * step / total)) / 2
