"""Cost of one QDrop reconstruction iteration / cost of one plain FP forward+backward of the same block.

    python benchmarks/iteration_cost.py

Both are timed in the same run, same batch, same threads, under the allocator setting the engine's
loop runs under: the FP step computes the block's weight gradients of an MSE loss; the QDrop step is
what the engine's loop does per iteration (soft AdaRound weights, LSQ activations with random drop,
rounding loss, backward, fused Adam step), with the eager fake-quant kernels and again with
``compile=True`` (torch.compile'd kernels).
"""
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from qdrop_hf import QDropConfig  # noqa: E402
from qdrop_hf.allocator import freed_memory_kept  # noqa: E402
from qdrop_hf.plan import prepare_model, set_quant_state  # noqa: E402
from qdrop_hf.quantizers import DropMasks, use_compiled_kernels  # noqa: E402
from qdrop_hf.cache import BlockCache  # noqa: E402
from qdrop_hf.reconstruct import calibrate_unit_acts, capture, fused_adam, reconstruction_loss  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def timed(step, n):
    """Seconds per call, under the allocator setting the engine's loop runs under (for both steps)."""
    with freed_memory_kept():
        for _ in range(3):
            step()
        start = time.perf_counter()
        for _ in range(n):
            step()
        return (time.perf_counter() - start) / n


def measure(name, model, batch, unit_index, n=20):
    config = QDropConfig(n_bits_w=4, n_bits_a=4)
    plan = prepare_model(model, config, batch, "cpu")
    for layer in plan.layers:
        layer.weight_quantizer.init_range(layer.weight)
    unit = [u for u in plan.units if u.kind == "body"][unit_index]
    cache = BlockCache.of(capture(model, unit.module, [batch], "cpu", with_output=True))
    args, kwargs = cache.inputs(cache.items[0])
    target, mask = cache.items[0][3], cache.items[0][4]

    set_quant_state(model, weights=False, acts=False)
    params = list(unit.module.parameters())
    for p in params:
        p.requires_grad_(True)

    def fp_step():
        reconstruction_loss(unit.module(*args, **kwargs), target, mask).backward()
        for p in params:
            p.grad = None

    t_fp = timed(fp_step, n)
    for p in params:
        p.requires_grad_(False)

    set_quant_state(unit.module, weights=True, acts=False)
    calibrate_unit_acts(unit, cache, "mse")
    set_quant_state(unit.module, weights=True, acts=True)
    alphas = [layer.weight_quantizer.start_adaround(layer.weight) for layer in unit.layers]
    masks = DropMasks(0.5, torch.Generator().manual_seed(0))
    for q in unit.act_quantizers:
        q.drop_masks = masks
        q.scale.requires_grad_(True)
    opt = fused_adam(alphas + [q.scale for q in unit.act_quantizers], lr=1e-3)

    def qdrop_step():
        loss = reconstruction_loss(unit.module(*args, **kwargs), target, mask)
        loss = loss + 0.01 * sum(layer.weight_quantizer.rounding_loss(10.0) for layer in unit.layers)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    t_q = timed(qdrop_step, n)
    use_compiled_kernels(True)
    try:
        t_c = timed(qdrop_step, n)
    finally:
        use_compiled_kernels(False)
    print(f"{name:34s} FP fwd+bwd {t_fp * 1e3:6.1f} ms | QDrop iteration {t_q * 1e3:6.1f} ms, ratio {t_q / t_fp:.2f} "
          f"| with compile=True {t_c * 1e3:6.1f} ms, ratio {t_c / t_fp:.2f}")


def main():
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    from transformers import AutoModelForSequenceClassification, ResNetConfig, ResNetForImageClassification

    bert = AutoModelForSequenceClassification.from_pretrained(SHARED / "models" / "minilm-l6-sst2").eval()
    text = {"input_ids": torch.randint(1000, 5000, (32, 48)), "attention_mask": torch.ones(32, 48, dtype=torch.long)}
    measure("MiniLM-L6 layer (batch 32, seq 48)", bert.requires_grad_(False), text, 1)
    resnet = ResNetForImageClassification(ResNetConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[2, 2],
                                                       layer_type="basic")).eval().requires_grad_(False)
    measure("ResNet basic block 16ch (batch 32)", resnet, torch.randn(32, 3, 128, 128), 1)
    from qdrop_hf.archs import build_arch

    lite = build_arch("efficientnet_lite0", default_weights=False).requires_grad_(False)
    measure("EfficientNet-Lite0 MBConv (batch 32)", lite, torch.randn(32, 3, 224, 224), 2)


if __name__ == "__main__":
    main()
