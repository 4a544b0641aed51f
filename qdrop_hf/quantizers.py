"""Fake quantizers: AdaRound weight quantizer and LSQ activation quantizer with QDrop's random drop.

Both hold their state in parameters/buffers only, so a quantized model's ``state_dict`` is its whole
quantization result. Weight quantizers progress ``nearest -> soft (AdaRound) -> hard``; once hard, the
integer codes are a ``uint8`` buffer and the float weight is no longer needed to run the model.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .batches import is_channels_last
from .native import fake_quant_kernels
from .observers import ActivationObserver, fake_quantize, search_range, search_range_output

GAMMA, ZETA = -0.1, 1.1  # AdaRound's rectified-sigmoid stretch


class DropMasks:
    """Element-wise drop masks: 1 (use the float value) with probability ``1 - keep_prob``, else 0.

    Served as windows of one pre-drawn pool: drawing fresh random numbers for every activation at
    every iteration costs as much as the block's arithmetic on a CPU (about 2 ns an element), while a
    window at a random offset into a pool half again as large as the request is Bernoulli
    element-wise and costs nothing per call. The pool is uint8, which the C++ kernels read (a quarter
    of a float mask's memory traffic); the torch-op kernels get float windows, not bool: on CPU,
    bool-masked ``where``/``mul`` run an order of magnitude slower than float arithmetic, and a 0/1
    float mask mixes exactly through ``lerp`` (``a.lerp(b, 0) == a``, ``a.lerp(b, 1) == b``, bit for
    bit). The masks do not depend on which kernels run: a window is laid out in the memory order of
    the tensor it drops from (contiguous, or channels-last), the order the C++ kernels read it in.
    """

    def __init__(self, keep_prob: float, generator: torch.Generator, min_pool: int = 1 << 20):
        self.keep_prob = keep_prob
        self.generator = generator
        self.min_pool = min_pool
        self.pool = torch.empty(0, device=generator.device)

    def __call__(self, like: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """A mask for ``like``: its shape, and its strides where it is channels-last."""
        n = like.numel()
        if self.pool.numel() < n + n // 2:
            size = max(self.min_pool, 2 * n)
            draw = torch.rand(size, generator=self.generator, device=self.generator.device)
            self.pool = torch.ge(draw, self.keep_prob, out=draw).to(torch.uint8)
        start = int(torch.randint(self.pool.numel() - n + 1, (1,), generator=self.generator, device=self.generator.device))
        window = self.pool[start:start + n]
        if is_channels_last(like):
            return window.as_strided(like.shape, like.stride()).to(dtype)
        return window.view(like.shape).to(dtype)

    def mix(self, kept: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        """``kept`` where the mask keeps, ``other`` where it drops (exactly either value, never a blend)."""
        if _mask_dtype(kept, other) == torch.uint8:
            return fake_quant_kernels().mix(kept, other, self(kept, torch.uint8))
        return torch.lerp(kept, other, self(kept, kept.dtype))


class _FakeQuant(torch.autograd.Function):
    """LSQ fake quantization, optionally replaced by the float input where a 0/1 ``drop`` mask is 1.

    One autograd node that saves no mask: the backward recovers which elements pass the
    straight-through gradient from ``|out - x| < s/2`` (true for in-range elements and for dropped
    ones, whose output is ``x``; a clipped element lies at least half a step from its grid value as
    the zero point is an integer), so it saves only ``x`` and the output: no mask, no per-element
    step gradient, and the output is usually saved by the next op anyway. The LSQ step gradient is
    ``sum(g * (out - x * pass)) / s``: ``round(v) - v`` for a kept in-range element, ``q - zp`` for a
    clipped one, 0 for a dropped one. This is the torch-op node; ``csrc``'s ``FakeQuantNode`` is the
    same in C++.
    """

    @staticmethod
    def forward(ctx, x, scale, zero_point, n_bits: int, drop):
        out = _KERNELS["forward"](x, scale, zero_point, n_bits, drop)
        ctx.save_for_backward(x, out, scale)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, out, scale = ctx.saved_tensors
        grad_x, grad_scale = _KERNELS["backward"](grad, x, out, scale, ctx.needs_input_grad[1])
        return grad_x, grad_scale, None, None, None


def _eager_forward(x, scale, zero_point, n_bits: int, drop):
    out = fake_quantize(x, scale, zero_point, n_bits)
    return out if drop is None else out.lerp_(x, drop)


def _eager_backward(grad, x, out, scale, need_scale: bool):
    passes = (out - x).abs_()
    torch.lt(passes, scale * 0.5, out=passes)  # 1.0 where the gradient passes straight through
    grad_x = grad * passes
    if not need_scale:  # steps not learned (order before/after): three passes saved
        return grad_x, None
    # out - x * pass: round(v) - v (times s) where passing, q - zp (times s) where clipped
    torch.sub(out, passes.mul_(x), out=passes)
    return grad_x, torch.dot(grad.reshape(-1), passes.reshape(-1)) / scale


def _fusable(*tensors) -> bool:
    """float32 CPU tensors (None passes): the C++ kernels' domain. Strided ones other than
    channels-last are made contiguous on the way in."""
    return all(t is None or (t.device.type == "cpu" and t.dtype == torch.float32) for t in tensors)


def _native(*tensors):
    """The C++ module when the fused kernels are selected, take ``tensors`` and are built, else None.
    Checked in that order, so that a run on a GPU never compiles them."""
    return fake_quant_kernels() if _KERNELS["native"] and _fusable(*tensors) else None


def _mask_dtype(*tensors) -> torch.dtype:
    """uint8 where the fused kernels will take the tensors, else their own dtype (for the eager ``lerp``)."""
    if _native(*tensors) is not None:
        return torch.uint8
    return tensors[0].dtype


def _fused_forward(x, scale, zero_point, n_bits: int, drop):
    """The one-pass C++ kernel (``native``) for float32 CPU tensors (and a uint8 mask), else the eager one."""
    fused = _native(x)
    if fused is not None and (drop is None or drop.dtype == torch.uint8):
        return fused.forward(x, float(scale), float(zero_point), 2**n_bits - 1, drop)
    return _eager_forward(x, scale, zero_point, n_bits, None if drop is None else drop.to(x.dtype))


# The kernels of the Python fake-quant node and of the no-grad path; with "native", the C++ autograd
# nodes (fake quant, soft weight, rounding loss) replace the Python ones where they apply.
_KERNELS = {"forward": _fused_forward, "backward": _eager_backward, "native": True}


def use_kernels(kind: str) -> None:
    """Which kernels the quantizers run: "fused" (the default: the C++ kernels on CPU float32, eager
    elsewhere), "eager" (torch ops only) or "compiled" (``QDropConfig.compile``: the activation
    quantizers' eager kernels fused by ``torch.compile``, for GPUs and dtypes the C++ kernels do not
    cover; on CPU its per-call guards cost more than it saves on small blocks)."""
    if kind == "fused":
        _KERNELS.update(forward=_fused_forward, backward=_eager_backward, native=True)
    elif kind == "eager":
        _KERNELS.update(forward=_eager_forward, backward=_eager_backward, native=False)
    elif kind == "compiled":
        _KERNELS.update(forward=torch.compile(_eager_forward, dynamic=True),
                        backward=torch.compile(_eager_backward, dynamic=True), native=False)
    else:
        raise ValueError(f"kernels must be 'fused', 'eager' or 'compiled', not {kind!r}")


# h(alpha) leaves (0, 1) where sigmoid(alpha) leaves [-gamma, 1 - gamma] / (zeta - gamma) = [1/12, 11/12]
_H_OPEN = math.log((1 - GAMMA) / (ZETA - 1))  # = ln 11: h is strictly inside (0, 1) for |alpha| below it


def _rectified_sigmoid(alpha: torch.Tensor) -> torch.Tensor:
    """h(alpha) = clamp(sigmoid(alpha) * (zeta - gamma) + gamma, 0, 1), in four passes."""
    return torch.sigmoid(alpha).mul_(ZETA - GAMMA).add_(GAMMA).clamp_(0, 1)


def _rectified_sigmoid_grad(alpha: torch.Tensor) -> torch.Tensor:
    """dh/dalpha = sigmoid' * (zeta - gamma) where the clamp does not bind, else 0.

    Float arithmetic only: on this CPU build one bool-tensor op costs as much as the whole
    expression (the weights of a small conv are a few thousand elements, so each pass is mostly call
    overhead, and this runs twice per layer per iteration).
    """
    sig = torch.sigmoid(alpha)
    inside = torch.le(alpha.abs(), _H_OPEN, out=torch.empty_like(alpha))  # 1.0 / 0.0
    return sig.mul_(1 - sig).mul_(inside.mul_(ZETA - GAMMA))


class _SoftWeight(torch.autograd.Function):
    """AdaRound's soft weight ``base + h(alpha) * step`` as one node that saves nothing of its own
    (torch ops; the C++ node in ``csrc`` does the same in one pass each way).

    Autograd through the elementwise chain would keep the sigmoid, the clamp input and the soft
    rounding alive until backward: three weight-sized tensors per layer for every micro-batch's graph.
    The backward recomputes ``dh/dalpha`` from ``alpha`` instead.
    """

    @staticmethod
    def forward(ctx, alpha, base, step):
        ctx.save_for_backward(alpha, step)
        return torch.addcmul(base, _rectified_sigmoid(alpha), step)

    @staticmethod
    def backward(ctx, grad):
        alpha, step = ctx.saved_tensors
        return _rectified_sigmoid_grad(alpha).mul_(step).mul_(grad), None, None


class _RoundingLoss(torch.autograd.Function):
    """sum(1 - |c|^beta), c = 2h(alpha) - 1, as one node (torch ops; the C++ node does the same in one
    pass). Its gradient, -2 beta |c|^(beta-1) sign(c) dh/dalpha, is computed with the value and saved:
    the loss is added once per iteration, so this is one weight-sized tensor per layer."""

    @staticmethod
    def forward(ctx, alpha, beta: float):
        c = _rectified_sigmoid(alpha).mul_(2).sub_(1)
        mag = c.abs()
        pow1 = mag.pow(beta - 1)
        loss = alpha.numel() - torch.dot(pow1.reshape(-1), mag.reshape(-1))
        ctx.save_for_backward(pow1.mul_(torch.sign(c)).mul_(_rectified_sigmoid_grad(alpha)).mul_(-2 * beta))
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        (grad,) = ctx.saved_tensors
        return grad * grad_out, None


def _soft_weight(alpha, base, step):
    native = _native(alpha, base, step)
    if native is not None:
        return native.soft_weight_node(alpha, base, step)
    return _SoftWeight.apply(alpha, base, step)


def _rounding_loss(alpha, beta: float):
    native = _native(alpha)
    if native is not None:
        return native.rounding_loss_node(alpha, beta)
    return _RoundingLoss.apply(alpha, beta)


def _fake_quant(x, scale, zero_point, n_bits: int, drop):
    """The fake-quant autograd node: the C++ one for float32 CPU activations, else ``_FakeQuant``."""
    native = _native(x, scale)
    if native is not None and (drop is None or drop.dtype == torch.uint8):
        return native.fake_quant(x, scale, float(zero_point), 2**n_bits - 1, drop)
    return _FakeQuant.apply(x, scale, zero_point, n_bits, drop)


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

    codes_source = None  # where a kernel's packed weight is the only copy of the codes: gives them back

    def hand_codes_to(self, source) -> None:
        """Drop the codes buffer, ``source()`` giving them back on a read (saving, export, a non-CPU
        forward): the int8 GEMM's packed weight holds them already (``qdrop_hf.integer_linear``)."""
        self.codes_source = source
        self._buffers.pop("codes")

    def __getattr__(self, name: str):
        if name == "codes" and self.codes_source is not None:
            return self.codes_source().to(self.scale.device)
        return super().__getattr__(name)

    @property
    def qmax(self) -> int:
        return 2**self.n_bits - 1

    @property
    def initialized(self) -> bool:
        return self.scale.numel() > 0

    @property
    def hardened(self) -> bool:  # a kernel holding the codes means they are final: no unpacking to tell
        return self.codes_source is not None or self.codes.numel() > 0

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

    @torch.no_grad()
    def init_range_output(self, weight: torch.Tensor, moments: torch.Tensor) -> None:
        """Per-channel range from each kernel's output error (``observers.search_range_output``);
        ``moments``: ``[groups, D, D]`` input-patch moments (``PatchMoments.matrix``), output channels
        split evenly over the groups as in a grouped convolution."""
        if not self.channel_wise or self.ch_axis != 0:
            raise ValueError("the output-error range search needs per-output-channel ranges")
        rows = weight.detach().float().reshape(weight.shape[0], -1)
        per_row = moments.repeat_interleave(weight.shape[0] // moments.shape[0], dim=0)
        scale, zp = search_range_output(rows, per_row, self.n_bits)
        self.scale = scale.reshape(self._shape(weight))
        self.zero_point = zp.reshape(self._shape(weight))
        self.codes = torch.empty(0, dtype=torch.uint8, device=weight.device)
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

    def rounding_loss(self, beta: float) -> torch.Tensor:
        """AdaRound's regulariser, sum(1 - |2h - 1|^beta): zero only when every h is 0 or 1."""
        return _rounding_loss(self.alpha, beta)

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
        """The float weight from the codes (one fused pass on CPU: ``csrc`` ``dequantize``)."""
        codes = self.codes
        native = _native() if codes.device.type == "cpu" and (self.ch_axis == 0 or not self.channel_wise) else None
        if native is not None and codes.is_contiguous() and codes.dim() > 0:
            return native.dequantize(codes, self.scale, self.zero_point)
        return (codes.float() - self.zero_point) * self.scale

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if not self.enabled or not self.initialized:
            return weight
        if self.hardened:
            return self.dequantized().to(weight.dtype)
        if self.alpha is not None:
            return _soft_weight(self.alpha, self.w_base, self.w_step).to(weight.dtype)
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
        self.range_p = 2.0  # L_p error of the range search; set per model family
        self.observer: ActivationObserver | None = None
        self.scale = nn.Parameter(torch.ones(()), requires_grad=False)
        self.register_buffer("zero_point", torch.zeros(()))
        self.register_buffer("initialized", torch.tensor(False))
        # outlier migration (``qdrop_hf.migration``): the input's last dimension divided by this, per
        # channel, before anything else, quantizer on or off: the consumer's weight holds the inverse
        self.register_buffer("channel_scale", None)
        self.export_grid: tuple = None  # while exporting to ONNX: (step, zero point), or () when off

    @property
    def qmax(self) -> int:
        return 2**self.n_bits - 1

    def set_bits(self, n_bits: int) -> None:
        self.n_bits = n_bits

    def exported(self, x: torch.Tensor) -> torch.Tensor:
        """The quantizer as the ONNX graph holds it: ``Clip`` to the grid's range, then an 8-bit
        QuantizeLinear/DequantizeLinear pair with the learned step and zero point. A grid of fewer
        bits sits in the uint8 container exactly, the Clip keeping its codes within ``[0, qmax]``
        (the same values as the fake quantizer; ONNX Runtime has integer kernels for 8-bit activations
        only)."""
        step, zero_point = self.export_grid
        if self.qmax < 255:  # at 8 bits QuantizeLinear's own saturation is the grid's range
            x = x.clamp(-zero_point * step, (self.qmax - zero_point) * step)
        q = torch.ops.quantized_decomposed.quantize_per_tensor(x, step, zero_point, 0, 255, torch.uint8)
        return torch.ops.quantized_decomposed.dequantize_per_tensor(q, step, zero_point, 0, 255, torch.uint8)

    def observe(self, generator: torch.Generator | None = None, tokens: bool = False) -> None:
        self.observer = ActivationObserver(generator=generator, tokens=tokens)

    @torch.no_grad()
    def migrate(self, scale: torch.Tensor) -> None:
        """Divide the input's channels by ``scale`` from now on (the consumer multiplies them back)."""
        self.channel_scale = scale.detach().float().to(self.zero_point.device)

    @torch.no_grad()
    def finish_observing(self, mode: str = "mse") -> None:
        scale, zp = self.observer.compute(self.n_bits, mode, self.range_p)
        self.observer = None
        self.scale.data = scale.to(self.scale.device)
        self.zero_point.copy_(zp)
        self.initialized.fill_(True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channel_scale is not None:
            x = x / self.channel_scale.to(x.dtype)
        if self.export_grid is not None:  # exporting: () for a quantizer that is off
            return self.exported(x) if self.export_grid else x
        if self.observer is not None:
            self.observer.update(x)
            return x
        if not self.active:
            return x
        if torch.is_grad_enabled() and (x.requires_grad or self.scale.requires_grad):
            drop = self.drop_masks(x, _mask_dtype(x)) if self.drop_masks is not None else None
            return _fake_quant(x, self.scale, self.zero_point, self.n_bits, drop)
        return self._quantize(x, self.drop_masks)  # nothing to differentiate

    @property
    def active(self) -> bool:
        """Set up and on: its forward quantizes."""
        return self.enabled and self.observer is None and bool(self.initialized)

    @torch.no_grad()
    def quantize(self, x: torch.Tensor, drop_masks: DropMasks | None = None) -> torch.Tensor:
        """``x`` fake-quantized with the current (fixed) step, kept as ``x`` where ``drop_masks`` drops:
        the forward with no gradient, also used to drop this quantizer from outside its own unit
        (``BlockCache.input_quantizer``)."""
        return self._quantize(x, drop_masks)

    def _quantize(self, x: torch.Tensor, drop_masks: DropMasks | None) -> torch.Tensor:
        drop = drop_masks(x, _mask_dtype(x)) if drop_masks is not None else None
        return _KERNELS["forward"](x, self.scale, self.zero_point, self.n_bits, drop)

    def extra_repr(self) -> str:
        return f"n_bits={self.n_bits}, enabled={self.enabled}"

