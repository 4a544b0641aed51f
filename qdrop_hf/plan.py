"""Turn a float model into a fake-quantized one and list its reconstruction units in forward order.

``prepare_model`` swaps layers for their quantized twins, hangs activation quantizers where the model's
family says, and returns a ``QuantPlan``: the units (blocks, plus stem/head and stray layers as
single units) in the order the forward pass runs them. Everything downstream works on the plan.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import nn

from .batches import run_model
from .config import QDropConfig
from .families import Family, find_family, matches
from .nn import AttentionQuantizers, QuantLayer, RescaledLayerNorm, register_attention, replace_layers
from .quantizers import ActQuantizer, WeightQuantizer


@dataclass
class Unit:
    """One reconstruction unit: a block, or a single layer outside every block."""

    name: str
    module: nn.Module
    kind: str  # "stem", "body" or "head"
    layers: list[nn.Module] = field(default_factory=list)
    act_quantizers: list[ActQuantizer] = field(default_factory=list)
    # called once, on exactly the previous unit's output and the same other arguments: its caches
    # follow from the previous unit's cache by running that unit alone (``reconstruct.follow``)
    follows_previous: bool = False


@dataclass
class QuantPlan:
    family: Family
    units: list[Unit]
    free_act_quantizers: list[ActQuantizer]  # activation quantizers outside every unit

    @property
    def layers(self) -> list[nn.Module]:
        return [layer for unit in self.units for layer in unit.layers]


def _quantize_output(module, args, output):
    if isinstance(output, tuple):
        return (module.qdrop_out(output[0]),) + output[1:]
    return module.qdrop_out(output)


def _quantize_input(module, args):
    return (module.qdrop_in(args[0]),) + tuple(args[1:])


def _device(module: nn.Module, default: torch.device) -> torch.device:
    """Where a module's tensors live (its first parameter or buffer, its children's included), or
    ``default`` for one that holds none (an activation function)."""
    tensor = next(module.parameters(), None)
    if tensor is None:
        tensor = next(module.buffers(), None)
    return default if tensor is None else tensor.device


def install_quantizers(model: nn.Module, family: Family, config: QDropConfig) -> None:
    """Quantized layers and activation quantizers, with no data needed (also used when reloading)."""
    if family.prepare is not None:
        family.prepare(model)
    keep = [re.compile(p) for p in config.keep_fp_modules]
    replace_layers(model, config.n_bits_w, config.channel_wise, skip=lambda n: any(p.search(n) for p in keep))
    has_attention = False
    model_device = _device(model, torch.device("cpu"))
    for name, module in list(model.named_modules()):
        if matches(family.act_outputs, name, module):
            module.qdrop_out = ActQuantizer(config.n_bits_a).to(_device(module, model_device))
            module.register_forward_hook(_quantize_output)
        if matches(family.act_inputs, name, module):
            module.qdrop_in = ActQuantizer(config.n_bits_a).to(_device(module, model_device))
            module.register_forward_pre_hook(_quantize_input)
        if matches(family.attention, name, module):
            module.qdrop_attn = AttentionQuantizers(config.n_bits_a).to(_device(module, model_device))
            has_attention = True
    if has_attention:
        register_attention()
        model.set_attn_implementation("qdrop")
    if family.layernorm_sites is not None:  # where outlier migration may scale a residual back
        modules = dict(model.named_modules())
        for site in family.layernorm_sites(model):
            if site.residual is not None and isinstance(modules.get(site.residual[1]), nn.LayerNorm):
                RescaledLayerNorm.make(modules[site.residual[1]])


def _find_units(model: nn.Module, family: Family) -> list[Unit]:
    units, taken = [], []
    for name, module in model.named_modules():
        if any(name.startswith(t + ".") for t in taken):
            continue
        for kind, spec in (("body", family.body), ("stem", family.stem), ("head", family.head)):
            if name and matches(spec, name, module):
                units.append(Unit(name, module, kind))
                taken.append(name)
                break
    for name, module in model.named_modules():  # quantized layers that no unit covers
        if isinstance(module, QuantLayer) and not any(name == t or name.startswith(t + ".") for t in taken):
            units.append(Unit(name, module, "layer"))
    return units


def first_output(output):
    """A module's main output: the first of a tuple, a model output's ``last_hidden_state``, or itself."""
    return output[0] if isinstance(output, (tuple, list)) else getattr(output, "last_hidden_state", output)


@torch.no_grad()
def _trace(model: nn.Module, units: list[Unit], batch, device) -> list[Unit]:
    """Units sorted by when the forward pass first reaches them (units it never reaches are dropped),
    with ``follows_previous`` set from what each was called with, in one forward pass."""
    calls: dict[int, list] = {}  # in first-call order

    def pre(i):
        def hook(module, args, kwargs):
            calls.setdefault(i, []).append([args, kwargs, None])
        return hook

    def post(i):
        def hook(module, args, kwargs, output):
            calls[i][-1][2] = first_output(output)
        return hook

    handles = []
    for i, unit in enumerate(units):
        handles.append(unit.module.register_forward_pre_hook(pre(i), with_kwargs=True))
        handles.append(unit.module.register_forward_hook(post(i), with_kwargs=True))
    try:
        run_model(model, batch, device)
    finally:
        for h in handles:
            h.remove()
    order = list(calls)
    for prev, i in zip(order, order[1:]):
        units[i].follows_previous = len(calls[i]) == 1 and len(calls[prev]) == 1 and _reads(calls[i][0], calls[prev][0])
    return [units[i] for i in order]


def _reads(call: list, prev_call: list) -> bool:
    """Whether ``call``'s first argument is ``prev_call``'s output and its other arguments are the same."""
    (args, kwargs, _), (prev_args, prev_kwargs, prev_out) = call, prev_call
    return (bool(args) and args[0] is prev_out and len(args) == len(prev_args)
            and all(_same(a, b) for a, b in zip(args[1:], prev_args[1:]))
            and kwargs.keys() == prev_kwargs.keys() and all(_same(kwargs[k], prev_kwargs[k]) for k in kwargs))


def _same(a, b) -> bool:
    return a is b or (type(a) is type(b) and isinstance(a, (int, float, bool, str, type(None))) and a == b)


def prepare_model(model: nn.Module, config: QDropConfig, example_batch, device, family: Family | None = None) -> QuantPlan:
    family = family or find_family(model)
    install_quantizers(model, family, config)
    for m in model.modules():
        if isinstance(m, ActQuantizer):
            m.range_p = family.act_range_p
    units = _trace(model, _find_units(model, family), example_batch, device)
    body = [i for i, u in enumerate(units) if u.kind == "body"]
    if not body:
        raise ValueError(f"model family {family.name!r} found no reconstruction blocks in this model")
    for i, unit in enumerate(units):
        if unit.kind == "layer":
            unit.kind = "stem" if i < body[0] else "head" if i > body[-1] else "body"
        unit.layers = [m for m in unit.module.modules() if isinstance(m, QuantLayer)]
        unit.act_quantizers = [m for m in unit.module.modules() if isinstance(m, ActQuantizer)]
    in_units = {id(q) for u in units for q in u.act_quantizers}
    free = [m for m in model.modules() if isinstance(m, ActQuantizer) and id(m) not in in_units]
    plan = QuantPlan(family, units, free)
    if not config.disable_8bit_head_stem:
        _eight_bit_stem_and_head(plan)
    for q in role_quantizers(model, family, config.keep_8bit):
        q.set_bits(8)
    return plan


def ffn_act_quantizers(model: nn.Module, family: Family) -> list[tuple[str, ActQuantizer]]:
    """``(module name, quantizer)`` of every FFN activation (``Family.ffn_act``): the matching
    module's input quantizer, or its output quantizer."""
    if family.ffn_act is None:
        return []
    found = []
    for name, module in model.named_modules():
        if re.search(family.ffn_act[0], name):
            q = getattr(module, "qdrop_in", None) or getattr(module, "qdrop_out", None)
            if isinstance(q, ActQuantizer):
                found.append((name, q))
    return found


def role_quantizers(model: nn.Module, family: Family, roles) -> list[ActQuantizer]:
    """The activation quantizers of the named roles (``QDropConfig.keep_8bit``): ``ffn_act``, the FFN
    activation (``Family.ffn_act``); ``attention``, the Q, K, V, probabilities and context."""
    found = [q for _, q in ffn_act_quantizers(model, family)] if "ffn_act" in roles else []
    if "attention" in roles:
        found += [q for m in model.modules() if isinstance(m, AttentionQuantizers) for q in m.children()]
    return found


def _eight_bit_stem_and_head(plan: QuantPlan) -> None:
    """Stem and head layers, the activations around them and the input of the head run at 8 bits."""
    for unit in plan.units:
        if unit.kind != "body":
            for m in unit.module.modules():
                if isinstance(m, (WeightQuantizer, ActQuantizer)):
                    m.set_bits(8)
    for q in plan.free_act_quantizers:
        q.set_bits(8)
    last_body = [u for u in plan.units if u.kind == "body"][-1]
    if isinstance(getattr(last_body.module, "qdrop_out", None), ActQuantizer):
        last_body.module.qdrop_out.set_bits(8)


def set_quant_state(model: nn.Module, weights: bool, acts: bool) -> None:
    for m in model.modules():
        if isinstance(m, WeightQuantizer):
            m.enabled = weights
        elif isinstance(m, ActQuantizer):
            m.enabled = acts
