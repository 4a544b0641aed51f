import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, os.cpu_count() or 1))


def require_shared() -> Path:
    """The real offline assets. Missing in CI is a failure (a suite that skipped them would pass
    while testing nothing real); elsewhere the tests that need them are skipped."""
    if not SHARED.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{SHARED} is missing: CI runs with ../shared beside the checkout")
        pytest.skip("../shared/data is not beside this checkout")
    return SHARED


@pytest.fixture
def shared_data():
    return require_shared()


def pytest_collection_modifyitems(items):
    """Tests on the real offline assets are ``integration`` ones: ``pytest -m "not integration"``
    runs the rest where ``../shared`` is absent."""
    for item in items:
        source = getattr(getattr(item, "function", None), "__code__", None)
        if "shared_data" in item.fixturenames or (source and "minilm_sst2" in source.co_names):
            item.add_marker(pytest.mark.integration)


def tiny_bert(num_labels=2, layers=2, seed=0):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64, num_labels=num_labels)
    return BertForSequenceClassification(config).eval()


def text_batches(n_batches=4, batch=8, seq=12, vocab=120, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        ids = torch.randint(5, vocab, (batch, seq), generator=g)
        mask = torch.ones(batch, seq, dtype=torch.long)
        mask[: batch // 2, seq - 3:] = 0
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def tiny_resnet(seed=0):
    from transformers import ResNetConfig, ResNetForImageClassification

    torch.manual_seed(seed)
    config = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", num_labels=5)
    model = ResNetForImageClassification(config).eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics, so that folding is tested for real
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return model


def tiny_cnn(kind):
    import transformers as tf

    torch.manual_seed(0)
    if kind == "regnet":
        return tf.RegNetForImageClassification(tf.RegNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 2],
                                                               groups_width=4, layer_type="y", num_labels=5)).eval()
    return tf.MobileNetV2ForImageClassification(tf.MobileNetV2Config(depth_multiplier=0.25, image_size=32,
                                                                     num_labels=5)).eval()


def image_batches(n_batches=4, batch=8, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 3, size, size, generator=g) for _ in range(n_batches)]


def minilm_sst2(layers=2):
    """The real fine-tuned MiniLM-L6-SST2, cut to its first ``layers`` layers, with 64 SST-2 sentences in 4 batches."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = require_shared() / "models" / "minilm-l6-sst2"
    tokenizer = AutoTokenizer.from_pretrained(path)
    lines = (SHARED / "glue" / "sst2" / "train.tsv").read_text().splitlines()[1:65]
    sentences = [line.split("\t")[0] for line in lines]
    batches = [dict(tokenizer(sentences[i:i + 16], padding=True, return_tensors="pt")) for i in range(0, 64, 16)]
    return AutoModelForSequenceClassification.from_pretrained(path, num_hidden_layers=layers).eval(), batches
