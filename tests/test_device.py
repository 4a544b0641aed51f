"""Device placement: quantizers are made where the model lives, and a whole run works on CUDA where
there is one."""
import pytest
import torch

from qdrop_hf import QDropConfig, quantize_model
from qdrop_hf.tasks.archs import build_arch
from qdrop_hf.families import find_family
from qdrop_hf.nn import QuantLayer
from qdrop_hf.plan import install_quantizers
from qdrop_hf.quantizers import ActQuantizer


def test_activation_quantizers_are_made_on_the_model_device():
    # The meta device stands in for a GPU: a quantizer made on the CPU would stay there, as one did on
    # CUDA, where a ReLU's (a module without tensors of its own) output quantizer failed the first run.
    model = build_arch("resnet20", default_weights=False).to("meta")
    install_quantizers(model, find_family(model), QDropConfig(n_bits_w=4, n_bits_a=4))
    quantizers = {name: m for name, m in model.named_modules() if isinstance(m, ActQuantizer)}
    assert any("relu" in name for name in quantizers)
    misplaced = [name for name, q in quantizers.items()
                 if any(t.device.type != "meta" for t in list(q.parameters()) + list(q.buffers()))]
    assert quantizers and not misplaced


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_quantize_on_cuda_keeps_weights_on_the_grid():
    torch.manual_seed(0)
    model = build_arch("resnet20", default_weights=False)
    images = [torch.randn(4, 3, 32, 32) for _ in range(2)]
    config = QDropConfig(n_bits_w=4, n_bits_a=4, iters_w=20, num_samples=8, batch_size=4, device="cuda")
    q = quantize_model(model, images, config, progress=False)
    assert all(t.device.type == "cuda" for t in q.parameters())
    for layer in (m for m in q.modules() if isinstance(m, QuantLayer)):
        wq = layer.weight_quantizer
        w = layer.weight.detach()
        grid = (w / wq.scale + wq.zero_point)  # an integer in [0, 2^bits - 1] wherever w is on the grid
        torch.testing.assert_close(grid, grid.round(), rtol=0, atol=1e-3)
        assert int(grid.round().min()) >= 0 and int(grid.round().max()) <= 2**wq.n_bits - 1
        torch.testing.assert_close(w, wq.dequantized(), rtol=0, atol=1e-6)
    with torch.no_grad():
        assert torch.isfinite(q(images[0].cuda())).all()
