"""Saving and reloading a quantized model the Hugging Face way.

A saved folder is an ordinary HF checkpoint folder: ``config.json`` (with ``quantization_config``,
``quant_method="qdrop"``, including every quantizer's bit width), the tokenizer/processor files, and
one ``model.safetensors`` in which each quantized layer's float weight is replaced by its integer
codes bit-packed at the layer's bit width, next to the per-channel scales and zero points and the
activation steps. Only safetensors are written or read: loading never unpickles anything.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file, save_file
from torch import nn

from ..tasks.archs import build_arch
from .model_card import model_card
from .plots import PLOT_NAME, reconstruction_plot
from ..config import QDropConfig
from ..families import find_family
from ..nn import QuantLayer, release_float_weights
from .packing import pack_codes, unpack_codes
from ..clamps import skip_redundant_clamps
from ..integer_linear import use_integer_kernels
from ..plan import install_quantizers, set_quant_state
from ..quantizers import ActQuantizer, WeightQuantizer

WEIGHTS_NAME = "model.safetensors"
# transformers alone does not know "qdrop": it warns, skips the quantization and leaves the layers
# random. The saved config says what to do instead.
LOAD_WITH = "pip install qdrop_hf; import qdrop_hf before AutoModel*.from_pretrained (registers quant_method 'qdrop')"
PACKED = "weight_quantizer.packed"


def quantizer_bits(model: nn.Module) -> dict[str, int]:
    return {name: m.n_bits for name, m in model.named_modules() if isinstance(m, (WeightQuantizer, ActQuantizer))}


def quantized_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors with every hardened layer's float weight and codes replaced by packed codes,
    and corrected biases (``nn.BiasCorrection``) in place of the float ones."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    for name, layer in model.named_modules():
        if isinstance(layer, QuantLayer) and layer.weight_quantizer.hardened:
            wq = layer.weight_quantizer
            state.pop(f"{name}.weight", None)  # absent when the model itself was loaded from packed codes
            state.pop(f"{name}.weight_quantizer.codes", None)  # absent where the int8 GEMM holds the codes
            state[f"{name}.{PACKED}"] = pack_codes(wq.codes, wq.n_bits)
        if isinstance(layer, QuantLayer) and layer.bias_shift is not None:  # bias correction, in the saved bias
            state[f"{name}.bias"] = (layer.bias - layer.bias_shift).detach().cpu()
    seen = {}
    for key, value in state.items():  # tied tensors: safetensors wants each storage once
        if value.data_ptr() in seen and value.numel():
            state[key] = value.clone()
        seen[value.data_ptr()] = key
    return state


def save_quantized(model, tokenizer, output_dir: str | Path, results: dict | None = None,
                   calibration: str | None = None) -> None:
    """Write the folder described above (config, tokenizer/processor, packed safetensors, model card)."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if isinstance(model, transformers.PreTrainedModel):
        if getattr(model, "hf_quantizer", None) is None:
            from .hf_quantizer import attach

            attach(model)
        model.save_pretrained(output_dir)  # the packed state dict, through the qdrop HfQuantizer
    else:  # a built-in architecture: its name and variant options are its whole configuration
        qconfig = {"quant_method": "qdrop", **model.qdrop_config.to_dict(), "quantizer_bits": quantizer_bits(model),
                   "input_quantizers": getattr(model, "qdrop_input_quantizers", {}), "load_with": LOAD_WITH}
        (output_dir / "config.json").write_text(json.dumps({"qdrop_arch": model.qdrop_arch,
                                                            "qdrop_arch_options": model.qdrop_arch_options,
                                                            "quantization_config": qconfig}, indent=2))
        save_file(quantized_state_dict(model), str(output_dir / WEIGHTS_NAME), metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save_pretrained(output_dir)
    report = getattr(model, "qdrop_report", None)
    if report and report.get("units"):
        reconstruction_plot(report["units"], output_dir / PLOT_NAME)
    (output_dir / "README.md").write_text(model_card(model, results, calibration, output_dir))


def load_quantized(path: str | Path, model_class=None) -> nn.Module:
    """Reload a folder written by ``save_quantized``: ``from_pretrained`` of its own architecture class,
    through the ``qdrop`` quantizer registered with transformers on ``import qdrop_hf``; a built-in
    architecture (``qdrop_arch`` in config.json) is rebuilt by name and loaded the same way."""
    raw = json.loads((Path(path) / "config.json").read_text())
    if "qdrop_arch" in raw:
        return _load_builtin(Path(path), raw)
    config = transformers.AutoConfig.from_pretrained(path)
    if dict(getattr(config, "quantization_config", None) or {}).get("quant_method") != "qdrop":
        raise ValueError(f"{path} is not a qdrop-quantized checkpoint (no quantization_config.quant_method='qdrop')")
    cls = model_class or getattr(transformers, config.architectures[0])
    return cls.from_pretrained(path).eval()


def _load_builtin(path: Path, raw: dict) -> nn.Module:
    qdict = raw["quantization_config"]
    qconfig = QDropConfig.from_saved(qdict)
    model = build_arch(raw["qdrop_arch"], default_weights=False, **raw.get("qdrop_arch_options", {})).requires_grad_(False)
    install_saved_quantizers(model, qconfig, qdict["quantizer_bits"])
    finish_loading(model, qconfig, load_file(str(path / WEIGHTS_NAME)), qdict.get("input_quantizers", {}))
    return model


def install_saved_quantizers(model: nn.Module, qconfig: QDropConfig, bits: dict[str, int]) -> dict[str, nn.Module]:
    """The quantized modules of a saved model, at the bit width each quantizer was saved with; returns
    the model's modules by name."""
    install_quantizers(model, find_family(model), qconfig)
    modules = dict(model.named_modules())
    for name, n_bits in bits.items():
        modules[name].n_bits = n_bits
    return modules


def finish_loading(model: nn.Module, qconfig: QDropConfig, state: dict[str, torch.Tensor],
                   input_quantizers: dict[str, str]) -> None:
    """Load the saved tensors (packed codes included), switch the quantizers on as saved, put the
    Linear layers fed by an activation quantizer on the int8 GEMM and skip the clamps the quantizers
    make redundant (``clamps``)."""
    load_tensors(model, dict(model.named_modules()), state)
    set_quant_state(model, weights=True, acts=qconfig.act_quant)
    model.qdrop_config, model.qdrop_input_quantizers = qconfig, dict(input_quantizers)
    use_integer_kernels(model, model.qdrop_input_quantizers)
    skip_redundant_clamps(model)


@torch.no_grad()
def load_tensors(model: nn.Module, modules: dict, state: dict[str, torch.Tensor]) -> None:
    expected = set(model.state_dict())
    loaded = set()
    for key, value in state.items():
        owner, attr = key.rsplit(".", 1)
        if key.endswith(PACKED):
            layer = modules[owner.rsplit(".", 1)[0]]
            wq = layer.weight_quantizer
            wq.codes = unpack_codes(value, wq.n_bits, layer.weight.shape).to(wq.scale.device)
            loaded |= {f"{owner}.codes", f"{owner.rsplit('.', 1)[0]}.weight"}
            continue
        module = modules[owner]
        if attr in module._parameters:
            module._parameters[attr].data = value.to(module._parameters[attr].dtype)
        elif attr in module._buffers:
            module._buffers[attr] = value
        else:
            raise KeyError(f"unexpected tensor {key} in the checkpoint")
        loaded.add(key)
    missing = sorted(expected - loaded)
    if missing:
        raise KeyError(f"the checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")
    release_float_weights(model)  # the codes are the weights: no float copy beside them
