"""QDrop post-training quantization for Hugging Face models.

The engine (``quantize_model`` and what it is made of) sits at the top of the package; the
transformers integration (HfQuantizer, save/load, hub, model card, ONNX export) in ``qdrop_hf.integration``; the
helpers of the task scripts (arguments, SQuAD post-processing, metrics, built-in vision networks)
in ``qdrop_hf.tasks``.
"""
from .config import QDropConfig, QDropConfigError, RuntimeConfig
from .families import Family, UnsupportedModelError, register_family, supported_model_types
from .integration.hf_quantizer import register as _register_with_transformers
from .integration.hub import push_to_hub
from .integration.onnx_export import ExportError, OnnxModel, export_onnx
from .integration.serialization import load_quantized, save_quantized
from .quantize import quantize_model

_register_with_transformers()

__all__ = ["QDropConfig", "QDropConfigError", "RuntimeConfig", "Family", "UnsupportedModelError", "register_family",
           "supported_model_types", "quantize_model", "save_quantized", "load_quantized", "push_to_hub", "export_onnx",
           "OnnxModel", "ExportError"]
