"""Every registered family quantizes a tiny random model of its kind end to end."""
import pytest
import torch

from conftest import text_batches, tiny_cnn
from qdrop_hf import QDropConfig, quantize_model
from qdrop_hf.quantizers import ActQuantizer


def tiny_text(kind):
    import transformers as tf

    torch.manual_seed(0)
    if kind == "distilbert":
        config = tf.DistilBertConfig(vocab_size=120, dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_position_embeddings=64)
        return tf.DistilBertForSequenceClassification(config).eval()
    cls = {"roberta": (tf.RobertaConfig, tf.RobertaForSequenceClassification),
           "electra": (tf.ElectraConfig, tf.ElectraForSequenceClassification),
           "bert-qa": (tf.BertConfig, tf.BertForQuestionAnswering)}[kind]
    config = cls[0](vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                    max_position_embeddings=80, embedding_size=16 if kind == "electra" else None)
    return cls[1](config).eval()


@pytest.mark.parametrize("kind", ["roberta", "electra", "distilbert", "bert-qa"])
def test_text_families(kind):
    model = tiny_text(kind)
    config = QDropConfig(n_bits_w=4, n_bits_a=4, iters_w=5, num_samples=16, batch_size=8)
    model = quantize_model(model, text_batches(), config, progress=False)
    kinds = [u["kind"] for u in model.qdrop_report["units"]]
    assert kinds.count("body") == 2 and "head" in kinds
    attention = [n for n, m in model.named_modules() if n.endswith("qdrop_attn")]
    assert len(attention) == 2
    assert all(bool(q.initialized) for q in model.modules() if isinstance(q, ActQuantizer))
    with torch.no_grad():
        out = model(**text_batches()[0])
    assert all(torch.isfinite(v).all() for v in out.values() if isinstance(v, torch.Tensor))


def test_vit_family():
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    model = ViTForImageClassification(ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                                num_attention_heads=4, intermediate_size=64, num_labels=5)).eval()
    images = [torch.randn(8, 3, 32, 32) for _ in range(2)]
    model = quantize_model(model, images, QDropConfig(n_bits_w=4, n_bits_a=4, iters_w=20, num_samples=16, batch_size=8),
                           progress=False)
    units = model.qdrop_report["units"]
    assert [u["kind"] for u in units] == ["stem", "body", "body", "head"]
    assert all(u["error"] <= u["rtn_error"] * 1.01 for u in units)
    bits = {n: m.n_bits for n, m in model.named_modules() if isinstance(m, ActQuantizer)}
    assert bits["vit.layernorm.qdrop_out"] == 8 and bits["vit.layers.0.mlp.fc2.qdrop_in"] == 4
    with torch.no_grad():
        assert torch.isfinite(model(images[0]).logits).all()


@pytest.mark.parametrize("kind,blocks,points", [
    ("regnet", 3, ["regnet.encoder.stages.1.layers.0.layer.2.qdrop_out",   # squeeze-excite output
                   "regnet.encoder.stages.1.layers.0.layer.0.qdrop_out",   # ReLU'd conv inside a block
                   "regnet.encoder.stages.1.layers.0.qdrop_out"]),         # block output
    ("mobilenet_v2", 16, ["mobilenet_v2.layer.3.expand_1x1.qdrop_out", "mobilenet_v2.layer.3.conv_3x3.qdrop_out",
                          "mobilenet_v2.layer.3.qdrop_out", "mobilenet_v2.conv_stem.qdrop_out"]),
])
def test_cnn_families(kind, blocks, points):
    model = tiny_cnn(kind)
    images = [torch.randn(8, 3, 32, 32) for _ in range(2)]
    with torch.no_grad():
        ref = model(images[0]).logits
    model = quantize_model(model, images, QDropConfig(n_bits_w=4, n_bits_a=4, iters_w=10, num_samples=16, batch_size=8),
                           progress=False)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    units = model.qdrop_report["units"]
    assert sum(u["kind"] == "body" for u in units) == blocks
    assert units[0]["kind"] == "stem" and units[-1]["kind"] == "head"
    names = {n for n, m in model.named_modules() if isinstance(m, ActQuantizer)}
    assert set(points) <= names
    unexpected = [n for n in names if n.endswith("reduce_1x1.qdrop_out") or n.endswith("layer.3.qdrop_out")
                  and "layers.0.layer" in n]
    assert not unexpected  # linear (un-activated) convolutions feed the residual add, unquantized
    with torch.no_grad():
        out = model(images[0]).logits
    assert torch.isfinite(out).all() and out.shape == ref.shape
