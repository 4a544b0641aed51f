"""Model families: which modules are reconstruction blocks and where activation quantizers sit.

A family is data: module-name patterns (regular expressions searched in the dotted module name) or
small predicates ``(name, module) -> bool``. Adding a model family is one ``Family(...)`` in one file
and a ``register_family`` call; the reconstruction loop never names a family.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Union

from torch import nn

Matcher = Union[str, Callable[[str, nn.Module], bool], None]


class UnsupportedModelError(ValueError):
    """The model's type has no registered family."""


@dataclass(frozen=True)
class Family:
    """How QDrop sees one model family.

    name: the family's name. model_types: HF ``config.model_type`` values, or class names of plain
    ``nn.Module`` models. body: the reconstruction blocks. stem/head: units kept at 8 bits by default
    (quantized layers outside every unit become single-layer units automatically). act_outputs /
    act_inputs: modules whose output / input is activation-quantized. attention: modules that call
    transformers' attention interface (their Q, K, V, probabilities and context get quantized).
    prepare: in-place surgery before quantization (e.g. folding BatchNorm into convolutions).
    act_range_p: the L_p error the activation range search minimises. 2.4 for convolutional
    families, as the reference code has it (ResNet-20 W2A2 +1.8 over 2.0); 2.0 (MSE) for
    transformers, whose outlier-heavy LayerNorm outputs lose everything at 4 bits under 2.4's wider
    ranges (MiniLM SST-2 W4A4 round-to-nearest: 71.0 with 2.0, 52.2 with 2.4).
    bias_correction: what ``QDropConfig.bias_correction=None`` means (``nn.BiasCorrection``): on
    for the networks built of depthwise convolutions (MobileNetV2, MNasNet, EfficientNet-Lite).
    depthwise_range: what ``QDropConfig.depthwise_range=None`` means: ``"output"`` for those networks.
    ffn_act: where the FFN activation of a transformer is quantized, as ``(pattern, consumer)``: the
    modules matching ``pattern`` hold its quantizer (``qdrop_out``, or ``qdrop_in``), and
    ``re.sub(pattern, consumer, name)`` names the Linear layer that reads it. Outlier migration
    (``qdrop_hf.migration``) and ``keep_8bit=["ffn_act"]`` act there; None: the family has none.
    layernorm_sites: ``model -> [LayerNormSite]``, the quantized LayerNorm outputs that outlier
    migration may shift and scale into the Linear layers reading them; None: none.
    """

    name: str
    model_types: tuple[str, ...]
    body: Matcher
    stem: Matcher = None
    head: Matcher = None
    act_outputs: Matcher = None
    act_inputs: Matcher = None
    attention: Matcher = None
    prepare: Callable[[nn.Module], None] | None = None
    act_range_p: float = 2.0
    bias_correction: bool = False
    depthwise_range: str = "weight"
    ffn_act: tuple[str, str] | None = None
    layernorm_sites: Callable[[nn.Module], list["LayerNormSite"]] | None = None


@dataclass(frozen=True)
class LayerNormSite:
    """One quantized LayerNorm output and where it goes, by module name.

    quantizer: the module whose ``qdrop_out`` (or ``qdrop_in``) quantizes it. layernorm: the
    LayerNorm that computes it. consumers: the Linear layers that read it. residual: in a post-LN
    block the same tensor is also added back further on, as ``layernorm2(branch_end(...) + it)``:
    ``(branch_end, layernorm2)`` then, None where nothing but the consumers reads it (pre-LN).
    """

    quantizer: str
    layernorm: str
    consumers: tuple[str, ...]
    residual: tuple[str, str] | None = None


def matches(spec: Matcher, name: str, module: nn.Module) -> bool:
    if spec is None:
        return False
    if isinstance(spec, str):
        return re.search(spec, name) is not None
    return bool(spec(name, module))


_REGISTRY: dict[str, Family] = {}


def register_family(family: Family) -> Family:
    for model_type in family.model_types:
        _REGISTRY[model_type] = family
    return family


def model_type_of(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None) or type(model).__name__


def find_family(model: nn.Module) -> Family:
    model_type = model_type_of(model)
    if model_type not in _REGISTRY:
        raise UnsupportedModelError(
            f"qdrop_hf has no model family for model type {model_type!r}. Supported: {', '.join(sorted(_REGISTRY))}. "
            "To add one, describe its blocks and activation points in a Family(...) and call "
            "qdrop_hf.families.register_family (see qdrop_hf/families/bert.py for an example)."
        )
    return _REGISTRY[model_type]


def supported_model_types() -> list[str]:
    return sorted(_REGISTRY)


from . import bert, builtin, cnn, vit  # noqa: E402,F401  (registers the built-in families)
