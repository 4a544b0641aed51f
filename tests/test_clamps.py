"""ReLU/ReLU6 skipped in front of an activation quantizer that clips as they would."""
import copy

import torch
from torch import nn

from qdrop_hf.clamps import skip_redundant_clamps
from qdrop_hf.plan import _quantize_output
from qdrop_hf.quantizers import ActQuantizer


def quantized_relu(relu: nn.Module, step: float, zero_point: float) -> nn.Module:
    relu.qdrop_out = ActQuantizer(4)
    relu.qdrop_out.scale.data.fill_(step)
    relu.qdrop_out.zero_point.fill_(zero_point)
    relu.qdrop_out.initialized.fill_(True)
    relu.qdrop_out.enabled = True
    relu.register_forward_hook(_quantize_output)
    return relu


def calls(module):
    count = [0]
    module.register_forward_pre_hook(lambda m, a: count.__setitem__(0, count[0] + 1))
    return count


def test_a_clamp_the_grid_makes_redundant_is_skipped_with_the_same_output():
    x = torch.randn(2, 8, 5, 5) * 4
    for relu, step, skipped in [(nn.ReLU6(), 0.35, True),   # 15 x 0.35 = 5.25 <= 6
                                (nn.ReLU6(), 6 / 15, True),  # 6 on the top code (15 x step a rounding off 6)
                                (nn.ReLU6(), 0.5, False),   # 7.5 > 6: ReLU6 clips first
                                (nn.ReLU(), 0.5, True)]:
        module = quantized_relu(relu, step, 0.0)
        reference = module(x)
        assert skip_redundant_clamps(module) == 1
        hardtanh_calls = [0]
        original = torch.nn.functional.hardtanh

        def counting(*args, **kwargs):
            hardtanh_calls[0] += 1
            return original(*args, **kwargs)
        torch.nn.functional.hardtanh = counting
        try:
            with torch.no_grad():
                out = module(x)
        finally:
            torch.nn.functional.hardtanh = original
        assert torch.equal(out, reference)
        if isinstance(relu, nn.ReLU6):
            assert (hardtanh_calls[0] == 0) == skipped
        twin = copy.deepcopy(module)
        with torch.no_grad():
            assert torch.equal(twin(x), reference)


def test_the_clamp_runs_where_the_grid_does_not_start_at_zero_or_the_quantizer_is_off():
    x = torch.randn(2, 8, 5, 5) * 4
    module = quantized_relu(nn.ReLU6(), 0.35, 3.0)  # grid from -1.05: the ReLU matters
    skip_redundant_clamps(module)
    with torch.no_grad():
        assert float(module(x).min()) == 0.0
        module.qdrop_out.enabled = False
        assert torch.equal(module(x), nn.functional.relu6(x))
    inplace = quantized_relu(nn.ReLU(inplace=True), 0.35, 0.0)
    assert skip_redundant_clamps(inplace) == 0
