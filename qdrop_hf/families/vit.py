"""Vision Transformer (pre-LayerNorm): one ``layers.N`` (``encoder.layer.N`` before transformers 5) per block.

Being pre-LN, the matmul inputs are the LayerNorm outputs (not the layer outputs): those are
quantized, with Q/K/V, probabilities and context through the ``qdrop`` attention function, and the
MLP activation at the input of ``fc2``. The final LayerNorm feeds the 8-bit head.
"""
from . import Family, register_family

register_family(Family(
    name="vit",
    model_types=("vit", "deit"),
    body=r"(layers|encoder\.layer)\.\d+$",
    stem=r"(vit|deit)\.embeddings$",
    head=r"^(classifier|distillation_classifier|cls_classifier)$",
    act_outputs=r"(layernorm_before|layernorm_after|(vit|deit)\.layernorm)$",
    act_inputs=r"mlp\.fc2$",
    attention=r"(layers|layer)\.\d+\.attention$",
    ffn_act=(r"mlp\.fc2$", "mlp.fc2"),
))
