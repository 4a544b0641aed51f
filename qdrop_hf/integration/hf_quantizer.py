"""transformers integration: ``quant_method="qdrop"`` in the quantizer registry.

After ``import qdrop_hf``, ``AutoModelFor*.from_pretrained(<folder saved by save_quantized>)`` rebuilds the
quantized modules on the empty model, shapes the quantizer buffers from the checkpoint, lets
transformers load what it knows, then loads the packed integer weights and quantizer state itself.
Quantizing through ``from_pretrained`` is refused: QDrop needs calibration data (``quantize_model``).
"""
from __future__ import annotations

import torch
from safetensors import safe_open
from transformers.quantizers import HfQuantizer
from transformers.quantizers.auto import (AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING,
                                         register_quantization_config, register_quantizer)
from transformers.utils.quantization_config import QuantizationConfigMixin

from ..config import QDropConfig
from .serialization import PACKED, finish_loading, install_saved_quantizers
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
            elif isinstance(m, QuantLayer):  # no float weight in the checkpoint: derived from the codes
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
        finish_loading(model, self.quantization_config.qdrop_config(), state)
        return model

    def is_serializable(self):
        return False  # save with qdrop_hf.integration.serialization.save_quantized, which packs the integer weights

    @property
    def is_trainable(self):
        return False


def register() -> None:
    """Add ``qdrop`` to transformers' quantization registries (idempotent)."""
    if METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(METHOD)(QDropQuantizationConfig)
    if METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(METHOD)(QDropHfQuantizer)
