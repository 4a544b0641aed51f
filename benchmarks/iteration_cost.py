"""Cost of one QDrop reconstruction iteration / cost of one plain FP forward+backward of the same block.

    python benchmarks/iteration_cost.py [--device cuda]

Both are timed in the same run, same batch, same threads, under the allocator setting the engine's
loop runs under, in alternating rounds (median ratio printed, with its range): the FP step computes the block's weight gradients of an MSE loss; the QDrop step is
what the engine's loop does per iteration (soft AdaRound weights, LSQ activations with random drop,
rounding loss, backward, the two Adam steps), with each of the activation quantizers' kernels: the fused
C++ ones (the default), the eager torch ones, and ``compile=True``'s torch.compile'd ones. The
convolutional blocks are measured twice: on contiguous activations, and on channels-last ones (the
engine's default on the CPU, ``QDropConfig.channels_last``), where the absolute times are the point.
"""
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from qdrop_hf import QDropConfig  # noqa: E402
from qdrop_hf.allocator import freed_memory_kept  # noqa: E402
from qdrop_hf.batches import to_channels_last  # noqa: E402
from qdrop_hf.plan import prepare_model, set_quant_state  # noqa: E402
from qdrop_hf.quantizers import DropMasks, use_kernels  # noqa: E402
from qdrop_hf.cache import BlockCache  # noqa: E402
from qdrop_hf.optim import Adam  # noqa: E402
from qdrop_hf.reconstruct import calibrate_unit_acts, capture, reconstruction_loss  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
DEVICE = torch.device(sys.argv[sys.argv.index("--device") + 1] if "--device" in sys.argv else "cpu")


def sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def timed(step, n):
    """Seconds per call, under the allocator setting the engine's loop runs under (for both steps)."""
    with freed_memory_kept():
        for _ in range(3):
            step()
        sync()
        start = time.perf_counter()
        for _ in range(n):
            step()
        sync()
        return (time.perf_counter() - start) / n


def measure(name, model, batch, unit_index, n=20, rounds=5):
    config = QDropConfig(n_bits_w=4, n_bits_a=4)
    model = copy.deepcopy(model).to(DEVICE)  # prepare_model installs quantizers in place; a model is measured more than once
    batch = {k: v.to(DEVICE) for k, v in batch.items()} if isinstance(batch, dict) else batch.to(DEVICE)
    plan = prepare_model(model, config, batch, DEVICE)
    for layer in plan.layers:
        layer.weight_quantizer.init_range(layer.weight)
    unit = [u for u in plan.units if u.kind == "body"][unit_index]
    cache = BlockCache.of(capture(model, unit.module, [batch], DEVICE, with_output=True))
    args, kwargs = cache.inputs(cache.items[0])
    target, mask = cache.items[0][3], cache.items[0][4]
    weights = list(unit.module.parameters())

    set_quant_state(unit.module, weights=True, acts=False)
    calibrate_unit_acts(unit, cache, "mse")
    alphas = [layer.weight_quantizer.start_adaround(layer.weight) for layer in unit.layers]
    masks = DropMasks(0.5, torch.Generator(device=DEVICE).manual_seed(0))
    for q in unit.act_quantizers:
        q.drop_masks = masks
    w_opt, a_opt = Adam(alphas, lr=1e-3), Adam([q.scale for q in unit.act_quantizers], lr=4e-5)

    def fp_step():
        reconstruction_loss(unit.module(*args, **kwargs), target, mask).backward()
        for p in weights:
            p.grad = None

    def qdrop_step():
        loss = reconstruction_loss(unit.module(*args, **kwargs), target, mask)
        loss = loss + 0.01 * sum(layer.weight_quantizer.rounding_loss(10.0) for layer in unit.layers)
        w_opt.zero_grad()
        a_opt.zero_grad()
        loss.backward()
        w_opt.step()
        a_opt.step(2e-5)

    def fp_mode(fp: bool):
        set_quant_state(unit.module, weights=not fp, acts=not fp)
        for p in weights:
            p.requires_grad_(fp)
        for q in unit.act_quantizers:
            q.scale.requires_grad_(not fp)

    # Rounds alternate the FP step and each QDrop variant, so that a drift of the machine's speed
    # (a shared VM's is several 10%) hits both sides of a ratio alike; the median ratio is printed.
    ratios = {kind: [] for kind in ("fused", "eager", "compiled")}
    fp_times, q_times = [], {kind: [] for kind in ratios}
    try:
        for _ in range(rounds):
            for kind in ratios:
                fp_mode(True)
                t_fp = timed(fp_step, n)
                fp_mode(False)
                use_kernels(kind)
                t_q = timed(qdrop_step, n)
                fp_times.append(t_fp)
                q_times[kind].append(t_q)
                ratios[kind].append(t_q / t_fp)
    finally:
        use_kernels("fused")
    print(f"{name:36s} FP fwd+bwd {statistics.median(fp_times) * 1e3:6.1f} ms | QDrop iteration: "
          + " | ".join(f"{kind} {statistics.median(q_times[kind]) * 1e3:6.1f} ms, ratio {statistics.median(r):.2f} "
                       f"({min(r):.2f}-{max(r):.2f})" for kind, r in ratios.items()))


def main():
    torch.manual_seed(0)
    where = torch.cuda.get_device_name(DEVICE) if DEVICE.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, {where}")
    from transformers import AutoModelForSequenceClassification, ResNetConfig, ResNetForImageClassification

    bert = AutoModelForSequenceClassification.from_pretrained(SHARED / "models" / "minilm-l6-sst2").eval()
    text = {"input_ids": torch.randint(1000, 5000, (32, 48)), "attention_mask": torch.ones(32, 48, dtype=torch.long)}
    measure("MiniLM-L6 layer (batch 32, seq 48)", bert.requires_grad_(False), text, 1)
    resnet = ResNetForImageClassification(ResNetConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[2, 2],
                                                       layer_type="basic")).eval().requires_grad_(False)
    small = torch.randn(32, 3, 128, 128)
    measure("ResNet basic block 16ch (batch 32)", resnet, small, 1)
    if DEVICE.type == "cpu":  # the layout is a CPU setting (mkldnn)
        measure("  the same, channels-last", resnet, to_channels_last(small), 1)
    from qdrop_hf.tasks.archs import build_arch

    lite = build_arch("efficientnet_lite0", default_weights=False).requires_grad_(False)
    images = torch.randn(32, 3, 224, 224)
    # QDropConfig.channels_last: the engine's default for convolutions on the CPU; contiguous before
    for unit in (1, 2):
        measure(f"EfficientNet-Lite0 MBConv {unit} (batch 32)", lite, images, unit)
        if DEVICE.type == "cpu":
            measure("  the same, channels-last", lite, to_channels_last(images), unit)


if __name__ == "__main__":
    main()
