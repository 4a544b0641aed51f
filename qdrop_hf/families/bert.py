"""BERT-style encoders: BERT, RoBERTa, ELECTRA (one ``encoder.layer.N`` per block) and DistilBERT.

Activation quantizers sit where a tensor enters a matmul: embeddings output, Q/K/V, attention
probabilities and context (through the ``qdrop`` attention function), the attention block output,
the FFN activation, and each layer's output. Logits stay in float.
"""
from . import Family, register_family

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
))
