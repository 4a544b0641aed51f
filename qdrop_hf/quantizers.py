"""Fake quantizers: AdaRound weight quantizer and LSQ activation quantizer with QDrop's random drop.

Both hold their state in parameters/buffers only, so a quantized model's ``state_dict`` is its whole
quantization result. Weight quantizers progress ``nearest -> soft (AdaRound) -> hard``; once hard, the
integer codes are a ``uint8`` buffer and the float weight is no longer needed to run the model.
"""
from __future__ import annotations

import torch
from torch import nn

from .observers import ActivationObserver, fake_quantize, search_range

GAMMA, ZETA = -0.1, 1.1  # AdaRound's rectified-sigmoid stretch


class DropMasks:
    """Element-wise Bernoulli(keep_prob) masks, served as random windows of one pre-drawn pool.

    Drawing fresh random numbers for every activation at every iteration costs as much as the
    block's arithmetic on a CPU; a window at a random offset into a pool several times larger than
    any request is Bernoulli(keep_prob) element-wise and costs nothing per call.
    """

    def __init__(self, keep_prob: float, generator: torch.Generator, min_pool: int = 1 << 22):
        self.keep_prob = keep_prob
        self.generator = generator
        self.min_pool = min_pool
        self.pool = torch.empty(0, dtype=torch.bool, device=generator.device)

    def __call__(self, shape: torch.Size) -> torch.Tensor:
        n = shape.numel()
        if self.pool.numel() < 4 * n:
            size = max(self.min_pool, 8 * n)
            self.pool = torch.rand(size, generator=self.generator, device=self.generator.device) < self.keep_prob
        start = int(torch.randint(self.pool.numel() - n + 1, (1,), generator=self.generator, device=self.generator.device))
        return self.pool[start:start + n].view(shape)


def _fake_quant_forward(x, scale, zero_point, qmax: int, keep, need_scale_grad: bool):
    v = x / scale
    r = torch.round(v)
    q = r + zero_point
    inside = (q >= 0) & (q <= qmax)
    q = q.clamp(0, qmax)
    xq = (q - zero_point) * scale
    d_scale = torch.where(inside, r - v, q - zero_point) if need_scale_grad else None
    if keep is None:
        return xq, inside, d_scale
    if d_scale is not None:
        d_scale = d_scale * keep
    return torch.where(keep, xq, x), inside | ~keep, d_scale


def _fake_quant_backward(grad, pass_x, d_scale):
    grad_x = grad * pass_x
    return grad_x, None if d_scale is None else (grad * d_scale).sum()


_KERNELS = {"forward": _fake_quant_forward, "backward": _fake_quant_backward}


def use_compiled_kernels(enabled: bool) -> None:
    """Fuse the fake-quant kernels with ``torch.compile`` (about 2x faster element-wise work on CPU).

    Worth it for long reconstructions; it costs a one-off compile of a few seconds per shape family.
    """
    if enabled:
        _KERNELS["forward"] = torch.compile(_fake_quant_forward, dynamic=True)
        _KERNELS["backward"] = torch.compile(_fake_quant_backward, dynamic=True)
    else:
        _KERNELS.update(forward=_fake_quant_forward, backward=_fake_quant_backward)


class _FakeQuant(torch.autograd.Function):
    """LSQ fake quantization, optionally mixed with the float input where ``keep`` is False.

    One fused op instead of a dozen autograd nodes: straight-through gradient for the input inside
    the range, the LSQ gradient for the step (``round(v) - v`` inside, ``q - zp`` at the clip).
    """

    @staticmethod
    def forward(ctx, x, scale, zero_point, qmax: int, keep):
        out, pass_x, d_scale = _KERNELS["forward"](x, scale, zero_point, qmax, keep, ctx.needs_input_grad[1])
        ctx.save_for_backward(pass_x, d_scale)
        return out

    @staticmethod
    def backward(ctx, grad):
        pass_x, d_scale = ctx.saved_tensors
        grad_x, grad_scale = _KERNELS["backward"](grad, pass_x, d_scale)
        return grad_x, None if grad_scale is None else grad_scale.reshape(()), None, None, None


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
        """Create the rounding variables so that the soft-quantized weight equals ``weight`` at start.

        With ``b = floor(w / s) + zp`` the soft weight is ``s * (clamp(b + h, 0, qmax) - zp)``. The
        clamp only bites where ``b < 0`` or ``b >= qmax``, and there the value no longer depends on
        ``h``; so it is precomputed as ``base + h * step`` (``step = 0`` where clipped): one multiply-add
        per iteration.
        """
        x = weight.detach().float() / self.scale
        floor = torch.floor(x)
        rest = (x - floor).clamp(1e-6, 1 - 1e-6)
        b = floor + self.zero_point
        free = (b >= 0) & (b <= self.qmax - 1)
        self.register_buffer("w_base", (b.clamp(0, self.qmax) - self.zero_point) * self.scale, persistent=False)
        self.register_buffer("w_step", free * self.scale, persistent=False)
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
            w = self.w_base + (self.alpha >= 0).float() * self.w_step
            del self.w_base, self.w_step
            self.alpha = None
        else:
            w = weight.detach().float()
        self.codes = torch.clamp(torch.round(w / self.scale) + self.zero_point, 0, self.qmax).to(torch.uint8)

    def dequantized(self) -> torch.Tensor:
        return (self.codes.float() - self.zero_point) * self.scale

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if not self.enabled or not self.initialized:
            return weight
        if self.hardened:
            return self.dequantized().to(weight.dtype)
        if self.alpha is not None:
            return torch.addcmul(self.w_base, self.soft_rounding(), self.w_step).to(weight.dtype)
        return fake_quantize(weight, self.scale, self.zero_point, self.n_bits).to(weight.dtype)


class ActQuantizer(nn.Module):
    """Per-tensor asymmetric activation quantizer with a learnable step (LSQ) and QDrop.

    While ``drop_masks`` is set (only inside block reconstruction, and only when prob < 1), each
    element keeps its quantized value with probability ``prob`` and its float value otherwise.
    """

    def __init__(self, n_bits: int):
        super().__init__()
        self.n_bits = n_bits
        self.enabled = False
        self.drop_masks: DropMasks | None = None  # set only inside block reconstruction
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
        if not torch.is_grad_enabled() or not (x.requires_grad or self.scale.requires_grad):
            return fake_quantize(x, self.scale, self.zero_point, self.n_bits)
        keep = self.drop_masks(x.shape) if self.drop_masks is not None else None
        return _FakeQuant.apply(x, self.scale, self.zero_point, self.qmax, keep)

    def extra_repr(self) -> str:
        return f"n_bits={self.n_bits}, enabled={self.enabled}"

