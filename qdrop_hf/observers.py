"""Range initialisation: min/max statistics and the MSE (L_p) search for clipping ranges.

Weights are searched per output channel on the whole tensor. Activations are searched per tensor on a
random subsample of the calibration activations (with the exact global min/max as the starting
range), which keeps the search cheap however much calibration data flows through.
"""
from __future__ import annotations

import torch

from .batches import CalibrationDataError

# Candidate clipping ratios: 1.0, 0.99, ..., 0.21 of the observed range.
_RATIOS = [1.0 - 0.01 * i for i in range(80)]
_EPS = 1e-8


def affine_params(lo: torch.Tensor, hi: torch.Tensor, n_bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and integer zero point of an asymmetric n-bit grid covering [lo, hi] (always covering 0)."""
    lo = lo.clamp(max=0.0)
    hi = hi.clamp(min=0.0)
    qmax = 2**n_bits - 1
    scale = ((hi - lo) / qmax).clamp(min=_EPS)
    zero_point = torch.round(-lo / scale).clamp(0, qmax)
    return scale, zero_point


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, n_bits: int) -> torch.Tensor:
    """Round-to-nearest onto the grid and back to float (no gradient tricks).

    ``(clamp(round(x / s) + zp, 0, qmax) - zp) * s`` written as ``clamp(round(x / s), -zp, qmax - zp) * s``
    (the same values, as ``zp`` is an integer): one division, then four passes in place.
    """
    return torch.div(x, scale).round_().clamp_min_(-zero_point).clamp_max_(2**n_bits - 1 - zero_point).mul_(scale)


def search_range(rows: torch.Tensor, n_bits: int, mode: str = "mse", p: float = 2.0):
    """Best (scale, zero_point) per row of ``rows`` ([R, N]) under the L_p quantization error.

    ``mode="minmax"`` takes the observed range as it is; ``mode="mse"`` shrinks it by each candidate
    ratio and keeps, per row, the one with the lowest mean |x - Q(x)|^p.
    """
    rows = rows.detach().float()
    lo, hi = rows.amin(dim=1), rows.amax(dim=1)
    best_scale, best_zp = affine_params(lo, hi, n_bits)
    if mode == "minmax":
        return best_scale, best_zp
    best_err = torch.full_like(lo, float("inf"))
    for ratio in _RATIOS:
        scale, zp = affine_params(lo * ratio, hi * ratio, n_bits)
        err = (fake_quantize(rows, scale[:, None], zp[:, None], n_bits) - rows).abs_().pow_(p).mean(dim=1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_zp = torch.where(better, zp, best_zp)
    return best_scale, best_zp


class ActivationObserver:
    """Collects what an activation quantizer sees during calibration: exact min/max and a subsample."""

    def __init__(self, max_samples: int = 1 << 20, per_call: int = 1 << 16, generator: torch.Generator | None = None):
        self.max_samples = max_samples
        self.per_call = per_call
        self.generator = generator
        self.lo = None
        self.hi = None
        self.samples: list[torch.Tensor] = []
        self.count = 0

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        flat = x.detach().reshape(-1).float()
        if flat.numel() == 0:
            return
        if not torch.isfinite(flat).all():
            raise CalibrationDataError("the float model's activations are NaN/inf on the calibration data (an activation "
                                       "outside every block): check the model and the inputs")
        lo, hi = flat.min(), flat.max()
        self.lo = lo if self.lo is None else torch.minimum(self.lo, lo)
        self.hi = hi if self.hi is None else torch.maximum(self.hi, hi)
        if flat.numel() > self.per_call:
            idx = torch.randint(0, flat.numel(), (self.per_call,), device=flat.device, generator=self._gen(flat))
            flat = flat[idx]
        self.samples.append(flat.cpu())
        self.count += flat.numel()
        if self.count > 2 * self.max_samples:
            merged = torch.cat(self.samples)
            keep = torch.randperm(merged.numel())[: self.max_samples]
            self.samples, self.count = [merged[keep]], self.max_samples

    def _gen(self, t: torch.Tensor):
        return self.generator if self.generator is not None and self.generator.device == t.device else None

    def compute(self, n_bits: int, mode: str, p: float = 2.0) -> tuple[torch.Tensor, torch.Tensor]:
        if self.lo is None:
            raise RuntimeError("activation observer saw no data")
        values = torch.cat(self.samples + [self.lo.reshape(1).cpu(), self.hi.reshape(1).cpu()])
        scale, zp = search_range(values[None, :], n_bits, mode, p=p)
        return scale[0], zp[0]
