"""Quantized Linear layers and 1x1 convolutions on the int8 GEMM: which activation quantizer feeds each,
the same outputs as the dequantizing path, kept through save → reload, and 8-bit weights left off it
without VNNI."""
import pytest
import torch

from conftest import image_batches, text_batches, tiny_bert, tiny_cnn
from qdrop_hf import QDropConfig, quantize_model
from qdrop_hf import integer_linear
from qdrop_hf.nn import QuantConv2d, QuantLinear

pytestmark = pytest.mark.skipif(not integer_linear.available(), reason="torch without fbgemm")


def quantized(n_bits_w=4):
    return quantize_model(tiny_bert(), text_batches(), QDropConfig(n_bits_w=n_bits_w, n_bits_a=8, iters_w=5, num_samples=16),
                          progress=False)


def logits_without_int8(model, batch):
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    saved = [m.int8_gemm for m in layers]
    for m in layers:
        m.int8_gemm = None
    try:
        with torch.no_grad():
            return model(**batch).logits
    finally:
        for m, s in zip(layers, saved):
            m.int8_gemm = s


def test_each_linear_is_linked_to_the_quantizer_that_feeds_it():
    links = quantized().qdrop_input_quantizers
    for i in range(2):
        prefix = f"bert.encoder.layer.{i}."
        before = "bert.embeddings.qdrop_out" if i == 0 else f"bert.encoder.layer.{i - 1}.qdrop_out"
        assert links[prefix + "attention.self.query"] == links[prefix + "attention.self.value"] == before
        assert links[prefix + "attention.output.dense"] == prefix + "attention.self.qdrop_attn.context"
        assert links[prefix + "intermediate.dense"] == prefix + "attention.output.qdrop_out"
        assert links[prefix + "output.dense"] == prefix + "intermediate.qdrop_out"
    assert links["classifier"] == "bert.pooler.qdrop_out"
    assert "bert.pooler.dense" not in links  # its input is the first token's slice: not a quantizer's output


def test_int8_gemm_gives_the_dequantized_logits_and_survives_reload(tmp_path):
    from transformers import AutoModelForSequenceClassification

    model = quantized()
    packed = [m for m in model.modules() if isinstance(m, QuantLinear) and m.int8_gemm is not None]
    assert len(packed) == len(model.qdrop_input_quantizers)
    assert not any("codes" in m.weight_quantizer._buffers for m in packed)  # the packed weight is the only copy
    batch = text_batches()[1]
    with torch.no_grad():
        fast = model(**batch).logits
    slow = logits_without_int8(model, batch)  # dequantizes the codes read back from the packed weights
    assert torch.allclose(fast, slow, rtol=1e-4, atol=1e-5 * slow.abs().max().item())
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path)
    assert reloaded.qdrop_input_quantizers == model.qdrop_input_quantizers
    assert sum(m.int8_gemm is not None for m in reloaded.modules() if isinstance(m, QuantLinear)) == len(packed)
    with torch.no_grad():
        assert torch.equal(reloaded(**batch).logits, fast)


def test_without_vnni_only_weights_of_at_most_7_bits_use_the_int8_gemm(monkeypatch):
    monkeypatch.setattr(integer_linear, "_has_vnni", lambda: False)
    body = [m for n, m in quantized(n_bits_w=8).named_modules() if isinstance(m, QuantLinear) and "encoder" in n]
    assert body and all(m.int8_gemm is None for m in body)  # uint8 x int8 pairs would saturate int16
    body = [m for n, m in quantized(n_bits_w=4).named_modules() if isinstance(m, QuantLinear) and "encoder" in n]
    assert all(m.int8_gemm is not None for m in body)


def test_pointwise_convolutions_run_on_the_int8_gemm_layer_for_layer_and_survive_reload(tmp_path):
    from transformers import AutoModelForImageClassification

    images = image_batches(n_batches=2, batch=4)
    model = quantize_model(tiny_cnn("mobilenet_v2"), images, QDropConfig(n_bits_w=4, n_bits_a=8, iters_w=5, num_samples=8, batch_size=4),
                           progress=False)
    convs = {n: m for n, m in model.named_modules() if isinstance(m, QuantConv2d)}
    packed = {n for n, m in convs.items() if m.int8_gemm is not None}
    # every 1x1 convolution (expand, reduce, head) is fed by a quantizer; 3x3 and depthwise ones dequantize
    assert packed == {n for n, m in convs.items() if m.pointwise} and len(packed) == 1 + 2 * 16 + 1

    errors, layouts = [], []

    def compare(layer, args, out):  # the same layer on the same input through its dequantized weight
        gemm, layer.int8_gemm = layer.int8_gemm, None
        ref = layer.forward(args[0])
        layer.int8_gemm = gemm
        errors.append(((out - ref).norm() / ref.norm()).item())
        layouts.append(out.is_contiguous(memory_format=torch.channels_last))

    hooks = [convs[n].register_forward_hook(compare) for n in packed]
    with torch.no_grad():
        logits = model(images[1]).logits
    for h in hooks:
        h.remove()
    assert len(errors) == len(packed) and max(errors) < 1e-5 and all(layouts)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForImageClassification.from_pretrained(tmp_path)
    assert {n for n, m in reloaded.named_modules() if isinstance(m, QuantConv2d) and m.int8_gemm is not None} == packed
    with torch.no_grad():
        assert torch.equal(reloaded(images[1]).logits, logits)
