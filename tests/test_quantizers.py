import platform
from pathlib import Path

import pytest
import torch

from qdrop_hf.nn import QuantConv1D, QuantConv2d, QuantLinear
from qdrop_hf.native import build_kernels, fake_quant_kernels
from qdrop_hf.observers import PatchMoments
from qdrop_hf.quantizers import ActQuantizer, DropMasks, WeightQuantizer, _eager_backward, _eager_forward, use_kernels


def on_grid(values, scale, zero_point, n_bits):
    codes = values / scale + zero_point
    return torch.allclose(codes, codes.round(), atol=1e-3) and codes.min() >= -1e-3 and codes.max() <= 2**n_bits - 1 + 1e-3


@pytest.mark.parametrize("n_bits", range(2, 9))
def test_weight_values_on_grid_per_channel(n_bits):
    w = torch.randn(16, 24)
    q = WeightQuantizer(n_bits, channel_wise=True)
    q.init_range(w, "mse")
    q.enabled = True
    assert q.scale.shape == (16, 1) and q.zero_point.shape == (16, 1)
    wq = q(w)
    assert on_grid(wq, q.scale, q.zero_point, n_bits)
    # each row uses at most 2^b distinct values
    assert max(len(row.unique()) for row in wq) <= 2**n_bits


@pytest.mark.parametrize("n_bits", range(2, 9))
def test_activation_values_on_grid(n_bits):
    x = torch.randn(4, 10, 32) * 3 + 1
    q = ActQuantizer(n_bits)
    q.observe()
    q(x)
    q.finish_observing("mse")
    q.enabled = True
    xq = q(x)
    assert q.scale.shape == ()
    assert on_grid(xq, q.scale, q.zero_point, n_bits)
    assert len(xq.unique()) <= 2**n_bits


def test_scale_shapes_of_each_layer_kind():
    layers = {
        QuantLinear.from_float(torch.nn.Linear(6, 5), 4, True): (5, 1),
        QuantConv2d.from_float(torch.nn.Conv2d(4, 8, 3, groups=2), 4, True): (8, 1, 1, 1),
        QuantConv2d.from_float(torch.nn.Conv2d(8, 8, 3, groups=8), 4, True): (8, 1, 1, 1),
    }
    from transformers.pytorch_utils import Conv1D

    layers[QuantConv1D.from_float(Conv1D(7, 6), 4, True)] = (1, 7)  # GPT-2 Conv1D: [in, out]
    for layer, shape in layers.items():
        layer.weight_quantizer.init_range(layer.weight)
        assert tuple(layer.weight_quantizer.scale.shape) == shape
    per_tensor = WeightQuantizer(4, channel_wise=False)
    per_tensor.init_range(torch.randn(5, 6))
    assert per_tensor.scale.numel() == 1


def test_mse_range_beats_minmax_on_outliers():
    w = torch.randn(8, 256)
    w[:, 0] = 12.0
    errs = {}
    for mode in ("minmax", "mse"):
        q = WeightQuantizer(3)
        q.init_range(w, mode)
        q.enabled = True
        errs[mode] = (q(w) - w).pow(2).mean().item()
    assert errs["mse"] < errs["minmax"]


def output_error(q, w, moments):
    d = (q(w) - w).reshape(w.shape[0], -1)
    return torch.einsum("ri,rij,rj->r", d, moments.expand(w.shape[0], -1, -1), d).sum().item()


def test_output_range_search_lowers_the_kernels_output_error():
    """Depthwise 3x3 kernels whose centre tap sees inputs 10x the others (as a kernel's taps can): the
    output-error search puts the centre tap near the grid, the weight-space search cannot tell taps apart."""
    torch.manual_seed(0)
    w = torch.randn(32, 1, 3, 3)
    scales = torch.ones(9)
    scales[4] = 10.0
    moments = torch.diag(scales**2)[None]  # one group per channel, all alike
    errs = {}
    for mode in ("weight", "output"):
        q = WeightQuantizer(4)
        q.init_range(w)
        if mode == "output":
            q.init_range_output(w, moments.expand(32, -1, -1))
        q.enabled = True
        assert on_grid(q(w), q.scale, q.zero_point, 4)
        errs[mode] = output_error(q, w, moments)
    assert errs["output"] < 0.6 * errs["weight"], errs


def test_patch_moments_are_those_of_the_convolutions_own_patches():
    """Padding, stride and chunking (a budget of under one image) as the convolution sees its input."""
    conv = torch.nn.Conv2d(3, 3, 3, stride=2, padding=1, groups=3)
    x = torch.randn(2, 3, 7, 7) + 1.0
    moments = PatchMoments(conv, max_elements=50)
    moments.update(x[:1])
    moments.update(x[1:])
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1)).double()
    patches = torch.stack([padded[n, :, i:i + 3, j:j + 3].reshape(3, 9)
                           for n in range(2) for i in range(0, 7, 2) for j in range(0, 7, 2)], dim=1)  # [3, 32, 9]
    second = torch.einsum("gni,gnj->gij", patches, patches) / 32
    mean = patches.mean(1)
    assert torch.allclose(moments.matrix(centred=False).double(), second, atol=1e-5)
    cov = second - mean[:, :, None] * mean[:, None, :]
    assert torch.allclose(moments.matrix(centred=True).double(), cov, atol=1e-5)


def test_adaround_starts_at_float_weight_and_hardens_onto_grid():
    w = torch.randn(12, 20)
    q = WeightQuantizer(4)
    q.init_range(w, "minmax")
    q.enabled = True
    q.start_adaround(w)
    lo, hi = (0 - q.zero_point) * q.scale, (q.qmax - q.zero_point) * q.scale
    inside = (w >= lo) & (w <= hi)  # the rounded zero point may clip the extreme value by < half a step
    assert inside.float().mean() > 0.9
    assert torch.allclose(q(w)[inside], w[inside], atol=1e-5)
    with torch.no_grad():
        q.alpha.add_(torch.randn_like(q.alpha))
    soft = q(w)
    rounded_up = q.alpha >= 0
    q.harden(w)
    hard = q(w)
    assert on_grid(hard, q.scale, q.zero_point, 4)
    floor = torch.floor(w / q.scale) + q.zero_point
    assert torch.equal(q.codes.long(), (floor + rounded_up).clamp(0, 15).long())
    assert not torch.allclose(soft, hard)


@pytest.mark.parametrize("kernels", ["fused", "eager"])
@pytest.mark.parametrize("beta", [20.0, 7.5, 2.0])
def test_fused_soft_weight_and_rounding_loss_match_textbook_autograd(beta, kernels):
    """The one-node soft weight and regulariser (C++ or torch ops) give the values and alpha-gradients
    of autograd through sigmoid -> stretch -> clamp, with alphas on both sides of the clamp."""
    w = torch.randn(16, 24)
    q = WeightQuantizer(3)
    q.init_range(w)
    q.enabled = True
    q.start_adaround(w)
    with torch.no_grad():
        q.alpha.copy_(torch.linspace(-6, 6, q.alpha.numel()).reshape(q.alpha.shape))
    g = torch.randn_like(w)

    def textbook():
        h = torch.clamp(torch.sigmoid(q.alpha) * 1.2 - 0.1, 0, 1)
        return q.w_base + h * q.w_step, h.numel() - (2 * h - 1).abs().pow(beta).sum()

    for fused in (True, False):
        q.alpha.grad = None
        use_kernels(kernels)
        try:
            soft, reg = (q(w), q.rounding_loss(beta)) if fused else textbook()
            ((soft * g).sum() + 0.3 * reg).backward()
        finally:
            use_kernels("fused")
        if fused:
            got = (soft.detach(), reg.detach(), q.alpha.grad.clone())
        else:
            want = (soft.detach(), reg.detach(), q.alpha.grad.clone())
    clamped = (torch.sigmoid(q.alpha) * 1.2 - 0.1).lt(0) | (torch.sigmoid(q.alpha) * 1.2 - 0.1).gt(1)
    assert clamped.any() and (~clamped).any()
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert (got[2][clamped] == 0).all()


def test_rounding_loss_is_zero_only_for_binary_rounding():
    w = torch.randn(6, 6)
    q = WeightQuantizer(4)
    q.init_range(w)
    q.start_adaround(w)
    assert q.rounding_loss(2.0) > 0
    with torch.no_grad():
        q.alpha.copy_(torch.where(q.alpha >= 0, 10.0, -10.0))
    assert q.rounding_loss(2.0).item() == pytest.approx(0.0, abs=1e-6)


def fitted_act(n_bits=4):
    x = torch.randn(64, 128)
    q = ActQuantizer(n_bits)
    q.observe()
    q(x)
    q.finish_observing("minmax")
    q.enabled = True
    return q, x


@pytest.mark.parametrize("p", [0.25, 0.5, 0.8])
def test_drop_keeps_quantized_values_with_probability_p(p):
    q, x = fitted_act()
    q.scale.requires_grad_(True)
    q.drop_masks = DropMasks(p, torch.Generator().manual_seed(0), min_pool=1 << 16)
    with torch.no_grad():
        xq = (torch.clamp(torch.round(x / q.scale) + q.zero_point, 0, 15) - q.zero_point) * q.scale
    fractions = []
    for _ in range(20):
        out = q(x)
        changed = xq != x
        fractions.append(((out == xq) & changed).sum().item() / changed.sum().item())
        assert torch.equal(out[~changed], x[~changed]) and torch.all((out == xq) | (out == x))
    assert abs(sum(fractions) / len(fractions) - p) < 0.02
    assert len({round(f, 6) for f in fractions}) > 1  # masks differ between calls


def test_pooled_drop_masks_are_independent_draws_per_element_and_call():
    """Windows of one pool behave as fresh Bernoulli draws: each element is dropped at rate 1 - p
    over the calls (none stuck), and an element's mask is uncorrelated with its mask at the next call
    and with its neighbour's. The pool is the smallest the class draws (twice the request)."""
    p, n, calls = 0.5, 3000, 600
    masks = DropMasks(p, torch.Generator().manual_seed(5), min_pool=0)
    draws = torch.stack([masks(torch.empty(n)) for _ in range(calls)])  # [calls, n], 1 = dropped
    assert masks.pool.numel() == 2 * n
    rates = draws.mean(dim=0)
    assert (rates - (1 - p)).abs().max() < 0.1  # 5 standard deviations of a rate over 600 calls

    def correlation(a, b):
        a, b = a - a.mean(), b - b.mean()
        return float((a * b).sum() / (a.norm() * b.norm()))

    assert abs(correlation(draws[1:], draws[:-1])) < 0.01  # the same element, consecutive calls
    assert abs(correlation(draws[:, 1:], draws[:, :-1])) < 0.01  # neighbours within a call


def test_prob_one_is_no_drop_and_no_drop_outside_reconstruction():
    q, x = fitted_act()
    q.scale.requires_grad_(True)
    reference = q(x)
    q.drop_masks = DropMasks(1.0, torch.Generator().manual_seed(0), min_pool=1 << 16)
    assert torch.equal(q(x), reference)
    q.drop_masks = None
    assert torch.equal(q(x), reference)
    with torch.no_grad():
        assert torch.equal(q(x), reference)


@pytest.mark.parametrize("kernels", ["fused", "eager", "compiled"])
def test_fake_quant_node_matches_straight_through_reference(kernels):
    """Values and gradients (input and LSQ step) of the one-node fake quant with drop, with each set of
    kernels, against autograd through the textbook formula; many elements clip at 3 bits."""
    x = (torch.randn(6, 50) * 2).requires_grad_(True)
    q = ActQuantizer(3)
    q.observe()
    q(x)
    q.finish_observing("mse")
    q.scale.data *= 0.6  # a learned step smaller than the initial one: more clipping
    q.enabled = True
    q.scale.requires_grad_(True)
    drop = (torch.rand(x.shape) < 0.5).float()
    q.drop_masks = lambda shape, dtype: drop.to(dtype)
    g = torch.randn(6, 50)
    use_kernels(kernels)
    try:
        out = q(x)
        (out * g).sum().backward()
    finally:
        use_kernels("fused")

    x2 = x.detach().clone().requires_grad_(True)
    s2 = q.scale.detach().clone().requires_grad_(True)
    v = x2 / s2
    v = (v.round() - v).detach() + v
    ref = (torch.clamp(v + q.zero_point, 0, 7) - q.zero_point) * s2
    ref = torch.where(drop.bool(), x2, ref)
    (ref * g).sum().backward()
    clipped = (x.detach() / q.scale.detach()).round() + q.zero_point
    assert ((clipped < 0) | (clipped > 7)).sum() > 10
    assert torch.equal(out.detach(), ref.detach()) or torch.allclose(out, ref.detach(), atol=1e-6)
    assert torch.equal(out[drop.bool()], x.detach()[drop.bool()])  # dropped: exactly the float value
    assert torch.allclose(x.grad, x2.grad, atol=1e-6)
    assert torch.allclose(q.scale.grad, s2.grad, rtol=1e-4, atol=1e-5)


X86 = platform.machine() in ("x86_64", "AMD64")
# This CPU's build, and on x86 the AVX2-only build as well (what an AMD EPYC without AVX-512 runs).
MARCHES = ["native", "x86-64-v3"] if X86 else ["native"]


def kernels_for(march):
    kernels = build_kernels(march)
    assert kernels is not None, f"the fused kernels did not build for -march={march} (see the log)"
    return kernels


@pytest.mark.parametrize("march", MARCHES)
@pytest.mark.parametrize("n_bits,zero_point", [(2, 1.0), (4, 0.0), (4, 7.0), (8, 128.0)])
def test_fused_kernels_equal_eager_ones(n_bits, zero_point, march):
    """The C++ kernels, built for this CPU and for AVX2 alone, give the eager (torch-op) kernels'
    values bit for bit (outputs and input gradients, over several parallel chunks, with and without
    drop) and the same step gradient up to summation order."""
    kernels = kernels_for(march)
    gen = torch.Generator().manual_seed(n_bits)
    x = torch.randn(3, 70001, generator=gen) * 3
    grad = torch.randn(x.shape, generator=gen)
    scale, zp = torch.tensor(0.37), torch.tensor(zero_point)
    drop = (torch.rand(x.shape, generator=gen) < 0.5).float()
    for d in (None, drop):
        eager = _eager_forward(x, scale, zp, n_bits, d)
        fused = kernels.forward(x, float(scale), zero_point, 2**n_bits - 1, None if d is None else d.to(torch.uint8))
        assert torch.equal(fused, eager)
        g_eager, s_eager = _eager_backward(grad, x, eager, scale, True)
        g_fused, s_fused = kernels.backward(grad, x, fused, float(scale), True)
        assert torch.equal(g_fused, g_eager)
        assert torch.allclose(s_fused, s_eager, rtol=1e-4)
        assert len(kernels.backward(grad, x, fused, float(scale), False)) == 1
    assert torch.equal(x[drop.bool()], fused[drop.bool()])


@pytest.mark.parametrize("march", MARCHES)
def test_fused_adaround_kernels_match_torch_ops(march):
    """AdaRound's soft weight, its alpha-gradient and the rounding loss of each build (polynomial
    exp/log, vectorised differently by AVX2 and AVX-512) against torch's sigmoid and pow, within
    float rounding; alphas on both sides of the rectifier's clamp and beta at both ends of the anneal."""
    kernels = kernels_for(march)
    gen = torch.Generator().manual_seed(5)
    alpha = torch.linspace(-7, 7, 50001) + 0.01 * torch.randn(50001, generator=gen)
    base, step, grad = (torch.randn(50001, generator=gen) for _ in range(3))
    sig = torch.sigmoid(alpha.double())
    h = torch.clamp(sig * 1.2 - 0.1, 0, 1)
    dh = torch.where((sig * 1.2 - 0.1 > 0) & (sig * 1.2 - 0.1 < 1), sig * (1 - sig) * 1.2, torch.zeros_like(sig))
    torch.testing.assert_close(kernels.soft_weight(alpha, base, step).double(), base.double() + h * step.double(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(kernels.soft_weight_backward(alpha, step, grad).double(), grad.double() * step.double() * dh, rtol=1e-4, atol=1e-6)
    for beta in (20.0, 2.0):
        c = 2 * h - 1
        loss, dalpha = kernels.rounding_loss(alpha, beta)
        torch.testing.assert_close(loss.double(), (1 - c.abs().pow(beta)).sum(), rtol=1e-5, atol=1e-2)
        want = -2 * beta * c.abs().pow(beta - 1) * torch.sign(c) * dh
        torch.testing.assert_close(dalpha.double(), want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("march", MARCHES)
def test_fused_dequantize_gives_the_torch_op_weight(march):
    """The one-pass weight of each build is the eager ``(codes - zp) * s`` bit for bit, per output
    channel (conv and Linear shapes, over several parallel chunks) and per tensor; a finished
    quantizer's ``dequantized`` is it."""
    kernels = kernels_for(march)
    gen = torch.Generator().manual_seed(3)
    for shape in [(1280, 320, 1, 1), (96, 1, 3, 3), (77, 301)]:
        codes = torch.randint(0, 16, shape, generator=gen, dtype=torch.uint8)
        per_channel = [shape[0]] + [1] * (len(shape) - 1)
        for scale_shape in (per_channel, [1] * len(shape)):
            scale = torch.rand(scale_shape, generator=gen) * 0.1
            zp = torch.randint(0, 16, scale_shape, generator=gen).float()
            assert torch.equal(kernels.dequantize(codes, scale, zp), (codes.float() - zp) * scale)
    wq = WeightQuantizer(4)
    weight = torch.randn(64, 48, generator=gen)
    wq.init_range(weight)
    wq.harden(weight)
    assert torch.equal(wq.dequantized(), (wq.codes.float() - wq.zero_point) * wq.scale)


def test_fused_kernels_take_strided_inputs_and_leave_half_precision_to_eager():
    """A strided activation (attention's heads) and a bfloat16 one quantize to the eager values."""
    q, x = fitted_act()
    for other in (x.t(), x.to(torch.bfloat16)):
        use_kernels("eager")
        try:
            expected = q(other)
        finally:
            use_kernels("fused")
        assert torch.equal(q(other), expected)


@pytest.mark.parametrize("march", MARCHES)
def test_fused_kernels_read_channels_last_activations_in_place(march):
    """A CPU CNN's activations are channels-last: the C++ kernels read them as they lie (outputs and
    gradients keep the layout) and give the eager kernels' values; a drop mask is laid out in the
    same memory order, so that either kernel drops the same elements."""
    kernels = kernels_for(march)
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(4, 16, 9, 7, generator=gen) * 3).contiguous(memory_format=torch.channels_last)
    grad = torch.randn(x.shape, generator=gen).contiguous(memory_format=torch.channels_last)
    scale, zp = torch.tensor(0.37), torch.tensor(7.0)
    drop = DropMasks(0.5, torch.Generator().manual_seed(1), min_pool=1 << 12)(x, torch.uint8)
    assert drop.stride() == x.stride()
    fused = kernels.forward(x, 0.37, 7.0, 15, drop)
    eager = _eager_forward(x, scale, zp, 4, drop.float())
    assert torch.equal(fused, eager) and fused.stride() == x.stride()
    assert torch.equal(fused[drop.bool()], x[drop.bool()]) and 0.4 < drop.float().mean() < 0.6
    g_fused, s_fused = kernels.backward(grad, x, fused, 0.37, True)
    g_eager, s_eager = _eager_backward(grad, x, eager, scale, True)
    assert torch.equal(g_fused, g_eager) and g_fused.stride() == x.stride()
    assert torch.allclose(s_fused, s_eager, rtol=1e-4)
    leaf = x.clone().requires_grad_(True)
    out = kernels.fake_quant(leaf, scale, 7.0, 15, drop)
    out.backward(grad.contiguous())  # a gradient in another order is put in x's
    assert torch.equal(out, fused) and torch.equal(leaf.grad, g_fused) and leaf.grad.stride() == x.stride()
    other = torch.randn(x.shape, generator=gen)  # contiguous
    mixed = kernels.mix(x, other, drop)
    assert torch.equal(mixed, torch.lerp(x, other, drop.float())) and mixed.stride() == x.stride()


def test_drop_masks_are_the_same_draws_for_either_kernel_and_mix_exactly():
    """uint8 masks (fused kernels) and float masks (eager) come from the same draws, and the C++
    input mixing gives the eager lerp's result bit for bit: either value, never a blend."""
    shape = torch.Size([4, 3000])
    as_bytes = DropMasks(0.5, torch.Generator().manual_seed(3), min_pool=1 << 14)
    as_float = DropMasks(0.5, torch.Generator().manual_seed(3), min_pool=1 << 14)
    for like in (torch.empty(shape), torch.empty(4, 3, 10, 100).contiguous(memory_format=torch.channels_last)):
        assert torch.equal(as_bytes(like, torch.uint8).float(), as_float(like, torch.float32))
    kept, other = torch.randn(shape), torch.randn(shape)
    mixed = DropMasks(0.5, torch.Generator().manual_seed(4)).mix(kept, other)
    use_kernels("eager")
    try:
        expected = DropMasks(0.5, torch.Generator().manual_seed(4)).mix(kept, other)
    finally:
        use_kernels("fused")
    assert torch.equal(mixed, expected)
    from_other = mixed == other
    assert torch.equal(mixed[~from_other], kept[~from_other]) and 0.4 < from_other.float().mean() < 0.6


def test_a_failed_kernel_build_falls_back_to_torch_ops(monkeypatch, caplog):
    """No compiler (the loader raising): one warning, no module, and the quantizers still run."""
    import torch.utils.cpp_extension

    from qdrop_hf import native

    def no_compiler(*args, **kwargs):
        raise RuntimeError("Error building extension: c++ not found")

    monkeypatch.setattr(torch.utils.cpp_extension, "load", no_compiler)
    monkeypatch.setattr(native, "_state", {})
    with caplog.at_level("WARNING", logger="qdrop_hf.native"):
        assert native.fake_quant_kernels() is None
        assert native.fake_quant_kernels() is None  # tried once
    assert sum("c++ not found" in r.message for r in caplog.records) == 1
    q, x = fitted_act()
    q.scale.requires_grad_(True)
    q.drop_masks = DropMasks(0.5, torch.Generator().manual_seed(0), min_pool=1 << 14)
    out = q(x)
    out.sum().backward()
    assert q.scale.grad is not None and torch.isfinite(out).all()


@pytest.mark.parametrize("kind", ["linear", "conv", "depthwise", "grouped", "conv1d"])
def test_bias_correction_removes_the_mean_output_shift_and_folds_exactly(kind):
    import copy

    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    fp, x = {
        "linear": (torch.nn.Linear(12, 6), torch.randn(256, 12) + 3),
        "conv": (torch.nn.Conv2d(8, 6, 3), torch.randn(16, 8, 10, 10) + 3),
        "depthwise": (torch.nn.Conv2d(8, 8, 3, groups=8), torch.randn(16, 8, 10, 10) + 3),
        "grouped": (torch.nn.Conv2d(8, 6, 3, groups=2), torch.randn(16, 8, 10, 10) + 3),
        "conv1d": (Conv1D(6, 12), torch.randn(256, 12) + 3),
    }[kind]
    if kind == "conv1d":
        fp.weight.data.normal_(0, 0.3)  # GPT-2's init (std 0.02) moves the mean too little to test
    cls = {"linear": QuantLinear, "conv1d": QuantConv1D}.get(kind, QuantConv2d)
    layer = cls.from_float(copy.deepcopy(fp), 2, True)
    layer.weight_quantizer.init_range(layer.weight)
    layer.weight_quantizer.enabled = True
    layer.weight_quantizer.harden(layer.weight)
    dims = (0, 2, 3) if x.dim() == 4 else (0,)
    with torch.no_grad():
        ref = fp(x).mean(dims)
        shift = (layer(x).mean(dims) - ref).abs().max()
        layer.input_mean = x.mean(dims)
        corrected = layer(x)
        assert shift > 0.1  # 2-bit weights move the mean output
        assert (corrected.mean(dims) - ref).abs().max() < (1e-4 if x.dim() == 2 else 0.1 * shift)
        layer.fold_bias_correction()
        assert layer.input_mean is None and torch.allclose(layer(x), corrected, atol=1e-5)
        assert torch.equal(fp.weight, layer.weight) and torch.equal(fp.bias, layer.bias)
        layer.weight_quantizer.enabled = False  # quantizer off: the float layer, float bias included
        assert torch.allclose(layer(x), fp(x), atol=1e-5)


def test_a_lock_left_by_a_killed_kernel_build_is_removed(tmp_path, monkeypatch):
    """torch's extension loader waits for ever on the lock file of a build that was killed."""
    import os
    import time

    from qdrop_hf import native

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    from torch.utils.cpp_extension import _get_build_directory

    folder = Path(_get_build_directory("qdrop_probe", verbose=False))
    (folder / "lock").write_text("")
    native._clear_stale_lock("qdrop_probe")
    assert (folder / "lock").exists()  # a build may be running now: left alone
    old = time.time() - native.STALE_LOCK_S - 60
    os.utime(folder / "lock", (old, old))
    native._clear_stale_lock("qdrop_probe")
    assert not (folder / "lock").exists()
