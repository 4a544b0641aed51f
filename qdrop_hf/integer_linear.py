"""Quantized Linear layers and 1x1 convolutions on the CPU's int8 GEMM at inference.

A finished quantized Linear whose input comes straight from an activation quantizer of at most 8 bits
multiplies integers: its input is on that quantizer's grid, its weight on its own, so fbgemm's
``quantized::linear_with_input_q_dq_qweight_dq_output_fp32`` (input quantized with the quantizer's
step and zero point, int8 weights, int32 accumulation, float output) computes the same product as
the float matmul of the dequantized tensors, up to float rounding, in about half the time of a
float32 GEMM with VNNI. Without it the layer dequantizes its codes at each call. A 1x1 convolution
(stride 1, unpadded, one group) is the same product over the channels of each pixel: it runs on the
same kernel through the channels-last view of its input (``QuantConv2d.pointwise``), and since its
output is channels-last too, so is the rest of the network after it (no copies). In
EfficientNet/MobileNet-style networks these are the expand, project and head convolutions, most of
the arithmetic; depthwise and spatial convolutions keep the dequantizing path.

Which quantizer feeds which Linear is found once, on a calibration batch (``link_input_quantizers``),
and saved with the model (``quantization_config.input_quantizers``), so that a reloaded model packs
its layers at load. The packed weight is then the layer's only copy of its codes (one byte a weight);
saving and export unpack it. x86 CPUs without VNNI multiply uint8 by int8 in pairs summed into int16, which
saturates for 8-bit weights; there, only layers of at most 7-bit weights use the kernel.
"""
from __future__ import annotations

import functools
import warnings

import torch
from torch import nn

from .batches import run_model
from .nn import QuantConv2d, QuantLinear
from .quantizers import ActQuantizer


@functools.cache
def available() -> bool:
    return "fbgemm" in torch.backends.quantized.supported_engines and hasattr(
        torch.ops.quantized, "linear_with_input_q_dq_qweight_dq_output_fp32")


@functools.cache
def _has_vnni() -> bool:
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return False
    return "avx512_vnni" in flags or "avx_vnni" in flags or "amx_int8" in flags


def max_weight_bits() -> int:
    return 8 if _has_vnni() else 7


def _gemm_shaped(module: nn.Module) -> bool:
    return isinstance(module, QuantLinear) or (isinstance(module, QuantConv2d) and module.pointwise)


@torch.no_grad()
def link_input_quantizers(model: nn.Module, batch, device) -> dict[str, str]:
    """``{layer name: activation quantizer name}`` for every quantized Linear (or 1x1 convolution) whose input is the
    output of an active activation quantizer: the latest quantizer output, in execution order, with
    as many elements whose grid the input lies on (a reshape in between does not matter)."""
    names = {m: n for n, m in model.named_modules()}
    recent: list[tuple[ActQuantizer, torch.Tensor]] = []
    links: dict[str, str] = {}

    def after_quantizer(q, args, out):
        if q.active and isinstance(out, torch.Tensor):
            recent.append((q, out))

    def before_linear(layer, args):
        x = args[0]
        for q, out in reversed(recent):
            if out.numel() == x.numel() and torch.equal(q.quantize(x), x):
                links[names[layer]] = names[q]
                return

    hooks = [m.register_forward_hook(after_quantizer) for m in model.modules() if isinstance(m, ActQuantizer)]
    hooks += [m.register_forward_pre_hook(before_linear) for m in model.modules() if _gemm_shaped(m)]
    try:
        run_model(model, batch, device)
    finally:
        for h in hooks:
            h.remove()
    return links


@torch.no_grad()
def use_integer_kernels(model: nn.Module, links: dict[str, str]) -> int:
    """Pack each linked, finished Linear's (or 1x1 convolution's) codes for the int8 GEMM; returns how many were packed."""
    if not available() or not links:
        return 0
    modules = dict(model.named_modules())
    packed = 0
    for name, q_name in links.items():
        layer, q = modules.get(name), modules.get(q_name)
        if not _gemm_shaped(layer) or not isinstance(q, ActQuantizer) or not layer.released:
            continue
        wq = layer.weight_quantizer
        if wq.n_bits > max_weight_bits() or q.n_bits > 8 or wq.codes.device.type != "cpu" or not wq.channel_wise:
            continue
        codes = wq.codes
        with warnings.catch_warnings():  # torch marks its quantized tensors deprecated; available() guards removal
            warnings.simplefilter("ignore", UserWarning)
            weight = torch._make_per_channel_quantized_tensor(
                (codes.reshape(codes.shape[0], -1).to(torch.int16) - 128).to(torch.int8), wq.scale.flatten().double(),
                (wq.zero_point.flatten() - 128).long(), 0)
        bias = layer.bias.detach().float() if layer.bias is not None else None
        weights = torch.ops.quantized.linear_prepack(weight, bias)
        layer.int8_gemm = (weights, float(q.scale), int(q.zero_point))
        wq.hand_codes_to(functools.partial(codes_of, weights, codes.shape))
        packed += 1
    return packed


def codes_of(weights, shape: torch.Size) -> torch.Tensor:
    """The uint8 codes back from a packed int8 weight, in the layer's weight shape (the inverse of the packing above)."""
    return (torch.ops.quantized.linear_unpack(weights)[0].int_repr().to(torch.int16) + 128).to(torch.uint8).reshape(shape)
