"""Outlier migration of the LayerNorm outputs and the FFN activation, token-wise activation ranges
and 8-bit roles."""
import pytest
import torch
from torch import nn

from conftest import text_batches, tiny_bert
from test_families import tiny_text
from qdrop_hf import QDropConfig, load_quantized, quantize_model, save_quantized
from qdrop_hf.config import QDropConfigError
from qdrop_hf.families import find_family
from qdrop_hf.migration import ffn_activations, layernorm_sites, migrate_ffn_outliers, migrate_layernorm_outputs
from qdrop_hf.nn import RescaledLayerNorm
from qdrop_hf.observers import ActivationObserver
from qdrop_hf.plan import prepare_model, set_quant_state

OUTLIERS = (3, 17, 40)
LN_OUTLIERS = [5, 11]


def bert_with_outliers(factor=40.0):
    """A tiny BERT whose FFN activation carries a few channels ``factor`` times the others, as the
    hidden channels of fine-tuned BERT-family models do; the float function stays about the same."""
    model = tiny_bert()
    with torch.no_grad():
        for layer in model.bert.encoder.layer:
            for j in OUTLIERS:
                layer.intermediate.dense.weight[j] *= factor
                layer.intermediate.dense.bias[j] = factor
                layer.output.dense.weight[:, j] /= factor
    return model


def with_layernorm_outliers(model, factor=20.0):
    """Every LayerNorm's output with a few channels ``factor`` times the others, off centre."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight[LN_OUTLIERS] *= factor
                m.bias[LN_OUTLIERS] += factor / 2
    return model


def tiny_vit():
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    return ViTForImageClassification(ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                               num_attention_heads=4, intermediate_size=64, num_labels=5)).eval()


def logits(model, batches):
    with torch.no_grad():
        return torch.cat([model(**b).logits for b in batches])


def ffn_inputs(model, batches):
    """The FFN activation as its quantizer passes it on (after the migration's scale), per layer."""
    got = []
    hooks = [layer.output.dense.register_forward_pre_hook(lambda m, a: got.append(a[0].reshape(-1, a[0].shape[-1])))
             for layer in model.bert.encoder.layer]
    logits(model, batches)
    for h in hooks:
        h.remove()
    return got


def test_migration_keeps_the_float_function_and_narrows_the_outlier_channels():
    model, batches = bert_with_outliers(), text_batches()
    reference = logits(model, batches)
    config = QDropConfig(n_bits_w=4, n_bits_a=4, iters_w=0, num_samples=32)
    prepare_model(model, config, batches[0], torch.device("cpu"))
    set_quant_state(model, weights=False, acts=False)
    before = ffn_inputs(model, batches)
    chosen = migrate_ffn_outliers(model, find_family(model), batches, torch.device("cpu"))
    assert set(chosen) == {f"bert.encoder.layer.{i}.intermediate" for i in range(2)}
    set_quant_state(model, weights=False, acts=False)
    torch.testing.assert_close(logits(model, batches), reference, rtol=1e-5, atol=1e-5)
    for x, y in zip(before, ffn_inputs(model, batches)):
        peak_x, peak_y = x.abs().amax(0), y.abs().amax(0)
        assert bool((peak_y <= peak_x * (1 + 1e-6)).all())  # no channel wider
        assert float(peak_y.max()) < 0.5 * float(peak_x.max())  # the outlier channels much narrower
        assert float(peak_y[list(OUTLIERS)].max()) < 0.5 * float(peak_x[list(OUTLIERS)].min())


@pytest.mark.parametrize("kind", ["bert", "electra", "distilbert", "vit"])
def test_layernorm_migration_keeps_the_float_function_and_narrows_the_layernorm_outputs(kind):
    """Shift and scale folded into each LayerNorm and the Linear layers reading it (and, post-LN, the
    residual branch and the next LayerNorm): the same outputs to 1e-5, the consumers' inputs with
    their outlier channels brought down to the others' range."""
    model = with_layernorm_outliers(tiny_vit() if kind == "vit" else tiny_bert() if kind == "bert" else tiny_text(kind))
    batches = [torch.randn(8, 3, 32, 32) for _ in range(2)] if kind == "vit" else text_batches()

    def outputs():
        with torch.no_grad():
            return torch.cat([(model(b) if kind == "vit" else model(**b)).logits for b in batches])
    reference = outputs()
    prepare_model(model, QDropConfig(n_bits_w=4, n_bits_a=4, num_samples=16), batches[0], torch.device("cpu"))
    set_quant_state(model, weights=False, acts=False)
    modules = dict(model.named_modules())
    sites = [site for site, _ in layernorm_sites(model, find_family(model))]
    assert len(sites) == 4 and sum(site.residual is not None for site in sites) == {"vit": 0, "electra": 3}.get(kind, 4)

    def consumer_peaks():
        got = []
        hooks = [modules[site.consumers[0]].register_forward_pre_hook(
            lambda m, a: got.append(a[0].reshape(-1, a[0].shape[-1]).abs().amax(0))) for site in sites]
        outputs()
        for h in hooks:
            h.remove()
        return got
    before = consumer_peaks()
    chosen = migrate_layernorm_outputs(model, find_family(model), batches, torch.device("cpu"))
    assert set(chosen) == {site.layernorm for site in sites}
    set_quant_state(model, weights=False, acts=False)
    torch.testing.assert_close(outputs(), reference, rtol=1e-5, atol=1e-5)
    for peak_x, peak_y in zip(before, consumer_peaks()):
        assert float(peak_y.max()) < 0.5 * float(peak_x[LN_OUTLIERS].min())
    rescaled = [m for m in model.modules() if isinstance(m, RescaledLayerNorm) and m.input_scale is not None]
    assert len(rescaled) == sum(site.residual is not None for site in sites)


def test_migration_lowers_round_to_nearest_error_with_outlier_channels():
    """W8A4 round-to-nearest on the tiny BERT with outlier channels: the FFN's output (``output.dense``,
    in every layer) moves much less from the float model's with the migration than without. (The
    LayerNorm part is left out here: it rescales ``output.dense``'s own output.)"""
    batches = text_batches()

    def hidden(model):
        got = []
        hooks = [layer.output.dense.register_forward_hook(lambda m, a, out: got.append(out.reshape(-1)))
                 for layer in model.bert.encoder.layer]
        logits(model, batches)
        for h in hooks:
            h.remove()
        return torch.cat(got)
    reference = hidden(bert_with_outliers())
    errors = {}
    for on in (False, True):
        config = QDropConfig(n_bits_w=8, n_bits_a=4, iters_w=0, num_samples=32, outlier_migration=on, migrate=["ffn_act"])
        model = quantize_model(bert_with_outliers(), batches, config, progress=False)
        errors[on] = float((hidden(model) - reference).pow(2).mean() / reference.pow(2).mean())
        assert ("outlier_migration" in model.qdrop_report) == on
    assert errors[True] < 0.5 * errors[False], errors


def test_layernorm_migration_lowers_round_to_nearest_error_with_outlier_channels():
    """W8A4 round-to-nearest on the tiny BERT with outlier channels in its LayerNorm outputs too: the
    last layer's output moves less from the float model's with the LayerNorm outputs migrated
    than with the FFN activation alone."""
    batches = text_batches()

    def hidden(model):
        with torch.no_grad():
            return torch.cat([model.bert(**b).last_hidden_state.reshape(-1) for b in batches])
    reference = hidden(with_layernorm_outliers(bert_with_outliers()))
    errors = {}
    for parts in (["ffn_act"], ["ffn_act", "layernorm"]):
        config = QDropConfig(n_bits_w=8, n_bits_a=4, iters_w=0, num_samples=32, migrate=parts)
        model = quantize_model(with_layernorm_outliers(bert_with_outliers()), batches, config, progress=False)
        assert set(model.qdrop_report["outlier_migration"]) == set(parts)
        errors[len(parts)] = float((hidden(model) - reference).pow(2).mean() / reference.pow(2).mean())
    assert errors[2] < 0.75 * errors[1], errors  # 0.62x here
    with pytest.raises(QDropConfigError, match="migrate"):
        QDropConfig(migrate=["attention"])


def test_migration_defaults_to_low_bit_activations_and_reloads_bit_identically(tmp_path):
    batches = text_batches()
    eight = quantize_model(bert_with_outliers(), batches, QDropConfig(n_bits_w=4, n_bits_a=8, iters_w=0, num_samples=16),
                           progress=False)
    assert "outlier_migration" not in eight.qdrop_report
    model = quantize_model(with_layernorm_outliers(bert_with_outliers()), batches,
                           QDropConfig(n_bits_w=4, n_bits_a=4, iters_w=2, num_samples=16, batch_size=8), progress=False)
    assert model.qdrop_report["outlier_migration"]["layernorm"] and model.qdrop_report["outlier_migration"]["ffn_act"]
    q = ffn_activations(model, find_family(model))[0][1]
    assert q.channel_scale is not None and float(q.channel_scale.max()) > 1
    save_quantized(model, None, tmp_path)
    reloaded = load_quantized(tmp_path)
    assert torch.equal(logits(reloaded, batches), logits(model, batches))
    scales = {n: m.input_scale for n, m in reloaded.named_modules() if isinstance(m, RescaledLayerNorm)}
    assert any(s is not None and float(s.max()) > 1 for s in scales.values())
    assert "outlier migration" in (tmp_path / "README.md").read_text()


def test_keep_8bit_ffn_act_and_attention_roles():
    batches = text_batches()
    config = QDropConfig(n_bits_w=4, n_bits_a=4, iters_w=0, num_samples=16, keep_8bit=["ffn_act"], outlier_migration=False)
    model = quantize_model(tiny_bert(), batches, config, progress=False)
    layer = model.bert.encoder.layer[0]
    assert layer.intermediate.qdrop_out.n_bits == 8
    assert layer.attention.self.qdrop_attn.probs.n_bits == 4 and layer.attention.output.qdrop_out.n_bits == 4
    config = QDropConfig(n_bits_w=4, n_bits_a=4, iters_w=0, num_samples=16, keep_8bit=["attention"], outlier_migration=False)
    model = quantize_model(tiny_bert(), batches, config, progress=False)
    attn = model.bert.encoder.layer[1].attention.self.qdrop_attn
    assert {q.n_bits for q in attn.children()} == {8} and model.bert.encoder.layer[1].intermediate.qdrop_out.n_bits == 4
    with pytest.raises(QDropConfigError, match="keep_8bit"):
        QDropConfig(keep_8bit=["ffn"])


def test_tokenwise_range_is_not_set_by_a_few_outlier_tokens():
    """Two tokens in a hundred carry 50x values (a [SEP]-like token): the token-wise range clips them
    and quantizes the other tokens finer than the min/max range does."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 50, 64, generator=g)
    x[:, 0] *= 50.0
    ranges = {}
    for mode in ("minmax", "tokenwise"):
        obs = ActivationObserver(generator=g, tokens=mode == "tokenwise")
        obs.update(x)
        ranges[mode] = obs.compute(4, mode)
    (s_mm, z_mm), (s_tw, z_tw) = ranges["minmax"], ranges["tokenwise"]
    assert float(s_tw) * (15 - float(z_tw)) < 0.2 * float(x.max())

    def err(scale, zp):
        normal = x[:, 1:]
        q = torch.clamp(torch.round(normal / scale), -zp, 15 - zp) * scale
        return float((q - normal).pow(2).mean())
    assert err(s_tw, z_tw) < 0.1 * err(s_mm, z_mm)


def test_migrated_model_exports_its_channel_scale_to_onnx(tmp_path):
    """The exported graph divides the FFN activation by the migration's scale (a constant of the
    graph) before its QuantizeLinear, the migrated LayerNorm outputs are scaled back on their
    residual, and ONNX Runtime's logits are PyTorch's."""
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from onnx import numpy_helper

    from qdrop_hf.integration.onnx_export import OnnxModel, export_onnx

    batches = text_batches()
    model = quantize_model(with_layernorm_outliers(bert_with_outliers()), batches,
                           QDropConfig(n_bits_w=8, n_bits_a=4, iters_w=0, num_samples=16), progress=False)
    assert model.qdrop_report["outlier_migration"]["layernorm"]
    path = export_onnx(model, tmp_path, batches[0])
    runner = OnnxModel(path)
    ref = logits(model, batches)
    out = torch.cat([runner(**b).logits for b in batches])
    torch.testing.assert_close(out, ref, rtol=0, atol=2e-3 * float(ref.abs().max()))
    graph = onnx.load(str(path)).graph
    constants = [numpy_helper.to_array(t) for t in graph.initializer]
    constants += [numpy_helper.to_array(a.t) for n in graph.node if n.op_type == "Constant" for a in n.attribute if a.name == "value"]
    scales = [q.channel_scale for _, q, _ in ffn_activations(model, find_family(model))]
    scales += [m.input_scale for m in model.modules() if isinstance(m, RescaledLayerNorm) and m.input_scale is not None]
    for scale in scales:
        scale = scale.numpy()
        assert any(c.shape == scale.shape and (abs(c - scale).max() < 1e-6 or abs(c * scale - 1).max() < 1e-5)
                   for c in constants)
