"""BERT-style encoders: BERT, RoBERTa, ELECTRA (one ``encoder.layer.N`` per block) and DistilBERT.

Activation quantizers sit where a tensor enters a matmul: embeddings output, Q/K/V, attention
probabilities and context (through the ``qdrop`` attention function), the attention block output,
the FFN activation, and each layer's output. Logits stay in float.

Being post-LN, each quantized LayerNorm output feeds Linear layers and is also added back before
the next LayerNorm (``LayerNormSite.residual``); the last layer's output, read by the head, is left
out of the outlier migration.
"""
import re

from . import Family, LayerNormSite, register_family


def _layers(model, pattern: str) -> list[str]:
    return [name for name, _ in model.named_modules() if re.search(pattern, name)]


def _bert_sites(model) -> list[LayerNormSite]:
    """Embeddings (or, in ELECTRA, the projection they feed), then per layer the attention block's
    output (into the FFN) and the layer's output (into the next layer's attention)."""
    names = {name for name, _ in model.named_modules()}
    sites, feeding = [], None  # feeding: (quantizer, LayerNorm) of the next layer's attention input
    for emb in _layers(model, r"(^|\.)embeddings$"):
        if emb + "_project" in names:  # ELECTRA: the embeddings go through a Linear layer first
            sites.append(LayerNormSite(emb, f"{emb}.LayerNorm", (emb + "_project",)))
        else:
            feeding = (emb, f"{emb}.LayerNorm")
    for layer in _layers(model, r"encoder\.layer\.\d+$"):
        att = f"{layer}.attention"
        if feeding is not None:
            sites.append(LayerNormSite(*feeding, tuple(f"{att}.self.{p}" for p in ("query", "key", "value")),
                                       (f"{att}.output.dense", f"{att}.output.LayerNorm")))
        sites.append(LayerNormSite(f"{att}.output", f"{att}.output.LayerNorm", (f"{layer}.intermediate.dense",),
                                   (f"{layer}.output.dense", f"{layer}.output.LayerNorm")))
        feeding = (layer, f"{layer}.output.LayerNorm")
    return sites


def _distilbert_sites(model) -> list[LayerNormSite]:
    sites, feeding = [], None
    for emb in _layers(model, r"(^|\.)embeddings$"):
        feeding = (emb, f"{emb}.LayerNorm")
    for layer in _layers(model, r"transformer\.layer\.\d+$"):
        if feeding is not None:
            sites.append(LayerNormSite(*feeding, tuple(f"{layer}.attention.{p}_lin" for p in "qkv"),
                                       (f"{layer}.attention.out_lin", f"{layer}.sa_layer_norm")))
        sites.append(LayerNormSite(f"{layer}.sa_layer_norm", f"{layer}.sa_layer_norm", (f"{layer}.ffn.lin1",),
                                   (f"{layer}.ffn.lin2", f"{layer}.output_layer_norm")))
        feeding = (layer, f"{layer}.output_layer_norm")
    return sites


_HEAD = r"(^|\.)(pooler|classifier|pre_classifier|qa_outputs)$"

register_family(Family(
    name="bert",
    model_types=("bert", "roberta", "xlm-roberta", "electra", "camembert"),
    body=r"encoder\.layer\.\d+$",
    stem=r"embeddings_project$",
    head=_HEAD,
    act_outputs=r"(embeddings|embeddings_project|attention\.output|intermediate|encoder\.layer\.\d+|pooler)$",
    act_inputs=r"classifier\.out_proj$",
    attention=r"attention\.self$",
    ffn_act=(r"intermediate$", "output.dense"),
    layernorm_sites=_bert_sites,
))

register_family(Family(
    name="distilbert",
    model_types=("distilbert",),
    body=r"transformer\.layer\.\d+$",
    head=_HEAD,
    act_outputs=r"(embeddings|sa_layer_norm|transformer\.layer\.\d+)$",
    act_inputs=r"(ffn\.lin2|(^|\.)classifier)$",
    attention=r"transformer\.layer\.\d+\.attention$",
    ffn_act=(r"ffn\.lin2$", "ffn.lin2"),
    layernorm_sites=_distilbert_sites,
))
