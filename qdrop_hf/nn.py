"""Quantized drop-in replacements for Linear, Conv2d and GPT-2's Conv1D, and a quantized attention.

The layers keep their float parameters under the original names (so a float checkpoint loads into
them unchanged) and add a ``weight_quantizer``. Once a model is quantized its layers release the
float weight (``release_float_weight``): a finished layer holds its integer codes (one byte a
weight), per-channel scales and zero points, and its bias. Activation quantizers are not part of the layers: a
model family decides where they sit (see ``families``), and attention gets its quantizers through
transformers' attention-function registry rather than by patching model code.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from .quantizers import ActQuantizer, WeightQuantizer


class BiasCorrection:
    """Bias correction (Nagel et al., 2019, data-based): quantizing the weights by dW shifts the layer's
    mean output by dW·E[x]. With ``input_mean`` set (the float input's per-feature mean on the
    calibration data) the layer subtracts that shift from its bias, through the soft weights while
    AdaRound learns the rounding; ``fold_bias_correction`` fixes it as ``bias_shift`` once the
    rounding is fixed. The float bias itself never changes: with the weight quantizer off the layer
    is the float layer, which the reconstruction's float targets rely on. Saving writes the corrected
    bias.

    Why: with BatchNorm folded in, a depthwise convolution sums 9 or 25 weights over inputs with a
    large mean, and their rounding errors add up to a per-channel offset that no choice of roundings
    cancels. EfficientNet-Lite0's first block: 29% relative output error from its 4-bit depthwise
    weights alone, 3.8% with the offset removed."""

    input_mean: torch.Tensor | None = None
    export_weight = None  # while exporting to ONNX: the weight as DequantizeLinear of the integer codes

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_buffer("bias_shift", None, persistent=False)

    def mean_shift(self, delta: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __getattr__(self, name: str):
        if name == "weight" and self.released:  # model code reads e.g. ``.weight.dtype``: made on the read, not kept
            return self.weight_quantizer.dequantized().to(self.weight_dtype)
        return super().__getattr__(name)

    @property
    def released(self) -> bool:
        return "weight" not in self._parameters and "weight" not in self._buffers

    def weight_and_bias(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The weight and bias the forward uses: the quantized ones (or the float ones with the quantizer off)."""
        if self.released:
            if self.export_weight is not None:
                return self.export_weight(), self.bias
            return self.weight_quantizer.dequantized().to(self.weight_dtype), self.bias
        w = self.weight_quantizer(self.weight)
        return w, self.corrected_bias(w)

    @torch.no_grad()
    def release_float_weight(self) -> None:
        """Keep only the integer codes: drop the float weight and fold a fixed bias correction into the
        bias. Done once the codes are final (end of ``quantize_model``, after loading); from then on
        the layer is its quantized self only and dequantizes its codes at each forward."""
        if not self.weight_quantizer.hardened or self.released:
            return
        self.weight_dtype = self.weight.dtype
        if self.bias_shift is not None:
            self.bias.sub_(self.bias_shift.to(self.bias.dtype))
            self.bias_shift = None
        self._parameters.pop("weight", None)
        self._buffers.pop("weight", None)
        self._non_persistent_buffers_set.discard("weight")

    int8_gemm = None  # (packed int8 weight, input step, input zero point): see qdrop_hf.integer_linear

    def on_int8_gemm(self, x: torch.Tensor) -> bool:
        return self.int8_gemm is not None and x.device.type == "cpu" and x.dtype == torch.float32 and self.export_weight is None

    def int8_matmul(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ weight.T + bias`` over the last dimension on fbgemm's int8 GEMM: ``x`` quantized on its
        quantizer's grid (where it already lies), int32 accumulation, float output."""
        packed, step, zero_point = self.int8_gemm
        return torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(x, step, zero_point, packed)

    def corrected_bias(self, weight_q: torch.Tensor) -> torch.Tensor | None:
        if self.bias is None or weight_q is self.weight:  # the quantizer is off: the float layer
            return self.bias
        if self.input_mean is not None:
            return self.bias - self.mean_shift(weight_q - self.weight)
        if self.bias_shift is not None:
            return self.bias - self.bias_shift
        return self.bias

    @torch.no_grad()
    def fold_bias_correction(self) -> None:
        if self.input_mean is not None and self.bias is not None:
            self.bias_shift = self.mean_shift(self.weight_quantizer(self.weight) - self.weight)
        self.input_mean = None


class QuantLinear(BiasCorrection, nn.Linear):
    def __init__(self, in_features, out_features, bias=True, device=None, dtype=None, *, n_bits=8, channel_wise=True):
        super().__init__(in_features, out_features, bias, device, dtype)
        self.weight_quantizer = WeightQuantizer(n_bits, channel_wise, ch_axis=0)

    @classmethod
    def from_float(cls, layer: nn.Linear, n_bits: int, channel_wise: bool) -> "QuantLinear":
        with torch.device("meta"):
            q = cls(layer.in_features, layer.out_features, layer.bias is not None)
        q.weight, q.bias = layer.weight, layer.bias
        q.weight_quantizer = WeightQuantizer(n_bits, channel_wise, ch_axis=0)
        return q

    def mean_shift(self, delta: torch.Tensor) -> torch.Tensor:
        return delta @ self.input_mean.to(delta.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.on_int8_gemm(x):
            return self.int8_matmul(x)
        return F.linear(x, *self.weight_and_bias())


class QuantConv2d(BiasCorrection, nn.Conv2d):
    """Conv2d (grouped and depthwise included) with a per-output-channel weight quantizer."""

    def __init__(self, *args, n_bits=8, channel_wise=True, **kwargs):
        super().__init__(*args, **kwargs)
        self.weight_quantizer = WeightQuantizer(n_bits, channel_wise, ch_axis=0)

    @classmethod
    def from_float(cls, conv: nn.Conv2d, n_bits: int, channel_wise: bool) -> "QuantConv2d":
        with torch.device("meta"):
            q = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                    conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode)
        q.weight, q.bias = conv.weight, conv.bias
        q.weight_quantizer = WeightQuantizer(n_bits, channel_wise, ch_axis=0)
        return q

    def mean_shift(self, delta: torch.Tensor) -> torch.Tensor:
        per_input = delta.sum((2, 3))  # [out, in / groups]: the kernel sums over its window
        g = self.groups
        mean = self.input_mean.to(delta.dtype).view(g, -1, 1)
        return torch.bmm(per_input.view(g, -1, per_input.shape[1]), mean).view(-1)

    @property
    def pointwise(self) -> bool:
        """A 1x1 convolution with stride 1, no padding and one group: a Linear over the channels of
        each pixel, which the int8 GEMM computes on the channels-last view of its input."""
        return (self.kernel_size == (1, 1) and self.stride == (1, 1) and self.dilation == (1, 1)
                and self.groups == 1 and self.padding in ((0, 0), "valid"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4 and self.on_int8_gemm(x):  # NCHW -> NHWC (a view when x is channels-last) and back
            return self.int8_matmul(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self._conv_forward(x, *self.weight_and_bias())


class QuantConv1D(BiasCorrection, Conv1D):
    """GPT-2 style Conv1D (weight stored [in, out]): output channels are on axis 1."""

    def __init__(self, nf, nx, *, n_bits=8, channel_wise=True):
        super().__init__(nf, nx)
        self.weight_quantizer = WeightQuantizer(n_bits, channel_wise, ch_axis=1)

    @classmethod
    def from_float(cls, layer: Conv1D, n_bits: int, channel_wise: bool) -> "QuantConv1D":
        with torch.device("meta"):
            q = cls(layer.nf, layer.weight.shape[0])
        q.weight, q.bias = layer.weight, layer.bias
        q.weight_quantizer = WeightQuantizer(n_bits, channel_wise, ch_axis=1)
        return q

    def mean_shift(self, delta: torch.Tensor) -> torch.Tensor:
        return self.input_mean.to(delta.dtype) @ delta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out_shape = x.shape[:-1] + (self.nf,)
        w, b = self.weight_and_bias()
        x = torch.addmm(b, x.reshape(-1, x.size(-1)), w)
        return x.view(out_shape)


def release_float_weights(model: nn.Module) -> None:
    """Every hardened quantized layer keeps its integer codes only (``release_float_weight``)."""
    for module in model.modules():
        if isinstance(module, QuantLayer):
            module.release_float_weight()


QUANT_LAYERS = {nn.Linear: QuantLinear, nn.Conv2d: QuantConv2d, Conv1D: QuantConv1D}
QuantLayer = (QuantLinear, QuantConv2d, QuantConv1D)


def replace_layers(model: nn.Module, n_bits: int, channel_wise: bool, skip=lambda name: False) -> list[str]:
    """Swap every float Linear/Conv2d/Conv1D (exact type) for its quantized twin; returns their names."""
    replaced = []
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            name = f"{parent_name}.{child_name}" if parent_name else child_name
            target = QUANT_LAYERS.get(type(child))
            if target is None or skip(name):
                continue
            setattr(parent, child_name, target.from_float(child, n_bits, channel_wise))
            replaced.append(name)
    return replaced


class RescaledLayerNorm(nn.LayerNorm):
    """A LayerNorm of ``x * input_scale`` (a plain one while ``input_scale`` is None).

    Outlier migration divides a post-LN block's LayerNorm output by a per-channel scale, folded into
    that LayerNorm, for the Linear layers that read it (``migration.migrate_layernorm_outputs``).
    The residual adds the same scaled tensor back before the next LayerNorm; the branch added to it
    is scaled alike, so the sum reaches this LayerNorm divided by the scale, which it takes back
    here. No weight can hold it: a LayerNorm is not equivariant to a per-channel scale."""

    @classmethod
    def make(cls, layer: nn.LayerNorm) -> None:
        """Turn ``layer`` into one in place (its parameters, hooks and place in the model kept)."""
        if type(layer) is nn.LayerNorm:
            layer.__class__ = cls
            layer.register_buffer("input_scale", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_scale is not None:
            x = x * self.input_scale.to(x.dtype)
        return super().forward(x)


class AttentionQuantizers(nn.Module):
    """The five activation quantizers of one attention: Q, K, V, probabilities and context."""

    def __init__(self, n_bits: int):
        super().__init__()
        self.query = ActQuantizer(n_bits)
        self.key = ActQuantizer(n_bits)
        self.value = ActQuantizer(n_bits)
        self.probs = ActQuantizer(n_bits)
        self.context = ActQuantizer(n_bits)


def qdrop_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Scaled dot-product attention with every matmul operand activation-quantized.

    Registered with transformers as ``attn_implementation="qdrop"``; the quantizers live on the
    attention module as ``module.qdrop_attn`` (absent: it behaves as plain eager attention).
    """
    quant = getattr(module, "qdrop_attn", None)
    if quant is not None:
        query, key, value = quant.query(query), quant.key(key), quant.value(value)
    if key.shape[1] != query.shape[1]:  # grouped-query attention
        groups = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    if scaling is None:
        scaling = query.size(-1) ** -0.5
    scores = torch.matmul(query, key.transpose(-1, -2)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask[..., : key.shape[-2]]
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = F.dropout(probs, p=dropout, training=module.training)
    if quant is not None:
        probs = quant.probs(probs)
    context = torch.matmul(probs, value)
    if quant is not None:
        context = quant.context(context)
    return context.transpose(1, 2).contiguous(), probs


def register_attention() -> None:
    """Make ``attn_implementation="qdrop"`` known to transformers (idempotent)."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    AttentionInterface.register("qdrop", qdrop_attention_forward)
    AttentionMaskInterface.register("qdrop", ALL_MASK_ATTENTION_FUNCTIONS["eager"])
