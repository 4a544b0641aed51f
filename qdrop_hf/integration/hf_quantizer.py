"""transformers integration: ``quant_method="qdrop"`` in the quantizer registry.

After ``import qdrop_hf``, ``AutoModelFor*.from_pretrained(<a saved qdrop folder>)`` rebuilds the
quantized modules on the empty model, shapes the quantizer buffers from the checkpoint, lets
transformers load what it knows, then loads the packed integer weights and quantizer state itself.
The other way, ``model.save_pretrained`` / ``model.push_to_hub`` write the packed format through
``get_state_dict_and_metadata``; a model fresh from ``quantize_model`` gets the same quantizer
attached (``attach``), so it saves as a reloaded one does. Quantizing through ``from_pretrained`` is
refused: QDrop needs calibration data (``quantize_model``).
"""
from __future__ import annotations

import torch
from safetensors import safe_open
from transformers import PreTrainedModel
from transformers.quantizers import HfQuantizer
from transformers.quantizers.auto import (AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING,
                                         register_quantization_config, register_quantizer)
from transformers.utils.quantization_config import QuantizationConfigMixin

from ..config import QDropConfig
from .serialization import LOAD_WITH, PACKED, finish_loading, install_saved_quantizers, quantized_state_dict, quantizer_bits
from ..nn import QuantLayer
from ..quantizers import WeightQuantizer

METHOD = "qdrop"


class QDropQuantizationConfig(QuantizationConfigMixin):
    """The ``quantization_config`` of a QDrop checkpoint: every ``QDropConfig`` field plus each
    quantizer's bit width (``quantizer_bits``), kept flat so that ``config.json`` reads plainly."""

    def __init__(self, quant_method: str = METHOD, quantizer_bits: dict | None = None, **settings):
        self.quant_method = METHOD
        self.quantizer_bits = dict(quantizer_bits or {})
        for key, value in settings.items():
            setattr(self, key, value)

    def qdrop_config(self) -> QDropConfig:
        return QDropConfig.from_saved(self.__dict__)

    @classmethod
    def of_model(cls, model) -> "QDropQuantizationConfig":
        return cls(quantizer_bits=quantizer_bits(model), load_with=LOAD_WITH, **model.qdrop_config.to_dict(),
                   input_quantizers=getattr(model, "qdrop_input_quantizers", {}))


class QDropHfQuantizer(HfQuantizer):
    requires_calibration = True

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        if not checkpoint_files:
            raise ValueError("a qdrop checkpoint needs its safetensors file(s) to load")
        self.checkpoint_files = [f for f in checkpoint_files if str(f).endswith(".safetensors")]
        modules = install_saved_quantizers(model, self.quantization_config.qdrop_config(),
                                           self.quantization_config.quantizer_bits)
        for path in self.checkpoint_files:
            with safe_open(str(path), "pt") as f:
                for key in f.keys():
                    owner, attr = key.rsplit(".", 1)
                    if isinstance(modules.get(owner), WeightQuantizer):
                        dtype = torch.uint8 if key.endswith(PACKED) else torch.float32
                        modules[owner].register_buffer(attr, torch.empty(f.get_slice(key).get_shape(), dtype=dtype,
                                                                         device="meta"))
        for m in modules.values():
            if isinstance(m, WeightQuantizer):  # the codes come from the packed tensor after loading
                m.register_buffer("codes", torch.empty(0, dtype=torch.uint8), persistent=False)
            elif isinstance(m, QuantLayer):  # no float weight in the checkpoint: a placeholder until the codes load
                weight = m._parameters.pop("weight")
                m.register_buffer("weight", torch.empty(weight.shape, dtype=weight.dtype, device="meta"),
                                  persistent=False)
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        state = {}
        for path in self.checkpoint_files:
            with safe_open(str(path), "pt") as f:
                state.update({k: f.get_tensor(k) for k in f.keys()})
        for m in model.modules():
            if isinstance(m, WeightQuantizer):
                m._buffers.pop("packed", None)
                m._non_persistent_buffers_set.discard("codes")
        finish_loading(model, self.quantization_config.qdrop_config(), state,
                       getattr(self.quantization_config, "input_quantizers", {}))
        return model

    def is_serializable(self):
        return True

    def get_state_dict_and_metadata(self, model):
        """What ``save_pretrained`` writes: the integer weights bit-packed, no float copy of them."""
        return quantized_state_dict(model), {}

    @property
    def is_trainable(self):
        return False


def attach(model) -> None:
    """Give a transformers model fresh from ``quantize_model`` what ``from_pretrained`` gives a reloaded
    one: ``model.hf_quantizer`` and ``config.quantization_config``, so that ``save_pretrained``,
    ``push_to_hub`` and ``model.is_quantized`` treat it as the quantized model it is."""
    if not isinstance(model, PreTrainedModel):
        return
    config = QDropQuantizationConfig.of_model(model)
    model.config.quantization_config = config
    model.hf_quantizer = QDropHfQuantizer(config, pre_quantized=True)


def register() -> None:
    """Add ``qdrop`` to transformers' quantization registries (idempotent)."""
    if METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(METHOD)(QDropQuantizationConfig)
    if METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(METHOD)(QDropHfQuantizer)
