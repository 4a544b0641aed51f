"""Vision Transformer (pre-LayerNorm): one ``layers.N`` (``encoder.layer.N`` before transformers 5) per block.

Being pre-LN, the matmul inputs are the LayerNorm outputs (not the layer outputs): those are
quantized, with Q/K/V, probabilities and context through the ``qdrop`` attention function, and the
MLP activation at the input of ``fc2``. The final LayerNorm feeds the 8-bit head. Nothing but the
attention's and the MLP's input layers read a LayerNorm output: no residual to carry its migration.
"""
import re

from . import Family, LayerNormSite, register_family

# (consumers of layernorm_before, of layernorm_after) in transformers 5 and, second, before it
_READERS = ((("attention.q_proj", "attention.k_proj", "attention.v_proj"), ("mlp.fc1",)),
            (("attention.attention.query", "attention.attention.key", "attention.attention.value"),
             ("intermediate.dense",)))


def _vit_sites(model) -> list[LayerNormSite]:
    order = [name for name, _ in model.named_modules()]
    names, sites = set(order), []
    for layer in [n for n in order if re.search(r"(layers|encoder\.layer)\.\d+$", n)]:
        for before, after in _READERS:
            if all(f"{layer}.{c}" in names for c in before + after):
                for norm, readers in (("layernorm_before", before), ("layernorm_after", after)):
                    ln = f"{layer}.{norm}"
                    sites.append(LayerNormSite(ln, ln, tuple(f"{layer}.{c}" for c in readers)))
    return sites


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
    layernorm_sites=_vit_sites,
))
