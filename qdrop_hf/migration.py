"""Outlier migration: a transformer's outlier channels moved out of its quantized activations, into
the Linear layers that read them, before any range is set (Outlier Suppression+, Wei et al. 2023).

In BERT-family models a few hidden channels carry values 10-100x the rest, in the FFN activation
(the GELU output) and in the LayerNorm outputs; one per-tensor 4-bit grid wide enough for them
leaves the other channels a level or two. Since ``x Wᵀ + b = ((x - z) / s)(W diag(s))ᵀ + (b + W z)``,
the activation can be quantized as ``(x - z) / s`` while the consumer's weight columns take ``s``
and its bias ``W z``, the float function unchanged:

- FFN activation (``Family.ffn_act``): scale only, kept in the quantizer as ``channel_scale`` (no
  layer sits between the GELU and the quantizer to fold it into).
- LayerNorm outputs (``Family.layernorm_sites``): shift ``z`` (each channel's centre) and scale,
  folded into the LayerNorm's weight and bias. Where a post-LN residual adds the same tensor back
  before the next LayerNorm, the branch it is added to is divided alike (its Linear's rows) and that
  LayerNorm multiplies the sum back (``nn.RescaledLayerNorm``).

Larger ``s`` narrows the activation's range but widens the weight rows' ranges; so
``s_j = max(1, m_j / t)``, ``m_j`` channel ``j``'s largest magnitude (after the shift) on the
calibration data, with the threshold ``t`` searched for the lowest error of the consumers' output
when their input (per tensor) and weights (per channel) are both round-to-nearest quantized at their
bit widths. No migration at all is a candidate: on the calibration error, the search never ends
worse than none.
"""
from __future__ import annotations

import logging
import re

import torch
from torch import nn

from . import distributed
from .batches import run_model, token_mask
from .families import Family, LayerNormSite
from .nn import QuantLinear, RescaledLayerNorm
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


def layernorm_sites(model: nn.Module, family: Family) -> list[tuple[LayerNormSite, ActQuantizer]]:
    """The family's LayerNorm sites that this model has as declared (an affine LayerNorm, Linear
    consumers and residual branch with biases, the residual's LayerNorm rescalable), with their
    quantizer."""
    if family.layernorm_sites is None:
        return []
    modules = dict(model.named_modules())
    found = []
    for site in family.layernorm_sites(model):
        holder, ln = modules.get(site.quantizer), modules.get(site.layernorm)
        q = getattr(holder, "qdrop_out", None) or getattr(holder, "qdrop_in", None)
        linears = [modules.get(n) for n in site.consumers + (site.residual[:1] if site.residual else ())]
        if (isinstance(q, ActQuantizer) and isinstance(ln, nn.LayerNorm) and ln.weight is not None
                and ln.bias is not None and all(isinstance(m, QuantLinear) and m.bias is not None for m in linears)
                and (site.residual is None or isinstance(modules.get(site.residual[1]), RescaledLayerNorm))):
            found.append((site, q))
    return found


def wanted(config, family: Family) -> bool:
    """``config.outlier_migration``, or by default: on for a family with somewhere to migrate when
    activations are quantized to at most 6 bits."""
    if config.outlier_migration is not None:
        return config.outlier_migration
    has_sites = family.ffn_act is not None or family.layernorm_sites is not None
    return has_sites and config.act_quant and config.n_bits_a <= 6


def migrate(model: nn.Module, family: Family, batches: list, device, parts, seed: int = 0) -> dict[str, dict]:
    """The migration of the named ``parts`` (``"layernorm"``, ``"ffn_act"``); returns, per part, the
    largest scale chosen at each place where the search chose to migrate."""
    report = {}
    if "layernorm" in parts:
        report["layernorm"] = migrate_layernorm_outputs(model, family, batches, device, seed)
    if "ffn_act" in parts:
        report["ffn_act"] = migrate_ffn_outliers(model, family, batches, device, seed)
    return report


@torch.no_grad()
def migrate_layernorm_outputs(model: nn.Module, family: Family, batches: list, device, seed: int = 0) -> dict[str, float]:
    """Shift and scale each LayerNorm output of the family's sites into its consumers (module
    docstring); returns ``{LayerNorm: largest scale}`` where the search chose to migrate."""
    sites = layernorm_sites(model, family)
    if not sites:
        return {}
    modules = dict(model.named_modules())
    inputs = _consumer_inputs(model, [modules[site.consumers[0]] for site, _ in sites], batches, device)
    generator = torch.Generator().manual_seed(seed)
    chosen = {}
    for (site, q), x in zip(sites, inputs):
        consumers = [modules[n] for n in site.consumers]
        weight = torch.cat([layer.weight.float() for layer in consumers])
        n_bits_w = min(layer.weight_quantizer.n_bits for layer in consumers)
        shift, scale = search_migration(x, weight, q.n_bits, n_bits_w, q.range_p, generator, shift=True)
        distributed.broadcast_from_main([shift, scale])
        if bool((scale > 1).any() or shift.any()):
            _fold(modules, site, shift, scale)
            chosen[site.layernorm] = float(scale.max())
    logger.info("outlier migration: %d of %d LayerNorm outputs shifted and scaled (largest scale %.1f)", len(chosen),
                len(sites), max(chosen.values(), default=1.0))
    return chosen


def _fold(modules: dict, site: LayerNormSite, shift: torch.Tensor, scale: torch.Tensor) -> None:
    """The site's LayerNorm outputs ``(h - shift) / scale``; consumers and residual made to match."""
    ln = modules[site.layernorm]
    z, s = shift.to(ln.weight), scale.to(ln.weight)
    ln.weight.div_(s)
    ln.bias.sub_(z).div_(s)
    for name in site.consumers:
        layer = modules[name]
        layer.bias.add_(layer.weight @ z.to(layer.weight))
        layer.weight.mul_(s.to(layer.weight)[None, :])
    if site.residual is not None:
        end, ln2 = modules[site.residual[0]], modules[site.residual[1]]
        end.weight.div_(s.to(end.weight)[:, None])
        end.bias.add_(z.to(end.bias)).div_(s.to(end.bias))
        ln2.input_scale = s.detach().clone()


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
        _, scale = search_migration(x, layer.weight.float(), q.n_bits, layer.weight_quantizer.n_bits, q.range_p,
                                    generator)
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


def search_migration(x: torch.Tensor, weight: torch.Tensor, n_bits_a: int, n_bits_w: int, p: float,
                     generator: torch.Generator | None = None, shift: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(z, s)``, per channel, for the input ``x`` ([tokens, C]) of Linear layers of ``weight``
    ([out, C], consumers stacked): ``x`` becomes ``(x - z) / s``. ``z``: each channel's centre when
    ``shift``, else 0. ``s >= 1`` from the threshold of ``THRESHOLDS`` with the lowest mean squared
    output error, input range by the L_p search (a sample of 64K values), weight ranges per output
    channel by the L_2.4 one; no migration (z = 0, s = 1) is the first candidate."""
    x, weight = x.float(), weight.detach().float().cpu()
    none = torch.zeros(x.shape[1]), torch.ones(x.shape[1])
    centre = (x.amax(0) + x.amin(0)) / 2 if shift else none[0]
    sample = torch.randint(0, x.numel(), (min(x.numel(), 1 << 16),), generator=generator)
    peak = (x - centre).abs().amax(0).clamp(min=1e-8)
    candidates = [none] + [(centre, (peak / (peak.max() * ratio)).clamp(min=1.0))
                           for ratio in THRESHOLDS if shift or ratio < 1]  # unshifted, ratio 1 is none
    best, best_err, reference = none, float("inf"), {}
    for z, s in candidates:
        xs, ws = (x - z) / s, weight * s
        key = id(z)
        if key not in reference:  # the float output less the bias's share: (x - z) Wᵀ
            reference[key] = (x - z) @ weight.T
        a_scale, a_zp = search_range(xs.reshape(-1)[sample][None, :], n_bits_a, "mse", p=p)
        w_scale, w_zp = search_range(ws, n_bits_w, "mse", p=2.4)
        out = fake_quantize(xs, a_scale, a_zp, n_bits_a) @ fake_quantize(ws, w_scale[:, None], w_zp[:, None], n_bits_w).T
        err = float((out - reference[key]).pow_(2).mean())
        if err < best_err:
            best, best_err = (z, s), err
    return best
