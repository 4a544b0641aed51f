"""Outlier migration: the FFN activation's outlier channels scaled down into the Linear layer that
reads them, before any range is set (the scaling of Outlier Suppression+, Wei et al. 2023).

In BERT-family models a few hidden channels of the FFN activation (the GELU output, the input of
``output.dense``) carry values 10-100x the rest; one per-tensor 4-bit grid wide enough for them
leaves the other channels a level or two. Since ``x Wᵀ = (x / s)(W diag(s))ᵀ``, the activation
quantizer can see ``x / s`` (an explicit elementwise scale, kept in the quantizer as
``channel_scale``: no linear layer sits between the GELU and the quantizer to fold it into) while
the consumer's weight columns take ``s``. Larger ``s`` narrows the activation's range but widens the
weight rows' ranges; so ``s_j = max(1, m_j / t)``, ``m_j`` channel ``j``'s largest magnitude on the
calibration data, with the threshold ``t`` searched for the lowest error of the consumer's output
when its input (per tensor) and its weight (per channel) are both round-to-nearest quantized at
their bit widths. ``t = max m`` (no scaling) is a candidate: on the calibration error, the search
never ends worse than no migration. The float model's function is unchanged.

Which activation is the FFN one is data of the model family (``Family.ffn_act``).
"""
from __future__ import annotations

import logging
import re

import torch
from torch import nn

from . import distributed
from .batches import run_model, token_mask
from .families import Family
from .nn import QuantLinear
from .observers import fake_quantize, search_range
from .plan import ffn_act_quantizers, set_quant_state
from .quantizers import ActQuantizer

logger = logging.getLogger("qdrop_hf")

MAX_TOKENS = 8192  # calibration tokens the search runs on, per layer
THRESHOLDS = [0.5 ** (k / 4) for k in range(25)]  # t / max m: 1 down to 1/64, four steps an octave


def ffn_activations(model: nn.Module, family: Family) -> list[tuple[str, ActQuantizer, QuantLinear]]:
    """``(name, quantizer, consumer)`` of every FFN activation the family declares."""
    modules = dict(model.named_modules())
    found = []
    for name, q in ffn_act_quantizers(model, family):
        layer = modules.get(re.sub(*family.ffn_act, name))
        if isinstance(layer, QuantLinear):
            found.append((name, q, layer))
    return found


def wanted(config, family: Family) -> bool:
    """``config.outlier_migration``, or by default: on for a family with an FFN activation when
    activations are quantized to at most 6 bits."""
    if config.outlier_migration is not None:
        return config.outlier_migration
    return family.ffn_act is not None and config.act_quant and config.n_bits_a <= 6


@torch.no_grad()
def migrate_ffn_outliers(model: nn.Module, family: Family, batches: list, device, seed: int = 0) -> dict[str, float]:
    """Scale each FFN activation's outlier channels into its consumer (module docstring); returns
    ``{name: largest scale}`` for the layers where the search chose a scaling."""
    pairs = ffn_activations(model, family)
    if not pairs:
        return {}
    inputs = _consumer_inputs(model, [layer for _, _, layer in pairs], batches, device)
    generator = torch.Generator().manual_seed(seed)
    chosen = {}
    for (name, q, layer), x in zip(pairs, inputs):
        scale = search_scale(x, layer.weight.float(), q.n_bits, layer.weight_quantizer.n_bits, q.range_p, generator)
        distributed.broadcast_from_main([scale])
        if bool((scale > 1).any()):
            q.migrate(scale)
            layer.weight.mul_(scale.to(layer.weight)[None, :])
            chosen[name] = float(scale.max())
    logger.info("outlier migration: %d of %d FFN activations scaled (largest scale %.1f)", len(chosen), len(pairs),
                max(chosen.values(), default=1.0))
    return chosen


def _consumer_inputs(model: nn.Module, layers: list[QuantLinear], batches: list, device) -> list[torch.Tensor]:
    """Each layer's float input on the calibration batches, ``[tokens, channels]``, padding left out,
    at most ``MAX_TOKENS`` tokens."""
    set_quant_state(model, weights=False, acts=False)
    rows: dict[int, list[torch.Tensor]] = {id(layer): [] for layer in layers}
    mask = None

    def grab(layer, args):
        x = args[0].detach()
        keep = mask.reshape(-1).bool().to(x.device) if mask is not None and mask.numel() * x.shape[-1] == x.numel() else None
        x = x.reshape(-1, x.shape[-1])
        rows[id(layer)].append((x[keep] if keep is not None else x).float().cpu())

    hooks = [layer.register_forward_pre_hook(grab) for layer in layers]
    try:
        for batch in batches:
            if sum(t.shape[0] for t in rows[id(layers[0])]) >= MAX_TOKENS:
                break
            mask = token_mask(batch)
            run_model(model, batch, device)
    finally:
        for h in hooks:
            h.remove()
    return [torch.cat(rows[id(layer)])[:MAX_TOKENS] for layer in layers]


def search_scale(x: torch.Tensor, weight: torch.Tensor, n_bits_a: int, n_bits_w: int, p: float,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-channel ``s >= 1`` for the input ``x`` ([tokens, C]) of a Linear layer of ``weight``
    ([out, C]): the threshold of ``THRESHOLDS`` with the lowest mean squared output error, input range
    by the L_p search (a sample of 64K values), weight ranges per output channel by the L_2.4 one."""
    x, weight = x.float(), weight.detach().float().cpu()
    reference = x @ weight.T
    peak = x.abs().amax(0).clamp(min=1e-8)
    sample = torch.randint(0, x.numel(), (min(x.numel(), 1 << 16),), generator=generator)
    best, best_err = torch.ones_like(peak), float("inf")
    for ratio in THRESHOLDS:
        scale = (peak / (peak.max() * ratio)).clamp(min=1.0)
        xs, ws = x / scale, weight * scale
        a_scale, a_zp = search_range(xs.reshape(-1)[sample][None, :], n_bits_a, "mse", p=p)
        w_scale, w_zp = search_range(ws, n_bits_w, "mse", p=2.4)
        out = fake_quantize(xs, a_scale, a_zp, n_bits_a) @ fake_quantize(ws, w_scale[:, None], w_zp[:, None], n_bits_w).T
        err = float((out - reference).pow_(2).mean())
        if err < best_err:
            best, best_err = scale, err
    return best
