"""Save a quantized model, reload it in a fresh process, get bit-identical logits."""
import json
from dataclasses import fields
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from conftest import ROOT, image_batches, text_batches, tiny_bert, tiny_resnet
from qdrop_hf import QDropConfig, RuntimeConfig, quantize_model
from qdrop_hf.integration.serialization import load_quantized, save_quantized
from qdrop_hf.integration.packing import pack_codes, unpack_codes

RELOAD = """
import sys, torch
sys.path.insert(0, {root!r})
from qdrop_hf.integration.serialization import load_quantized
model = load_quantized({path!r})
inputs = torch.load({inputs!r}, weights_only=True)
with torch.no_grad():
    out = model(**inputs) if isinstance(inputs, dict) else model(inputs)
torch.save(getattr(out, "logits", out), {out!r})
"""


@pytest.mark.parametrize("n_bits", range(2, 9))
def test_pack_round_trip_and_size(n_bits):
    codes = torch.randint(0, 2**n_bits, (7, 13), dtype=torch.uint8)
    packed = pack_codes(codes, n_bits)
    assert packed.numel() == -(-codes.numel() * n_bits // 8)
    assert torch.equal(unpack_codes(packed, n_bits, codes.shape), codes)


def cifar_resnet20():
    from qdrop_hf.tasks.archs import build_arch

    torch.manual_seed(0)
    return build_arch("resnet20")


@pytest.mark.parametrize("make_model,make_data", [(tiny_bert, text_batches), (tiny_resnet, image_batches),
                                                  (cifar_resnet20, image_batches)], ids=["bert", "resnet", "builtin-resnet20"])
def test_reload_in_fresh_process_gives_identical_logits(tmp_path, make_model, make_data):
    config = QDropConfig(n_bits_w=3, n_bits_a=4, iters_w=10, num_samples=16, batch_size=8)
    model = quantize_model(make_model(), make_data(), config, progress=False)
    inputs = make_data()[0]
    with torch.no_grad():
        out = model(**inputs) if isinstance(inputs, dict) else model(inputs)
        expected = getattr(out, "logits", out)
    save_quantized(model, None, tmp_path / "q")
    torch.save(inputs, tmp_path / "inputs.pt")
    script = RELOAD.format(root=str(ROOT), path=str(tmp_path / "q"), inputs=str(tmp_path / "inputs.pt"),
                           out=str(tmp_path / "out.pt"))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert torch.equal(torch.load(tmp_path / "out.pt"), expected)

    files = sorted(p.name for p in (tmp_path / "q").iterdir())
    assert files == ["README.md", "config.json", "model.safetensors", "reconstruction.png"]
    assert (tmp_path / "q" / "reconstruction.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert saved["quant_method"] == "qdrop" and saved["n_bits_w"] == 3
    assert not set(saved) & {f.name for f in fields(RuntimeConfig)}  # runtime settings stay out of the model
    with safe_open(str(tmp_path / "q" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    packed = [k for k in keys if k.endswith("weight_quantizer.packed")]
    assert packed and not any(k[: -len("weight_quantizer.packed")] + "weight" in keys for k in packed)


def test_loading_a_float_checkpoint_is_refused(tmp_path):
    tiny_bert().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="not a qdrop-quantized"):
        load_quantized(tmp_path)


def test_automodel_from_pretrained_rebuilds_the_quantized_model(tmp_path):
    from transformers import AutoModelForSequenceClassification

    model = quantize_model(tiny_bert(), text_batches(), QDropConfig(n_bits_w=4, n_bits_a=8, iters_w=5, num_samples=16),
                           progress=False)
    save_quantized(model, None, tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert "import qdrop_hf" in saved["load_with"]
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path)
    batch = text_batches()[0]
    with torch.no_grad():
        assert torch.equal(reloaded(**batch).logits, model(**batch).logits)
    assert reloaded.bert.encoder.layer[0].intermediate.dense.weight_quantizer.hardened
    save_quantized(reloaded, None, tmp_path / "again")  # a reloaded model saves the same tensors
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as a, safe_open(str(tmp_path / "again/model.safetensors"), "pt") as b:
        assert set(a.keys()) == set(b.keys()) and all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())


def packed_keys(path) -> set[str]:
    with safe_open(str(path), "pt") as f:
        return {k for k in f.keys() if k.endswith("weight_quantizer.packed")}


def test_save_pretrained_of_a_fresh_and_a_reloaded_model_writes_the_packed_format(tmp_path):
    from transformers import AutoModelForSequenceClassification

    model = quantize_model(tiny_bert(), text_batches(), QDropConfig(n_bits_w=4, n_bits_a=8, iters_w=5, num_samples=16),
                           progress=False)
    model.save_pretrained(tmp_path / "fresh")
    assert len(packed_keys(tmp_path / "fresh/model.safetensors")) == 2 * 6 + 2  # 2 layers x 6 Linears, pooler, classifier
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "fresh")
    reloaded.save_pretrained(tmp_path / "again")
    twice = AutoModelForSequenceClassification.from_pretrained(tmp_path / "again")
    batch = text_batches()[0]
    with torch.no_grad():
        expected = model(**batch).logits
        assert torch.equal(reloaded(**batch).logits, expected) and torch.equal(twice(**batch).logits, expected)


def test_push_to_hub_uploads_the_packed_format(tmp_path, monkeypatch):
    """``model.push_to_hub`` is save_pretrained into a temporary folder plus one commit: the commit
    carries the packed checkpoint (the Hub calls are replaced here; no hub is reachable)."""
    from types import SimpleNamespace

    from huggingface_hub import HfApi

    uploaded = {}

    def create_commit(self, repo_id, operations, **kwargs):
        for op in operations:
            uploaded[op.path_in_repo] = open(op.path_or_fileobj, "rb").read()
        return SimpleNamespace(commit_url=f"https://hub/{repo_id}/commit/1", oid="1", pr_url=None)

    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: SimpleNamespace(repo_id=repo_id))
    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    model = quantize_model(tiny_bert(), text_batches(), QDropConfig(n_bits_w=4, n_bits_a=8, iters_w=0, num_samples=16),
                           progress=False)
    model.push_to_hub("user/tiny-w4a8")
    assert {"config.json", "model.safetensors"} <= set(uploaded)
    (tmp_path / "model.safetensors").write_bytes(uploaded["model.safetensors"])
    assert len(packed_keys(tmp_path / "model.safetensors")) == 14
    assert json.loads(uploaded["config.json"])["quantization_config"]["quant_method"] == "qdrop"


def test_pipelines_run_the_quantized_model(tmp_path):
    """text-classification and image-classification pipelines on quantized models, their scores those
    of the quantized model's own forward (transformers 5 has no question-answering pipeline)."""
    from PIL import Image
    from transformers import BertTokenizerFast, ViTImageProcessor, pipeline

    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(115)]))
    tokenizer = BertTokenizerFast(vocab_file=str(vocab))
    config = QDropConfig(n_bits_w=4, n_bits_a=8, iters_w=0, num_samples=16)
    model = quantize_model(tiny_bert(), text_batches(), config, progress=False)
    with torch.no_grad():
        expected = torch.softmax(model(**tokenizer(["w1 w2 w3"], return_tensors="pt")).logits, -1).max().item()
    (out,) = pipeline("text-classification", model=model, tokenizer=tokenizer)(["w1 w2 w3"])
    assert out["score"] == pytest.approx(expected, rel=1e-6)

    processor = ViTImageProcessor(size={"height": 32, "width": 32})
    image = Image.fromarray((torch.rand(40, 40, 3) * 255).to(torch.uint8).numpy())
    vision = quantize_model(tiny_resnet(), image_batches(), config, progress=False)
    with torch.no_grad():
        probs = torch.softmax(vision(**processor(image, return_tensors="pt")).logits, -1)[0]
    top = pipeline("image-classification", model=vision, image_processor=processor)(image, top_k=1)[0]
    assert top["score"] == pytest.approx(probs.max().item(), rel=1e-5)


def test_from_pretrained_cannot_quantize_without_calibration(tmp_path):
    from transformers import AutoModelForSequenceClassification

    from qdrop_hf.integration.hf_quantizer import QDropQuantizationConfig

    tiny_bert().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="pre-quantized"):
        AutoModelForSequenceClassification.from_pretrained(tmp_path, quantization_config=QDropQuantizationConfig())


def test_model_card_and_exactly_the_files_an_upload_carries(tmp_path):
    from transformers import BertTokenizerFast

    from qdrop_hf.integration.hub import upload_files

    model = quantize_model(tiny_bert(), text_batches(), QDropConfig(n_bits_w=4, n_bits_a=8, iters_w=0, num_samples=16),
                           progress=False)
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(115)]))
    tokenizer = BertTokenizerFast(vocab_file=str(vocab))
    results = {"fp": {"accuracy": 0.876}, "quant": {"accuracy": 0.874}}
    out = tmp_path / "q"
    save_quantized(model, tokenizer, out, results, calibration="256 random rows of train.tsv")
    (out / "results.json").write_text(json.dumps(results))
    (out / "scratch.log").write_text("not for upload")
    card = (out / "README.md").read_text()
    for needle in ("W4A8", "4-bit, per output channel", "256 random rows of train.tsv", "| accuracy | 0.8760 | 0.8740 |",
                   "import qdrop_hf", "BertForSequenceClassification.from_pretrained", "library_name: transformers"):
        assert needle in card, needle
    assert upload_files(out) == ["README.md", "config.json", "model.safetensors", "reconstruction.png", "results.json",
                                 "tokenizer.json", "tokenizer_config.json"]
