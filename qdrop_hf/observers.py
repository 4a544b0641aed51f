"""Range initialisation: min/max statistics and the MSE (L_p) search for clipping ranges.

Weights are searched per output channel on the whole tensor. Activations are searched per tensor on a
random subsample of the calibration activations (with the exact global min/max as the starting
range), which keeps the search cheap however much calibration data flows through. Depthwise kernels
can instead be searched on the error they cause at their output (``PatchMoments``,
``search_range_output``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .batches import CalibrationDataError

# Candidate clipping ratios: 1.0, 0.99, ..., 0.21 of the observed range.
_RATIOS = [1.0 - 0.01 * i for i in range(80)]
# The output search clips each end on its own: 1.0, 0.98, ..., 0.22 for each, 1,600 pairs.
_END_RATIOS = _RATIOS[::2]
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


def search_range_output(rows: torch.Tensor, moments: torch.Tensor, n_bits: int):
    """Best (scale, zero_point) per row of ``rows`` ([R, D], one output channel's kernel each) under
    the output error ``dᵀ M d`` of its rounding error ``d``, ``M = moments[r]`` ([R, D, D]).

    The two ends of the range are clipped separately (a kernel's largest tap is often its only
    large one), which the weight-space search cannot afford to do for every layer but a kernel of 9
    or 25 taps can.
    """
    rows = rows.detach().float()
    moments = moments.to(rows)
    lo, hi = rows.amin(dim=1), rows.amax(dim=1)
    best_scale, best_zp = affine_params(lo, hi, n_bits)
    best_err = torch.full_like(lo, float("inf"))
    for r_lo in _END_RATIOS:
        for r_hi in _END_RATIOS:
            scale, zp = affine_params(lo * r_lo, hi * r_hi, n_bits)
            d = fake_quantize(rows, scale[:, None], zp[:, None], n_bits).sub_(rows)
            err = torch.einsum("ri,rij,rj->r", d, moments, d)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_scale = torch.where(better, scale, best_scale)
            best_zp = torch.where(better, zp, best_zp)
    return best_scale, best_zp


class PatchMoments:
    """First and second moments of a convolution's input patches, per group, for
    ``search_range_output``.

    A rounding error ``d`` in one output channel's kernel changes that channel's output by ``d·u``
    over its input patches ``u``; its mean square is ``dᵀ E[uuᵀ] d``, or ``dᵀ Cov(u) d`` when bias
    correction removes the mean part ``d·E[u]``. The weight-space search weighs every tap alike; a
    depthwise kernel's taps see inputs of very different size and correlation (EfficientNet-Lite0,
    4-bit depthwise kernels alone, round-to-nearest: 83.33% top-1 with the weight-space ranges,
    86.69% with these; float 88.04).
    """

    def __init__(self, conv: torch.nn.Conv2d, max_elements: int = 1 << 25):
        self.conv = conv
        self.max_elements = max_elements  # patch elements unfolded at once
        self.second = self.first = None
        self.count = 0

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        conv, groups = self.conv, self.conv.groups
        taps = conv.kernel_size[0] * conv.kernel_size[1]
        per_image = x[0].numel() * taps // (conv.stride[0] * conv.stride[1]) + 1
        for part in x.detach().float().split(max(1, self.max_elements // per_image)):
            u = F.unfold(part, conv.kernel_size, conv.dilation, conv.padding, conv.stride)  # [n, C*taps, L]
            u = u.view(u.shape[0], groups, -1, u.shape[-1])
            # batched matmul over (image, group): an order of magnitude faster on CPU than the same einsum
            second = torch.matmul(u, u.transpose(-1, -2)).sum(0).double()
            first = u.sum((0, 3)).double()
            self.second = second if self.second is None else self.second + second
            self.first = first if self.first is None else self.first + first
            self.count += u.shape[0] * u.shape[-1]

    def matrix(self, centred: bool) -> torch.Tensor:
        """Per group ``[groups, D, D]``: ``E[uuᵀ]``, or the covariance when ``centred`` (clipped to
        positive semi-definite: the subtraction can leave rounding-noise negative eigenvalues)."""
        if self.second is None:
            raise RuntimeError("patch moments saw no data")
        m = self.second / self.count
        if centred:
            mean = self.first / self.count
            m = m - mean[:, :, None] * mean[:, None, :]
            values, vectors = torch.linalg.eigh(m)
            m = vectors @ torch.diag_embed(values.clamp(min=0)) @ vectors.transpose(1, 2)
        return m.float()


class ActivationObserver:
    """Collects what an activation quantizer sees during calibration: exact min/max and a subsample
    (with ``tokens``, each token's min/max too)."""

    def __init__(self, max_samples: int = 1 << 20, per_call: int = 1 << 16, generator: torch.Generator | None = None,
                 tokens: bool = False):
        self.max_samples = max_samples
        self.per_call = per_call
        self.generator = generator
        self.lo = None
        self.hi = None
        self.samples: list[torch.Tensor] = []
        self.count = 0
        self.tokens = tokens  # also record each token's extremes (rows of the last dimension)
        self.token_lo: list[torch.Tensor] = []
        self.token_hi: list[torch.Tensor] = []
        self.token_rows: list[torch.Tensor] = []

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        flat = x.detach().reshape(-1).float()
        if flat.numel() == 0:
            return
        if not torch.isfinite(flat).all():
            raise CalibrationDataError("the float model's activations are NaN/inf on the calibration data (an activation "
                                       "outside every block): check the model and the inputs")
        if self.tokens and self.token_rows and x.shape[-1] != self.token_rows[0].shape[1]:
            # rows of varying length (attention probabilities): not tokens; the L_p search instead
            self.tokens, self.token_lo, self.token_hi, self.token_rows = False, [], [], []
        if self.tokens and x.dim() >= 2:  # each token's extremes, and a sample of whole tokens
            tokens = x.detach().reshape(-1, x.shape[-1]).float()
            self.token_lo.append(tokens.amin(1).cpu())
            self.token_hi.append(tokens.amax(1).cpu())
            keep = max(1, self.per_call // tokens.shape[1])
            if tokens.shape[0] > keep:
                tokens = tokens[torch.randint(0, tokens.shape[0], (keep,), device=tokens.device, generator=self._gen(tokens))]
            self.token_rows.append(tokens.cpu())
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
        if mode == "tokenwise" and self.token_hi:
            rows = torch.cat(self.token_rows)[-MAX_TOKEN_ROWS:]
            return search_token_range(rows, torch.cat(self.token_lo), torch.cat(self.token_hi), n_bits, p)
        scale, zp = search_range(values[None, :], n_bits, "minmax" if mode == "minmax" else "mse", p=p)
        return scale[0], zp[0]


# Token-wise candidates: the range's ends at these quantiles of the tokens' own maxima (and minima).
_TOKEN_QUANTILES = [1.0, 0.9999, 0.999, 0.998, 0.995, 0.99, 0.98, 0.97, 0.95, 0.93, 0.9, 0.85, 0.8, 0.7, 0.6, 0.5]
MAX_TOKEN_ROWS = 8192  # sampled whole tokens the token-wise error is measured on


def search_token_range(rows: torch.Tensor, token_lo: torch.Tensor, token_hi: torch.Tensor, n_bits: int, p: float):
    """Token-wise clipping (after Outlier Suppression, Wei et al. 2022, its coarse stage): in a
    transformer the largest values sit in a few tokens ([CLS], [SEP], punctuation), and an error
    summed over values is set by those tokens, so the L_p search keeps a range wide enough for them
    and leaves every other token a level or two. Here each token counts alike: the error is the mean
    over sampled tokens (``rows``, [T, C]) of each token's L_p quantization error relative to its own
    L_p size. Candidates: the ranges ending at the ``a``-quantiles of the tokens' maxima and the
    ``1 - a``-quantiles of their minima, and the L_p search's shrunk global ranges."""
    size = rows.abs().pow(p).sum(1).clamp(min=_EPS)
    lo_all, hi_all = token_lo.min(), token_hi.max()
    candidates = [(torch.quantile(token_lo, 1 - a), torch.quantile(token_hi, a)) for a in _TOKEN_QUANTILES]
    candidates += [(lo_all * r, hi_all * r) for r in _RATIOS]
    best, best_err = None, float("inf")
    for lo, hi in candidates:
        scale, zp = affine_params(lo, hi, n_bits)
        err = float(((fake_quantize(rows, scale, zp, n_bits) - rows).abs_().pow_(p).sum(1) / size).mean())
        if err < best_err:
            best, best_err = (scale, zp), err
    return best
