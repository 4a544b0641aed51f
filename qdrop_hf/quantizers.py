"""Fake quantizers: AdaRound weight quantizer and LSQ activation quantizer with QDrop's random drop.

Both hold their state in parameters/buffers only, so a quantized model's ``state_dict`` is its whole
quantization result. Weight quantizers progress ``nearest -> soft (AdaRound) -> hard``; once hard, the
integer codes are a ``uint8`` buffer and the float weight is no longer needed to run the model.
"""
from __future__ import annotations

import torch
from torch import nn

from .observers import ActivationObserver, search_range

GAMMA, ZETA = -0.1, 1.1  # AdaRound's rectified-sigmoid stretch


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round with a straight-through gradient."""
    return (torch.round(x) - x).detach() + x


class WeightQuantizer(nn.Module):
    """Asymmetric uniform weight quantizer, per output channel (``ch_axis``) or per tensor."""

    def __init__(self, n_bits: int, channel_wise: bool = True, ch_axis: int = 0):
        super().__init__()
        self.n_bits = n_bits
        self.channel_wise = channel_wise
        self.ch_axis = ch_axis
        self.enabled = False
        self.register_buffer("scale", torch.empty(0))
        self.register_buffer("zero_point", torch.empty(0))
        self.register_buffer("codes", torch.empty(0, dtype=torch.uint8))
        self.alpha: nn.Parameter | None = None

    @property
    def qmax(self) -> int:
        return 2**self.n_bits - 1

    @property
    def initialized(self) -> bool:
        return self.scale.numel() > 0

    @property
    def hardened(self) -> bool:
        return self.codes.numel() > 0

    def _shape(self, weight: torch.Tensor) -> list[int]:
        shape = [1] * weight.dim()
        if self.channel_wise:
            shape[self.ch_axis] = weight.shape[self.ch_axis]
        return shape

    @torch.no_grad()
    def init_range(self, weight: torch.Tensor, mode: str = "mse") -> None:
        """Search the clipping range (L_2.4 error, as in BRECQ/QDrop) and set scale/zero point."""
        w = weight.detach().float()
        rows = w.movedim(self.ch_axis, 0).reshape(w.shape[self.ch_axis], -1) if self.channel_wise else w.reshape(1, -1)
        scale, zp = search_range(rows, self.n_bits, mode, p=2.4)
        self.scale = scale.reshape(self._shape(w))
        self.zero_point = zp.reshape(self._shape(w))
        self.codes = torch.empty(0, dtype=torch.uint8, device=w.device)
        self.alpha = None

    def set_bits(self, n_bits: int) -> None:
        if self.initialized:
            raise RuntimeError("set the bit width before the range is initialised")
        self.n_bits = n_bits

    # --- AdaRound -------------------------------------------------------------------------------
    @torch.no_grad()
    def start_adaround(self, weight: torch.Tensor) -> nn.Parameter:
        """Create the rounding variables so that the soft-quantized weight equals ``weight`` at start."""
        x = weight.detach().float() / self.scale
        floor = torch.floor(x)
        rest = (x - floor).clamp(1e-6, 1 - 1e-6)
        self.register_buffer("w_floor", floor, persistent=False)
        # h(alpha) = rest  <=>  sigmoid(alpha) = (rest - gamma) / (zeta - gamma)
        self.alpha = nn.Parameter(-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1))
        return self.alpha

    def soft_rounding(self) -> torch.Tensor:
        return torch.clamp(torch.sigmoid(self.alpha) * (ZETA - GAMMA) + GAMMA, 0, 1)

    def rounding_loss(self, beta: float) -> torch.Tensor:
        h = self.soft_rounding()
        return (1 - (2 * h - 1).abs().pow(beta)).sum()

    @torch.no_grad()
    def harden(self, weight: torch.Tensor) -> None:
        """Freeze the rounding into integer codes: learned (alpha >= 0 rounds up) or nearest."""
        if self.alpha is not None:
            q = self.w_floor + (self.alpha >= 0).float()
            del self.w_floor
            self.alpha = None
        else:
            q = torch.round(weight.detach().float() / self.scale)
        self.codes = torch.clamp(q + self.zero_point, 0, self.qmax).to(torch.uint8)

    def dequantized(self) -> torch.Tensor:
        return (self.codes.float() - self.zero_point) * self.scale

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if not self.enabled or not self.initialized:
            return weight
        if self.hardened:
            return self.dequantized().to(weight.dtype)
        if self.alpha is not None:
            q = torch.clamp(self.w_floor + self.soft_rounding() + self.zero_point, 0, self.qmax)
        else:
            q = torch.clamp(torch.round(weight / self.scale) + self.zero_point, 0, self.qmax)
        return ((q - self.zero_point) * self.scale).to(weight.dtype)


class ActQuantizer(nn.Module):
    """Per-tensor asymmetric activation quantizer with a learnable step (LSQ) and QDrop.

    While ``drop_prob < 1`` and ``dropping`` is set (only inside block reconstruction), each element
    keeps its quantized value with probability ``drop_prob`` and its float value otherwise.
    """

    def __init__(self, n_bits: int):
        super().__init__()
        self.n_bits = n_bits
        self.enabled = False
        self.dropping = False
        self.drop_prob = 1.0
        self.generator: torch.Generator | None = None
        self.observer: ActivationObserver | None = None
        self.scale = nn.Parameter(torch.ones(()), requires_grad=False)
        self.register_buffer("zero_point", torch.zeros(()))
        self.register_buffer("initialized", torch.tensor(False))

    @property
    def qmax(self) -> int:
        return 2**self.n_bits - 1

    def set_bits(self, n_bits: int) -> None:
        self.n_bits = n_bits

    def observe(self, generator: torch.Generator | None = None) -> None:
        self.observer = ActivationObserver(generator=generator)

    @torch.no_grad()
    def finish_observing(self, mode: str = "mse") -> None:
        scale, zp = self.observer.compute(self.n_bits, mode)
        self.observer = None
        self.scale.data = scale.to(self.scale.device)
        self.zero_point.copy_(zp)
        self.initialized.fill_(True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observer is not None:
            self.observer.update(x)
            return x
        if not self.enabled or not bool(self.initialized):
            return x
        scale = self.scale
        q = torch.clamp(round_ste(x / scale) + self.zero_point, 0, self.qmax)
        xq = (q - self.zero_point) * scale
        if self.dropping and self.drop_prob < 1.0:
            keep = torch.rand(x.shape, device=x.device, generator=self.generator) < self.drop_prob
            xq = torch.where(keep, xq, x)
        return xq

    def extra_repr(self) -> str:
        return f"n_bits={self.n_bits}, enabled={self.enabled}"

