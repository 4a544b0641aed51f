"""ONNX export: integer weights as int8 initializers with per-channel DequantizeLinear, every
activation quantizer as QuantizeLinear/DequantizeLinear, ONNX Runtime's logits against PyTorch's,
ONNX Runtime's integer kernels in the optimized graph, and the export's bad-input errors."""
from collections import Counter

import numpy as np
import pytest
import torch

from conftest import image_batches, minilm_sst2, text_batches, tiny_bert, tiny_resnet
from qdrop_hf import QDropConfig, quantize_model
from qdrop_hf.nn import QuantLayer
from qdrop_hf.quantizers import ActQuantizer

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from qdrop_hf.integration.onnx_export import ExportError, OnnxModel, export_onnx, fold_float_weights  # noqa: E402


def logits(model, inputs):
    with torch.no_grad():
        out = model(**inputs) if isinstance(inputs, dict) else model(inputs)
    return getattr(out, "logits", out)


def initializers(path):
    graph = onnx.load(str(path)).graph
    return {i.name: onnx.numpy_helper.to_array(i) for i in graph.initializer}, graph


def test_tiny_bert_exports_integer_weights_and_every_activation_quantizer(tmp_path):
    model = quantize_model(tiny_bert(), text_batches(), QDropConfig(n_bits_w=4, n_bits_a=8, iters_w=5, num_samples=16),
                           progress=False)
    batch = text_batches()[0]
    path = export_onnx(model, tmp_path, batch)
    assert sorted(p.name for p in path.parent.iterdir()) == ["config.json", "model.onnx"]
    inits, graph = initializers(path)
    ops = Counter(n.op_type for n in graph.node)
    layers = [m for m in model.modules() if isinstance(m, QuantLayer)]
    active = [m for m in model.modules() if isinstance(m, ActQuantizer) and m.active]
    assert ops["QuantizeLinear"] == len(active)  # Q, K, V, probabilities and context included
    assert "Clip" not in ops  # 8-bit activations: QuantizeLinear saturates to the grid itself
    weight_dq = [n for n in graph.node if n.op_type == "DequantizeLinear" and inits.get(n.input[0]) is not None
                 and inits[n.input[0]].dtype.name == "int8" and inits[n.input[0]].ndim == 2]
    assert len(weight_dq) == len(layers)  # per output channel: one scale and zero point a row
    assert all(inits[n.input[1]].shape == (inits[n.input[0]].shape[0],) for n in weight_dq)
    codes = [inits[n.input[0]].astype(int) for n in weight_dq]
    zero_points = [inits[n.input[2]].astype(int)[:, None] for n in weight_dq]
    four_bit = [layer for layer in layers if layer.weight_quantizer.n_bits == 4]  # the head stays at 8 bits
    assert sum(not z.any() for z in zero_points) >= len(four_bit) > 0  # code - zero point fits: symmetric int8
    centred = sorted(tuple((c - z).flatten()[:8].tolist()) for c, z in zip(codes, zero_points))
    expected = sorted(tuple((wq.codes.long() - wq.zero_point.long()).flatten()[:8].tolist())
                      for wq in (layer.weight_quantizer for layer in layers))
    assert centred == expected  # the hardened codes themselves, one byte each
    runner = OnnxModel(path)
    ref = logits(model, batch)
    assert torch.allclose(runner(**batch).logits, ref, atol=1e-5 * ref.abs().max().item() + 1e-7)
    short = {k: v[:3, :7] for k, v in batch.items()}  # batch and sequence length are dynamic
    assert torch.allclose(runner(**short).logits, logits(model, short), atol=1e-5 * ref.abs().max().item() + 1e-7)


def test_ort_runs_the_8bit_activations_on_integer_kernels(tmp_path):
    model = quantize_model(tiny_bert(), text_batches(), QDropConfig(n_bits_w=8, n_bits_a=8, iters_w=0, num_samples=16),
                           progress=False)
    path = export_onnx(model, tmp_path, text_batches()[0])
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    ops = Counter(n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node)
    linear = sum(isinstance(m, QuantLayer) for m in model.modules())
    assert ops["MatMulIntegerToFloat"] + ops["QLinearMatMul"] + ops["MatMulInteger"] >= linear - 2, ops


def test_tiny_resnet_at_4bit_activations_clips_to_the_grid_and_matches(tmp_path):
    model = quantize_model(tiny_resnet(), image_batches(), QDropConfig(n_bits_w=4, n_bits_a=4, iters_w=5, num_samples=16),
                           progress=False)
    x = image_batches()[0]
    path = export_onnx(model, tmp_path, x)
    ops = Counter(n.op_type for n in onnx.load(str(path)).graph.node)
    four_bit = [m for m in model.modules() if isinstance(m, ActQuantizer) and m.active and m.n_bits == 4]
    assert ops["Clip"] >= len(four_bit) and ops["QuantizeLinear"] >= len(four_bit)
    ref, out = logits(model, x), OnnxModel(path)(x.contiguous()).logits
    # a value at a rounding boundary may land one 4-bit step apart under another summation order
    assert (out - ref).norm() / ref.norm() < 0.05
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.85


@pytest.mark.parametrize("n_bits_w", [4, 8])
def test_runner_gives_float_layers_constant_weights_and_the_same_outputs(tmp_path, n_bits_w):
    """4-bit weights: symmetric, their convolutions stay QLinearConv, the others (before a residual
    add) fold; 8-bit: asymmetric, every convolution folds and ORT must not quantize them again."""
    model = quantize_model(tiny_resnet(), image_batches(), QDropConfig(n_bits_w=n_bits_w, n_bits_a=8, iters_w=0,
                                                                       num_samples=16), progress=False)
    x = image_batches()[0].contiguous()
    path = export_onnx(model, tmp_path, x)
    graph = onnx.load(str(path))
    convs = sum(n.op_type == "Conv" for n in graph.graph.node)
    folded, without = fold_float_weights(graph.graph)
    onnx.save(graph, str(tmp_path / "folded.onnx"))

    def run(file, without=()):
        options = ort.SessionOptions()
        options.optimized_model_filepath = str(tmp_path / f"optimized-{file.name}")
        session = ort.InferenceSession(str(file), options, providers=["CPUExecutionProvider"],
                                       disabled_optimizers=list(without))
        ops = Counter(n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node)
        return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0], ops["QLinearConv"]

    (exported, fused), (out, fused_after) = run(path), run(tmp_path / "folded.onnx", without)
    if n_bits_w == 4:
        assert 0 < folded < convs and not without  # the stem's 8-bit weights and the convolutions before an add
        assert fused_after == fused > 0
    else:
        assert folded == convs + 1 and without == ["WeightBiasQuantization"]  # and the classifier
        assert fused > 0 and fused_after == 0  # no float weight quantized again on a grid of ORT's own
    ref = logits(model, x).numpy()
    # ORT's float convolutions sum in another order than PyTorch's (which order depends on the CPU):
    # a value on a rounding boundary of the next 8-bit grid may land one step apart
    for y in (exported, out):
        assert np.linalg.norm(y - ref) / np.linalg.norm(ref) < 0.01
        assert (y.argmax(-1) == ref.argmax(-1)).all()


def test_real_minilm_sst2_exports_and_agrees_with_pytorch(tmp_path):
    from transformers import AutoTokenizer

    from conftest import require_shared

    data = require_shared()
    model, _ = minilm_sst2(layers=6)
    tok = AutoTokenizer.from_pretrained(data / "models" / "minilm-l6-sst2")
    rows = [line.split("\t")[0] for line in (data / "glue/sst2/validation.tsv").read_text().splitlines()[1:129]]
    batches = [dict(tok(rows[i:i + 32], padding=True, return_tensors="pt")) for i in range(0, len(rows), 32)]
    model = quantize_model(model, batches[:2], QDropConfig(n_bits_w=8, n_bits_a=8, iters_w=0, num_samples=64),
                           progress=False)
    runner = OnnxModel(export_onnx(model, tmp_path, batches[0], tok))
    assert (tmp_path / "onnx" / "tokenizer.json").exists()
    ref = torch.cat([logits(model, b) for b in batches])
    out = torch.cat([runner(**b).logits for b in batches])
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.99
    assert (out - ref).abs().max() < 0.05 * ref.abs().max()


def test_export_refuses_float_unfinished_and_unwritable(tmp_path, monkeypatch):
    from qdrop_hf.plan import prepare_model

    with pytest.raises(ExportError, match="not quantized"):
        export_onnx(tiny_bert(), tmp_path / "float", text_batches()[0])
    unfinished = tiny_bert()
    prepare_model(unfinished, QDropConfig(n_bits_w=4, n_bits_a=8), text_batches()[0], torch.device("cpu"))
    with pytest.raises(ExportError, match="reconstruction is not finished"):
        export_onnx(unfinished, tmp_path / "unfinished", text_batches()[0])
    model = quantize_model(tiny_bert(), text_batches(), QDropConfig(n_bits_w=4, n_bits_a=8, iters_w=0, num_samples=16),
                           progress=False)
    (tmp_path / "a_file").write_text("")
    with pytest.raises(ExportError, match="cannot write to"):
        export_onnx(model, tmp_path / "a_file" / "out", text_batches()[0])

    def failing_export(*args, **kwargs):
        raise RuntimeError("outer") from NotImplementedError("aten::weird_op has no ONNX translation")

    monkeypatch.setattr(torch.onnx, "export", failing_export)
    with pytest.raises(ExportError, match="weird_op has no ONNX translation"):
        export_onnx(model, tmp_path / "failed", text_batches()[0])
    assert list((tmp_path / "failed").iterdir()) == []  # nothing half-written
    assert not (tmp_path / "float").exists() and not (tmp_path / "unfinished").exists()
