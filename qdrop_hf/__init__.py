"""QDrop post-training quantization for Hugging Face models."""
from .config import QDropConfig, QDropConfigError
from .families import Family, UnsupportedModelError, register_family, supported_model_types
from .hf_quantizer import register as _register_with_transformers
from .quantize import quantize_model

_register_with_transformers()

__all__ = ["QDropConfig", "QDropConfigError", "Family", "UnsupportedModelError", "register_family",
           "supported_model_types", "quantize_model"]
