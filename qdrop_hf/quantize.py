"""One call from a float model and calibration data to a QDrop-quantized model.

``quantize_model`` runs four phases: ``prepare`` (quantizers installed, calibration batches laid
out), ``init_ranges`` (weight ranges, and the activation ranges set before any reconstruction),
``reconstruct_units`` (the one block-by-block loop: cache a unit's inputs, reconstruct it, measure
it) and ``finish`` (the activation ranges set after reconstruction, the final quantizer state).
Where activation ranges are set, the method's ``order``, is one ``ActCalibration`` object that each
phase asks at its own point, so no phase branches on the order itself.
"""
from __future__ import annotations

import logging
import time
from contextlib import closing
from dataclasses import dataclass, field
from typing import Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from . import distributed, migration
from .batches import batch_len, run_model, take_batches, to_channels_last
from .cache import BlockCache
from .checkpoint import Checkpoint
from .clamps import skip_redundant_clamps
from .config import QDropConfig, RuntimeConfig
from .families import Family
from .integration.hf_quantizer import attach as attach_hf_quantizer
from .integer_linear import link_input_quantizers, use_integer_kernels
from .nn import release_float_weights
from .observers import PatchMoments
from .plan import QuantPlan, Unit, prepare_model, set_quant_state
from .quantizers import use_kernels
from .reconstruct import (ACT_CALIB_SAMPLES, calibrate_unit_acts, capture, follow, observe, observe_input_means,
                          reconstruct_unit, run_until, unit_error)

logger = logging.getLogger("qdrop_hf")


@dataclass
class Run:
    """What the phases of one ``quantize_model`` call share."""

    model: nn.Module
    config: QDropConfig
    runtime: RuntimeConfig
    device: torch.device
    batches: list
    plan: QuantPlan
    acts: "ActCalibration"
    correct_bias: bool
    report: dict = field(default_factory=lambda: {"units": [], "time_s": {}})

    @property
    def act_batches(self) -> list:
        """The first ``ACT_CALIB_SAMPLES`` samples: what whole-model range searches run on."""
        out, seen = [], 0
        for b in self.batches:
            out.append(b)
            seen += batch_len(b)
            if seen >= ACT_CALIB_SAMPLES:
                break
        return out


def quantize_model(model: nn.Module, calibration_data: Iterable, config: QDropConfig | None = None,
                   family: Family | None = None, progress: bool = True, checkpoint: Checkpoint | None = None,
                   runtime: RuntimeConfig | None = None) -> nn.Module:
    """Quantize ``model`` in place with QDrop and return it.

    ``calibration_data`` is any iterable of model-input batches (a DataLoader of tokenizer output, a
    list of image tensors, ``(images, labels)`` pairs...); its first ``config.num_samples`` samples
    are used and labels are ignored. The returned model runs fake-quantized (weights on their
    integer grid, activations quantized when ``config.act_quant``) and ``model.qdrop_report`` holds
    the per-unit errors and timings. With a ``checkpoint``, the state after each unit is saved there
    and a run that was killed resumes from its last finished unit, ending as an uninterrupted run would.
    ``runtime`` says where and how it runs (device, kernels, caches); it does not change the method.
    """
    t0 = time.perf_counter()
    run = prepare(model, calibration_data, config or QDropConfig(), runtime or RuntimeConfig(), family)
    init_ranges(run)
    run.report["time_s"]["init"] = time.perf_counter() - t0
    reconstruct_units(run, checkpoint, progress)
    finish(run)
    run.report["time_s"]["total"] = time.perf_counter() - t0
    model.qdrop_config, model.qdrop_plan, model.qdrop_report = run.config, run.plan, run.report
    attach_hf_quantizer(model)
    return model


def prepare(model: nn.Module, calibration_data: Iterable, config: QDropConfig, runtime: RuntimeConfig,
            family: Family | None) -> Run:
    """Quantizers installed on the model (on its device), calibration batches taken and laid out."""
    config.validate()
    torch.manual_seed(config.seed)
    device = runtime.resolved_device()
    use_kernels("compiled" if runtime.compile else "fused")
    batches = distributed.shard(take_batches(calibration_data, config.num_samples))
    model.eval().requires_grad_(False).to(device)
    if use_channels_last(runtime, model, device):
        batches = [to_channels_last(b) for b in batches]
    plan = prepare_model(model, config, batches[0], device, family)
    correct_bias = plan.family.bias_correction if config.bias_correction is None else config.bias_correction
    run = Run(model, config, runtime, device, batches, plan, ActCalibration.for_config(config), correct_bias)
    if migration.wanted(config, plan.family):
        run.report["outlier_migration"] = migration.migrate(model, plan.family, run.act_batches, device,
                                                            config.migrate, config.seed)
    return run


def init_ranges(run: Run) -> None:
    """Weight ranges for every layer (depthwise kernels from their output error where asked), the
    ranges of activations outside every unit, and whatever the order sets before reconstruction."""
    config, plan = run.config, run.plan
    for layer in plan.layers:
        layer.weight_quantizer.init_range(layer.weight, config.init_wmode)
    if (config.depthwise_range or plan.family.depthwise_range) == "output" and config.channel_wise:
        init_depthwise_ranges(run.model, plan, run.act_batches, run.device, centred=run.correct_bias)
    if config.act_quant:
        # Activations outside every unit (embedding output, pooled features) are set once on the float model.
        set_quant_state(run.model, weights=False, acts=False)
        observe(plan.free_act_quantizers, lambda: [run_model(run.model, b, run.device) for b in run.act_batches],
                config.init_amode)
    run.acts.before_units(run)


def reconstruct_units(run: Run, checkpoint: Checkpoint | None, progress: bool) -> None:
    """The block-by-block loop: each unit's inputs cached (from the previous unit's cache where it
    reads that unit's output), the unit reconstructed, its error measured against round-to-nearest,
    the state checkpointed."""
    done = 0
    if checkpoint is not None:
        done, run.report["units"] = checkpoint.load(run.model)
        if done:
            logger.info("resuming after %d finished units from %s", done, checkpoint.dir)
    prev = None  # the last unit and its cache, kept when the next unit reads that unit's output
    units = run.plan.units
    bar = tqdm(total=len(units), initial=done, desc="QDrop blocks", disable=not progress)
    for i in range(done, len(units)):
        unit, t_unit = units[i], time.perf_counter()
        cache = cache_unit(run, unit, prev)
        cache_s = time.perf_counter() - t_unit
        entry = reconstruct_one(run, i, unit, cache, progress)
        entry.update(time_s=time.perf_counter() - t_unit, cache_s=cache_s)
        run.report["units"].append(entry)
        logger.info("%s (%s): error %.4g (round-to-nearest %.4g) in %.1fs", unit.name, unit.kind,
                    entry["error"], entry["rtn_error"], entry["time_s"])
        prev = (unit, cache) if i + 1 < len(units) and units[i + 1].follows_previous else None
        del cache
        if checkpoint is not None:
            checkpoint.save(run.model, i + 1, run.report["units"])
        bar.update()
    bar.close()


def input_state(config: QDropConfig) -> tuple[bool, bool] | None:
    """(weights, activations) quantized in the model that a unit's inputs come from (``wwq``/``waq``),
    or None where they come from the float model alone."""
    return (config.wwq, config.waq and config.act_quant) if config.wwq or config.waq else None


def cache_unit(run: Run, unit: Unit, prev) -> BlockCache:
    """The unit's float inputs and outputs, and its inputs from the partly quantized model."""
    config, runtime = run.config, run.runtime
    quant_state = input_state(config)
    # input_drop="unquantized": caches hold the value before the quantizer feeding each unit (when the
    # inputs come from the model with quantized activations and the input is dropped at all)
    trace_input = (config.input_drop == "unquantized" and config.input_prob < 1.0 and quant_state is not None
                   and quant_state[1])
    cache_dtype = getattr(torch, runtime.cache_dtype) if runtime.cache_dtype else None
    chunk = batch_len(run.batches[0])  # rows per forward when a cache is run through a unit
    cache = BlockCache(cache_dtype, chunk, runtime.cache_dir, unit.name)
    if prev is not None:
        with closing(follow(*prev, unit, quant_state, trace_input)) as records:
            for record, quant_args, input_quantizer in records:
                cache.add(record, quant_args)
                cache.input_quantizer = input_quantizer
    else:
        set_quant_state(run.model, weights=False, acts=False)
        # closing(): an error while storing (NaN, a full disk) removes capture's hooks at once
        with closing(capture(run.model, unit.module, run.batches, run.device, with_output=True)) as records:
            for record in records:
                cache.add(record)
        if quant_state is not None:
            set_quant_state(run.model, *quant_state)
            with closing(capture(run.model, unit.module, run.batches, run.device, with_output=False,
                                 trace_input=trace_input)) as records:
                for j, record in enumerate(records):
                    cache.add_quantized(j, record["args"])
                    cache.input_quantizer = record.get("input_quantizer")
    cache.merged()
    return cache


def reconstruct_one(run: Run, i: int, unit: Unit, cache: BlockCache, progress: bool) -> dict:
    """Reconstruct one cached unit (harden it at round-to-nearest when there is nothing to learn);
    returns its report entry: error at round-to-nearest and after."""
    config = run.config
    if run.correct_bias:
        observe_input_means(unit, cache)
    set_quant_state(unit.module, weights=True, acts=False)
    run.acts.before_reconstruction(unit, cache)
    entry = {"unit": unit.name, "kind": unit.kind, "rtn_error": unit_error(unit, cache),
             "cache_mb": cache.nbytes() / 1e6}
    if config.iters_w > 0 and unit.layers:
        reconstruct_unit(unit, cache, config, learn_act=run.acts.learned, seed=config.seed + i, progress=progress,
                         micro_batch_size=run.runtime.micro_batch_size)
    else:
        for layer in unit.layers:
            layer.weight_quantizer.harden(layer.weight)
    for layer in unit.layers:
        layer.fold_bias_correction()
    run.acts.after_reconstruction(unit, cache)
    entry["error"] = unit_error(unit, cache)
    return entry


def finish(run: Run) -> None:
    run.acts.after_units(run)
    set_quant_state(run.model, weights=True, acts=run.config.act_quant)
    release_float_weights(run.model)
    run.model.qdrop_input_quantizers = link_input_quantizers(run.model, run.batches[0], run.device)
    use_integer_kernels(run.model, run.model.qdrop_input_quantizers)
    skip_redundant_clamps(run.model)


class ActCalibration:
    """Where activation ranges are set (``order``), asked by the phases at four points. This base
    is ``act_quant=False``: weights only, activations in float throughout."""

    learned = False  # whether reconstruction learns the activation steps with the rounding

    def __init__(self, config: QDropConfig | None = None):
        self.config = config

    @staticmethod
    def for_config(config: QDropConfig) -> "ActCalibration":
        if not config.act_quant:
            return ActCalibration()
        return {"before": RangesBefore, "together": RangesTogether, "after": RangesAfter}[config.order](config)

    def before_units(self, run: Run) -> None:
        pass

    def before_reconstruction(self, unit: Unit, cache: BlockCache) -> None:
        pass

    def after_reconstruction(self, unit: Unit, cache: BlockCache) -> None:
        pass

    def after_units(self, run: Run) -> None:
        pass

    def whole_model(self, run: Run) -> None:
        """Every unit's ranges on the model (with quantized weights when ``awq``; unit by unit on the
        already quantized activations when ``aaq``): the reference's Case 1/2."""
        set_quant_state(run.model, weights=self.config.awq, acts=False)
        calibrate_model_acts(run.model, run.plan, run.act_batches, run.device, progressive=self.config.aaq,
                             mode=self.config.init_amode)


class RangesBefore(ActCalibration):
    """Case 2: whole-model ranges first, then weights reconstructed under them."""

    def before_units(self, run):
        self.whole_model(run)

    def before_reconstruction(self, unit, cache):
        set_quant_state(unit.module, weights=True, acts=True)


class RangesTogether(ActCalibration):
    """QDrop and No-Drop: each unit's ranges set on its cached inputs, then learned jointly with the
    rounding during its reconstruction."""

    learned = True

    def before_reconstruction(self, unit, cache):
        calibrate_unit_acts(unit, cache, self.config.init_amode)
        set_quant_state(unit.module, weights=True, acts=True)


class RangesAfter(ActCalibration):
    """Weights reconstructed with float activations; ranges set afterwards, per unit when ``waq``
    (Case 3), or for the whole model at the end otherwise (Case 1)."""

    def after_reconstruction(self, unit, cache):
        if self.config.waq:
            calibrate_unit_acts(unit, cache, self.config.init_amode)
            set_quant_state(unit.module, weights=True, acts=True)

    def after_units(self, run):
        if not self.config.waq:
            self.whole_model(run)


def use_channels_last(runtime: RuntimeConfig, model: nn.Module, device: torch.device) -> bool:
    """``runtime.channels_last``, or by default: the model has 2-D convolutions and runs on the CPU
    through the C++ kernels (``compile``'s kernels run 2-4x slower on channels-last activations)."""
    if runtime.channels_last is not None:
        return runtime.channels_last
    return device.type == "cpu" and not runtime.compile and any(isinstance(m, nn.Conv2d) for m in model.modules())


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
    """Whole-model activation ranges (the reference implementation's Case 1/2).

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
