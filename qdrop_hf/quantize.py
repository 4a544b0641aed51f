"""One call from a float model and calibration data to a QDrop-quantized model."""
from __future__ import annotations

import logging
import time
from contextlib import closing
from typing import Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from . import distributed
from .batches import batch_len, run_model, take_batches, to_channels_last
from .cache import BlockCache
from .checkpoint import Checkpoint
from .config import QDropConfig
from .families import Family
from .observers import PatchMoments
from .plan import QuantPlan, prepare_model, set_quant_state
from .quantizers import use_kernels
from .reconstruct import (ACT_CALIB_SAMPLES, calibrate_unit_acts, capture, follow, observe, observe_input_means,
                          reconstruct_unit, run_until, unit_error)

logger = logging.getLogger("qdrop_hf")


def resolve_device(config: QDropConfig) -> torch.device:
    if config.device:
        return torch.device(config.device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def quantize_model(model: nn.Module, calibration_data: Iterable, config: QDropConfig | None = None,
                   family: Family | None = None, progress: bool = True, checkpoint: Checkpoint | None = None) -> nn.Module:
    """Quantize ``model`` in place with QDrop and return it.

    ``calibration_data`` is any iterable of model-input batches (a DataLoader of tokenizer output, a
    list of image tensors, ``(images, labels)`` pairs...); its first ``config.num_samples`` samples
    are used and labels are ignored. The returned model runs fake-quantized (weights on their
    integer grid, activations quantized when ``config.act_quant``) and ``model.qdrop_report`` holds
    the per-unit errors and timings. With a ``checkpoint``, the state after each unit is saved there
    and a run that was killed resumes from its last finished unit, ending as an uninterrupted run would.
    """
    config = config or QDropConfig()
    config.validate()
    torch.manual_seed(config.seed)
    device = resolve_device(config)
    use_kernels("compiled" if config.compile else "fused")
    batches = distributed.shard(take_batches(calibration_data, config.num_samples))
    model.eval().requires_grad_(False).to(device)
    if use_channels_last(config, model, device):
        batches = [to_channels_last(b) for b in batches]
    t0 = time.perf_counter()
    plan = prepare_model(model, config, batches[0], device, family)
    for layer in plan.layers:
        layer.weight_quantizer.init_range(layer.weight, config.init_wmode)
    act_batches = _first_samples(batches, ACT_CALIB_SAMPLES)
    correct_bias = plan.family.bias_correction if config.bias_correction is None else config.bias_correction
    if (config.depthwise_range or plan.family.depthwise_range) == "output" and config.channel_wise:
        init_depthwise_ranges(model, plan, act_batches, device, centred=correct_bias)
    report = {"units": [], "time_s": {}}
    if config.act_quant:
        # Activations outside every unit (embedding output, pooled features) are set once on the float model.
        set_quant_state(model, weights=False, acts=False)
        observe(plan.free_act_quantizers, lambda: [run_model(model, b, device) for b in act_batches], config.init_amode)
        if config.order == "before":
            set_quant_state(model, weights=config.awq, acts=False)
            calibrate_model_acts(model, plan, act_batches, device, progressive=config.aaq, mode=config.init_amode)
    report["time_s"]["init"] = time.perf_counter() - t0
    done = 0
    if checkpoint is not None:
        done, report["units"] = checkpoint.load(model)
        if done:
            logger.info("resuming after %d finished units from %s", done, checkpoint.dir)

    quant_state = (config.wwq, config.waq and config.act_quant) if config.wwq or config.waq else None
    # input_drop="unquantized": caches hold the value before the quantizer feeding each unit (when the
    # inputs come from the model with quantized activations and the input is dropped at all)
    trace_input = (config.input_drop == "unquantized" and config.input_prob < 1.0 and quant_state is not None
                   and quant_state[1])
    cache_dtype = getattr(torch, config.cache_dtype) if config.cache_dtype else None
    chunk = batch_len(batches[0])  # rows per forward when a cache is run through a unit
    prev = None  # the last unit and its cache, kept when the next unit reads that unit's output
    units = tqdm(total=len(plan.units), initial=done, desc="QDrop blocks", disable=not progress)
    for i, unit in enumerate(plan.units):
        if i < done:
            continue
        t_unit = time.perf_counter()
        cache = BlockCache(cache_dtype, chunk, config.cache_dir, unit.name)
        if prev is not None:
            with closing(follow(*prev, unit, quant_state, trace_input)) as records:
                for record, quant_args, input_quantizer in records:
                    cache.add(record, quant_args)
                    cache.input_quantizer = input_quantizer
        else:
            set_quant_state(model, weights=False, acts=False)
            # closing(): an error while storing (NaN, a full disk) removes capture's hooks at once
            with closing(capture(model, unit.module, batches, device, with_output=True)) as records:
                for record in records:
                    cache.add(record)
            if quant_state is not None:
                set_quant_state(model, *quant_state)
                with closing(capture(model, unit.module, batches, device, with_output=False,
                                     trace_input=trace_input)) as records:
                    for j, record in enumerate(records):
                        cache.add_quantized(j, record["args"])
                        cache.input_quantizer = record.get("input_quantizer")
        prev = None
        cache.merged()
        cache_s = time.perf_counter() - t_unit
        acts_on = config.act_quant and config.order in ("before", "together")
        if correct_bias:
            observe_input_means(unit, cache)
        set_quant_state(unit.module, weights=True, acts=False)
        if config.act_quant and config.order == "together":
            calibrate_unit_acts(unit, cache, config.init_amode)
        set_quant_state(unit.module, weights=True, acts=acts_on)
        entry = {"unit": unit.name, "kind": unit.kind, "rtn_error": unit_error(unit, cache), "cache_mb": cache.nbytes() / 1e6}
        if config.iters_w > 0 and unit.layers:
            reconstruct_unit(unit, cache, config, learn_act=config.order == "together", seed=config.seed + i,
                             progress=progress)
        else:
            for layer in unit.layers:
                layer.weight_quantizer.harden(layer.weight)
        for layer in unit.layers:
            layer.fold_bias_correction()
        if config.act_quant and config.order == "after" and config.waq:
            calibrate_unit_acts(unit, cache, config.init_amode)
            set_quant_state(unit.module, weights=True, acts=True)
        entry["error"] = unit_error(unit, cache)
        entry["time_s"] = time.perf_counter() - t_unit
        entry["cache_s"] = cache_s
        report["units"].append(entry)
        logger.info("%s (%s): error %.4g (round-to-nearest %.4g) in %.1fs", unit.name, unit.kind,
                    entry["error"], entry["rtn_error"], entry["time_s"])
        if i + 1 < len(plan.units) and plan.units[i + 1].follows_previous:
            prev = (unit, cache)
        del cache
        if checkpoint is not None:
            checkpoint.save(model, i + 1, report["units"])
        units.update()
    units.close()
    if config.act_quant and config.order == "after" and not config.waq:
        set_quant_state(model, weights=config.awq, acts=False)
        calibrate_model_acts(model, plan, act_batches, device, progressive=config.aaq, mode=config.init_amode)
    set_quant_state(model, weights=True, acts=config.act_quant)
    report["time_s"]["total"] = time.perf_counter() - t0
    model.qdrop_config = config
    model.qdrop_plan = plan
    model.qdrop_report = report
    return model


def use_channels_last(config: QDropConfig, model: nn.Module, device: torch.device) -> bool:
    """``config.channels_last``, or by default: the model has 2-D convolutions and runs on the CPU
    through the C++ kernels (``compile``'s kernels run 2-4x slower on channels-last activations)."""
    if config.channels_last is not None:
        return config.channels_last
    return device.type == "cpu" and not config.compile and any(isinstance(m, nn.Conv2d) for m in model.modules())


@torch.no_grad()
def init_depthwise_ranges(model: nn.Module, plan: QuantPlan, batches: list, device, centred: bool) -> None:
    """Depthwise kernels' ranges from their output error (``depthwise_range="output"``), on the float
    model's inputs to each of them over ``batches``; ``centred`` when bias correction will take the
    mean part of the error away."""
    layers = [layer for layer in plan.layers
              if isinstance(layer, nn.Conv2d) and 1 < layer.groups == layer.in_channels]
    if not layers:
        return
    moments = {layer: PatchMoments(layer) for layer in layers}
    hooks = [layer.register_forward_pre_hook(lambda layer, args: moments[layer].update(args[0])) for layer in layers]
    set_quant_state(model, weights=False, acts=False)
    try:
        for batch in batches:
            run_model(model, batch, device)
    finally:
        for h in hooks:
            h.remove()
    for layer, m in moments.items():
        if m.second is None:  # not run by the model's forward (on any process: they all run the same model)
            continue
        m.second, m.first = distributed.sum_tensor(m.second), distributed.sum_tensor(m.first)
        m.count = distributed.sum_over_processes(m.count)[0]
        layer.weight_quantizer.init_range_output(layer.weight, m.matrix(centred))


def calibrate_model_acts(model: nn.Module, plan: QuantPlan, batches: list, device, progressive: bool, mode: str) -> None:
    """Whole-model activation ranges (the seed's Case 1/2).

    ``progressive``: unit by unit, each seeing the already-quantized activations before it (``aaq``);
    otherwise all at once on the un-quantized activations.
    """
    if not progressive:
        quantizers = [q for u in plan.units for q in u.act_quantizers]
        observe(quantizers, lambda: [run_model(model, b, device) for b in batches], mode)
        return
    for unit in plan.units:
        observe(unit.act_quantizers, lambda unit=unit: run_until(model, unit.module, batches, device), mode)
        for q in unit.act_quantizers:
            q.enabled = True


def _first_samples(batches: list, n: int) -> list:
    out, seen = [], 0
    for b in batches:
        out.append(b)
        seen += batch_len(b)
        if seen >= n:
            break
    return out
