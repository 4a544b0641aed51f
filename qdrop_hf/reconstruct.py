"""The one block-reconstruction loop (BRECQ/QDrop), with its input caches and activation calibration.

For each unit in forward order: cache its inputs from the float model and from the partly quantized
model, and its float outputs, once; then fit AdaRound variables (and LSQ steps when ``order`` is
"together") to the float outputs while QDrop randomly drops activation quantization. Only the current
unit's cache is alive at any time. Nothing here knows a model family.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from . import distributed
from .allocator import freed_memory_kept
from .batches import run_model, token_mask
from .cache import BlockCache, micro_batches
from .config import QDropConfig
from .optim import Adam, cosine_lr
from .plan import Unit, first_output, set_quant_state
from .quantizers import ActQuantizer, DropMasks

ACT_CALIB_SAMPLES = 256  # samples used to initialise a block's activation ranges


class _Stop(Exception):
    """Raised from a hook to end a forward pass once the unit of interest has been seen."""


def _detach(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.detach().to(device)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_detach(v, device) for v in obj)
    if isinstance(obj, dict):
        return {k: _detach(v, device) for k, v in obj.items()}
    return obj


def _forward_to_stop(model: nn.Module, batch, device) -> None:
    """One forward pass that a hook may end early by raising ``_Stop``."""
    try:
        run_model(model, batch, device)
    except _Stop:
        pass


class _LastQuantized:
    """The last call of an activation quantizer under ``root`` (those under ``exclude`` left out),
    so that a tensor that is its output can be traced back to the unquantized value it came from:
    how a unit's cache learns which quantizer feeds it (``QDropConfig.input_drop="unquantized"``)."""

    def __init__(self, root: nn.Module, exclude: nn.Module | None = None):
        own = {id(m) for m in exclude.modules()} if exclude is not None else set()
        self.last = None
        self.handles = [q.register_forward_hook(self._seen) for q in root.modules()
                        if isinstance(q, ActQuantizer) and id(q) not in own]

    def _seen(self, quantizer, args, output):
        self.last = (quantizer, args[0], output) if quantizer.active else None

    def unquantized(self, x: torch.Tensor) -> tuple[torch.Tensor, ActQuantizer | None]:
        """(the value before the quantizer that made ``x``, that quantizer), or (``x``, None)."""
        if self.last is not None and self.last[2] is x:
            return self.last[1], self.last[0]
        return x, None

    def close(self) -> None:
        for h in self.handles:
            h.remove()


@torch.no_grad()
def capture(model: nn.Module, module: nn.Module, batches: list, device, with_output: bool,
            trace_input: bool = False) -> Iterator[dict]:
    """Run ``model`` on each batch up to ``module``; yield its args/kwargs (and output, and the
    batch's token mask), one batch at a time, so that a cache can store each before the next. With
    ``trace_input``, a first arg that an activation quantizer made is recorded unquantized, with the
    quantizer as ``record["input_quantizer"]``."""
    record: dict = {}
    last = _LastQuantized(model, exclude=module) if trace_input else None

    def pre(m, args, kwargs):
        if last is not None and args and isinstance(args[0], torch.Tensor):
            first, record["input_quantizer"] = last.unquantized(args[0])
            args = (first,) + tuple(args[1:])
        record["args"], record["kwargs"] = _detach(args, device), _detach(kwargs, device)
        if not with_output:
            raise _Stop

    def post(m, args, kwargs, output):
        record["output"] = _detach(first_output(output), device)
        raise _Stop

    handles = [module.register_forward_pre_hook(pre, with_kwargs=True)]
    if with_output:
        handles.append(module.register_forward_hook(post, with_kwargs=True))
    try:
        for batch in batches:
            record = {}
            _forward_to_stop(model, batch, device)
            if "args" not in record:
                raise RuntimeError(f"the forward pass never reached {type(module).__name__}")
            record["mask"] = _detach(token_mask(batch), device)
            yield record
    finally:
        for h in handles:
            h.remove()
        if last is not None:
            last.close()


@torch.no_grad()
def run_until(model: nn.Module, module: nn.Module, batches: list, device) -> None:
    """Forward each batch only as far as the end of ``module``."""
    def stop(*_):
        raise _Stop

    handle = module.register_forward_hook(stop)
    try:
        for batch in batches:
            _forward_to_stop(model, batch, device)
    finally:
        handle.remove()


@torch.no_grad()
def follow(prev: Unit, prev_cache: BlockCache, unit: Unit, quant_state: tuple[bool, bool] | None,
           trace_input: bool = False) -> Iterator[tuple[dict, tuple | None, ActQuantizer | None]]:
    """What ``capture`` would give for ``unit``, which ``follows_previous`` (reads ``prev``'s output):
    for each cached batch, the float record and the quantized-model args, one batch at a time.

    Float inputs are ``prev``'s cached float outputs, kept in their stored form (a half-precision or
    on-disk copy is not made again); quantized-model inputs are ``prev`` run alone (in
    ``quant_state``, the (weights, acts) a quantized capture uses) on its own quantized inputs; float
    outputs are ``unit`` run in float on its float inputs; ``prev_cache.chunk`` rows at a time.
    With ``trace_input``, where ``prev``'s output comes out of an activation quantizer, the quantized
    inputs are the values before it, and that quantizer is yielded third (as ``capture`` does).
    Empties ``prev_cache``, dropping each of its batches once it has been followed.
    """
    items, prev_cache.items = prev_cache.items, []
    if quant_state is not None:
        set_quant_state(prev.module, *quant_state)
    set_quant_state(unit.module, weights=False, acts=False)
    last = _LastQuantized(prev.module) if trace_input and quant_state is not None else None
    try:
        for i, item in enumerate(items):
            items[i] = None
            quant_out, outputs, quantizer = [], [], None
            for part in prev_cache.parts(item):
                fp_args, _, kwargs, target, _ = part
                if quant_state is not None:
                    q_args, q_kwargs = prev_cache.inputs(part)
                    out = first_output(prev.module(*q_args, **q_kwargs))
                    if last is not None:
                        out, quantizer = last.unquantized(out)
                    quant_out.append(out.detach())
                outputs.append(first_output(unit.module(target, *fp_args[1:], **kwargs)).detach())
            fp_args, _, kwargs, target, mask = item
            del item
            quant = None if quant_state is None else (_cat(quant_out),) + tuple(fp_args[1:])
            record = {"args": (target,) + tuple(fp_args[1:]), "kwargs": kwargs, "output": _cat(outputs), "mask": mask}
            yield record, quant, quantizer
    finally:
        if last is not None:
            last.close()


def _cat(parts: list[torch.Tensor]) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def reconstruction_loss(output, target: torch.Tensor, mask: torch.Tensor | None,
                        positions: torch.Tensor | int | None = None) -> torch.Tensor:
    """Squared error summed over channels/features, averaged over samples and positions (padding excluded).

    ``positions`` overrides the count averaged over: a micro-batch divides by its whole batch's count,
    so that the micro-batch losses add up to the batch loss.
    """
    err = (first_output(output) - target).pow(2)
    err = err.sum(1) if err.dim() == 4 else err.sum(-1) if err.dim() >= 2 else err
    if mask is not None and err.shape == mask.shape:
        err = err * mask.to(err.dtype)
    return err.sum() / (loss_positions(target, mask) if positions is None else positions)


def loss_positions(target: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor | int:
    """How many positions ``reconstruction_loss`` averages over: samples x positions, or the unmasked tokens."""
    shape = target.shape[:1] + target.shape[2:] if target.dim() == 4 else target.shape[:-1] if target.dim() >= 2 else target.shape
    if mask is not None and mask.shape == shape:
        return mask.sum().clamp(min=1)
    return shape.numel()


@torch.no_grad()
def unit_error(unit: Unit, cache: BlockCache) -> float:
    """Mean reconstruction loss of the unit, in its current quantization state, on its quantized inputs."""
    total, count = 0.0, 0
    for item in cache.chunks():
        args, kwargs = cache.inputs(item)
        total += float(reconstruction_loss(unit.module(*args, **kwargs), item[3], item[4])) * item[3].shape[0]
        count += item[3].shape[0]
    total, count = distributed.sum_over_processes(total, count)
    return total / max(count, 1)


@torch.no_grad()
def observe_input_means(unit: Unit, cache: BlockCache) -> None:
    """Set ``input_mean`` of the unit's biased layers (bias correction, ``nn.BiasCorrection``): the
    per-feature mean of each layer's input in the float unit, over the cached float inputs, padding
    tokens left out."""
    layers = [layer for layer in unit.layers if layer.bias is not None]
    if not layers:
        return
    sums: dict[int, list] = {}
    mask = None

    def record(layer, args):
        x = args[0].detach()
        if x.dim() == 4:  # convolution input [N, C, H, W]
            rows = x.movedim(1, -1).reshape(-1, x.shape[1])
        elif mask is not None and x.dim() == 3 and x.shape[:2] == mask.shape:
            rows = x[mask.bool()]
        else:
            rows = x.reshape(-1, x.shape[-1])
        total = sums.setdefault(id(layer), [0.0, 0])
        total[0] = total[0] + rows.float().sum(0)
        total[1] += rows.shape[0]

    hooks = [layer.register_forward_pre_hook(record) for layer in layers]
    set_quant_state(unit.module, weights=False, acts=False)
    try:
        for fp_args, _, kwargs, _, mask in cache.chunks():
            unit.module(*fp_args, **kwargs)
    finally:
        for h in hooks:
            h.remove()
    for layer in layers:
        if id(layer) not in sums:  # not called by this unit's forward
            continue
        total, count = sums[id(layer)]
        count = distributed.sum_over_processes(count)[0]
        layer.input_mean = distributed.sum_tensor(total) / count


@torch.no_grad()
def observe(quantizers: list[ActQuantizer], feed, mode: str, generator=None) -> None:
    """Initialise activation ranges: observers record while ``feed()`` runs forward passes, then search."""
    for q in quantizers:
        q.observe(generator, tokens=mode == "tokenwise")
    try:
        feed()
    finally:
        seen = [q for q in quantizers if q.observer is not None and q.observer.lo is not None]
        for q in seen:
            q.finish_observing(mode)
        distributed.broadcast_from_main([t for q in seen for t in (q.scale, q.zero_point)])
        for q in quantizers:
            q.observer = None


def calibrate_unit_acts(unit: Unit, cache: BlockCache, mode: str) -> None:
    """Activation ranges of one unit, from its cached quantized-model inputs (the first cached batches
    that hold 256 samples; all samples of a merged image cache, run a batch at a time).

    One quantizer at a time, in the order the forward pass reaches them, each enabled once set: a
    quantizer sees the activations it will get, with every quantizer before it in the unit already
    quantizing, as the reference implementation's calibrate-then-quantize pass has it. (On ResNet-20
    W2A2 this measured the same as setting all ranges on float activations: 43.50 vs 43.52.)
    """
    def run(item):
        args, kwargs = cache.inputs(item)
        unit.module(*args, **kwargs)

    def feed():
        for item in cache.chunks(limit=ACT_CALIB_SAMPLES):
            run(item)

    first = next(cache.chunks(limit=1))  # one sample of it is enough to see the call order
    one_sample = micro_batches(first, 1)[0]
    for q in _call_order(unit.act_quantizers, lambda: run(one_sample)):
        observe([q], feed, mode)
        q.enabled = True


@torch.no_grad()
def _call_order(quantizers: list[ActQuantizer], run) -> list[ActQuantizer]:
    """``quantizers`` in the order ``run()`` first calls them (never-called ones left out)."""
    order: dict[int, ActQuantizer] = {}

    def seen(module, _inputs):
        order.setdefault(id(module), module)

    handles = [q.register_forward_pre_hook(seen) for q in quantizers]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return list(order.values())


@dataclass
class RoundingSchedule:
    """AdaRound regulariser: off during warm-up, then beta anneals linearly from b_start to b_end."""

    iters: int
    warmup: float
    b_start: float
    b_end: float

    def beta(self, step: int) -> float | None:
        start = self.warmup * self.iters
        if step < start:
            return None
        rel = (step - start) / max(self.iters - start, 1)
        return self.b_end + (self.b_start - self.b_end) * max(0.0, 1.0 - rel)


def reconstruct_unit(unit: Unit, cache: BlockCache, config: QDropConfig, learn_act: bool, seed: int,
                     progress: bool = True, micro_batch_size: int | None = None) -> dict:
    """Fit the unit's rounding (and, if ``learn_act``, its activation steps) to its float outputs;
    ``micro_batch_size`` runs each batch in chunks with accumulated gradients (the same update)."""
    device = cache.device
    seed += 7919 * distributed.rank()  # each process samples its own batches and masks
    per_process_batch = max(1, config.batch_size // distributed.world_size())  # batch_size stays the global batch
    index_gen = torch.Generator().manual_seed(seed)
    drop_gen = torch.Generator(device=device).manual_seed(seed + 1)
    act_masks = DropMasks(config.prob, drop_gen) if config.prob < 1.0 else None
    input_masks = DropMasks(config.input_prob, drop_gen) if config.input_prob < 1.0 else None
    alphas = [layer.weight_quantizer.start_adaround(layer.weight) for layer in unit.layers]
    steps = [q.scale for q in unit.act_quantizers if learn_act and q.enabled and bool(q.initialized)]
    for q in unit.act_quantizers:
        q.drop_masks = act_masks
    for s in steps:
        s.requires_grad_(True)
    w_opt = Adam(alphas, config.rounding_lr) if alphas else None
    a_opt = Adam(steps, config.lr) if steps else None
    schedule = RoundingSchedule(config.iters_w, config.warmup, config.b_start, config.b_end)
    bar = tqdm(range(config.iters_w), desc=f"reconstruct {unit.name}", disable=not progress, leave=False)
    rec = torch.zeros(())
    try:
        with freed_memory_kept():
            for step in bar:
                item = cache.sample(per_process_batch, index_gen)
                positions = loss_positions(item[3], item[4])
                beta = schedule.beta(step)
                for opt in (w_opt, a_opt):
                    if opt is not None:
                        opt.zero_grad()
                parts = micro_batches(item, micro_batch_size)
                rec = torch.zeros(())
                for j, part in enumerate(parts):  # gradients accumulate; the last part adds the rounding loss
                    args, kwargs = cache.inputs(part, input_masks)
                    loss = reconstruction_loss(unit.module(*args, **kwargs), part[3], part[4], positions)
                    rec = rec + loss.detach()
                    if j == len(parts) - 1 and beta is not None and alphas:
                        loss = loss + config.weight * sum(layer.weight_quantizer.rounding_loss(beta) for layer in unit.layers)
                    loss.backward()
                distributed.average_gradients(alphas + steps)
                if step % 100 == 0 and not math.isfinite(float(rec.detach())):
                    raise FloatingPointError(f"reconstruction loss of {unit.name} became non-finite at step {step}")
                if w_opt is not None:
                    w_opt.step()
                if a_opt is not None:  # activation steps: cosine-annealed to 0 over the unit's iterations
                    a_opt.step(cosine_lr(config.lr, step, config.iters_w))
                if step % 50 == 0:
                    bar.set_postfix(rec=f"{float(rec.detach()):.4g}", beta="-" if beta is None else f"{beta:.1f}")
    finally:
        for q in unit.act_quantizers:
            q.drop_masks = None
        for s in steps:
            s.requires_grad_(False)
    for layer in unit.layers:
        layer.weight_quantizer.harden(layer.weight)
    return {"final_batch_loss": float(rec.detach())}
