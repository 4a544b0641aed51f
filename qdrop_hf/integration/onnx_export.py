"""Export a quantized model to ONNX, where ONNX Runtime runs it on integer kernels, and run it there.

The graph holds what the quantized model is, not a float approximation of it:

- each quantized layer's weight is its integer codes as an ``int8`` initializer (code - 128), one
  byte a weight, dequantized by ``DequantizeLinear`` with the per-output-channel scale and zero point
  (zero point - 128; axis = the output channel). Signed, because x86 integer GEMMs multiply unsigned
  activations by signed weights (VNNI's ``vpdpbusd``): with ``uint8`` weights ONNX Runtime takes its
  slower u8 x u8 kernel, as slow as float32 on MiniLM;
- each activation quantizer (attention's Q, K, V, probabilities and context included) is a ``Clip``
  to its grid's range followed by a ``QuantizeLinear``/``DequantizeLinear`` pair with the learned
  step and zero point.

Every width sits in an 8-bit container: 2- to 8-bit codes are exact ``int8`` values, and the Clip
keeps a sub-8-bit activation (``uint8``) on its own grid. ONNX Runtime's integer kernels take 8-bit operands: it
fuses each DequantizeLinear → MatMul of a Linear layer into ``MatMulIntegerToFloat``. Convolutions are
not fused (their outputs are not requantized before a residual add, and their bias is float), so a
convolutional graph runs its convolutions in float on weights it dequantizes at each run. int4 types
(opset 21) would halve the file at 4 bits but run only through weight-only kernels.

``optimum-onnx`` (``ORTModelFor*``) pins transformers below 5, so it cannot load these folders beside
the transformers this package needs; ``OnnxModel`` is the small runner that takes its place: it
answers the calls the task scripts make of a torch model (``model(**batch).logits``,
``model(images)``).
"""
from __future__ import annotations

import logging
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

from ..batches import map_tensors, model_inputs
from ..nn import QuantLayer
from ..quantizers import ActQuantizer

ONNX_DIR = "onnx"
ONNX_NAME = "model.onnx"
OPSET = 21
NOT_EXPORTED = {"loss", "hidden_states", "attentions"}


class ExportError(Exception):
    """A model that cannot be exported, or a folder that cannot be written: one line says which."""


def _dequantize_linear(wq):
    """The weight of a released layer as DequantizeLinear of its codes, signed, read once here (the int8
    GEMM's packed weight gives them back by an unpacking the exporter must not trace)."""
    ops = torch.ops.quantized_decomposed
    codes = (wq.codes.to(torch.int16) - 128).to(torch.int8)
    scale, zero_point = wq.scale.detach().flatten().clone(), wq.zero_point.flatten().long().clone() - 128
    if wq.channel_wise:
        return lambda: ops.dequantize_per_channel(codes, scale, zero_point, wq.ch_axis, -128, 127, torch.int8)
    return lambda: ops.dequantize_per_tensor(codes, float(scale), int(zero_point), -128, 127, torch.int8)


@contextmanager
def export_mode(model: nn.Module):
    """The model's quantizers as QDQ operators for the exporter, for the duration of the block."""
    from torch.ao.quantization.fx import _decomposed  # noqa: F401  (registers torch.ops.quantized_decomposed)

    acts = [m for m in model.modules() if isinstance(m, ActQuantizer)]
    layers = [m for m in model.modules() if isinstance(m, QuantLayer)]
    for q in acts:
        q.export_grid = (float(q.scale), int(q.zero_point)) if q.active else ()
    for layer in layers:
        layer.export_weight = _dequantize_linear(layer.weight_quantizer)
    try:
        yield
    finally:
        for q in acts:
            q.export_grid = None
        for layer in layers:
            layer.export_weight = None


def check_exportable(model: nn.Module) -> None:
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLayer)}
    if not layers:
        raise ExportError(f"{type(model).__name__} is not quantized: run quantize_model (or load a qdrop folder) first")
    unfinished = [n for n, m in layers.items() if not m.released]
    if unfinished:
        raise ExportError(f"reconstruction is not finished: {len(unfinished)} layers have no final integer codes "
                          f"(e.g. {unfinished[0]}); export the model quantize_model returns")
    wide = [n for n, m in model.named_modules() if isinstance(m, ActQuantizer) and m.active and m.n_bits > 8]
    wide += [n for n, m in layers.items() if m.weight_quantizer.n_bits > 8]
    if wide:
        raise ExportError(f"only 2- to 8-bit quantizers export to ONNX; {wide[0]} is wider")


class _Flat(nn.Module):
    """The model with positional tensor inputs and a tuple of tensor outputs, as the exporter wants."""

    def __init__(self, model: nn.Module, input_names: list[str] | None, output_names: list[str]):
        super().__init__()
        self.model, self.input_names, self.output_names = model, input_names, output_names

    def forward(self, *tensors):
        out = self.model(**dict(zip(self.input_names, tensors))) if self.input_names else self.model(*tensors)
        if isinstance(out, torch.Tensor):
            return out
        return tuple(out[name] for name in self.output_names)


def _output_names(model: nn.Module, inputs) -> list[str]:
    with torch.no_grad():
        out = model(**inputs) if isinstance(inputs, dict) else model(inputs)
    if isinstance(out, torch.Tensor):
        return ["logits"]
    return [k for k, v in out.items() if k not in NOT_EXPORTED and isinstance(v, torch.Tensor)]


def export_onnx(model: nn.Module, output_dir: str | Path, sample_inputs, preprocessor=None) -> Path:
    """Write ``output_dir/onnx/``: ``model.onnx`` (the graph described above, batch and sequence
    length dynamic), ``config.json`` and the tokenizer or image processor when given. Returns the
    ``.onnx`` path. ``sample_inputs``: one batch as the model takes it (a tokenizer's dict, an image
    tensor, an ``(inputs, labels)`` pair; labels are left out). Nothing is left behind when it fails."""
    check_exportable(model)
    device = next(model.parameters()).device
    try:
        return _export(model.eval().cpu(), Path(output_dir), sample_inputs, preprocessor)
    finally:
        model.to(device)


def trace(model: nn.Module, inputs, path: Path) -> None:
    """``torch.onnx.export`` (dynamo, opset 21) of ``model`` on ``inputs`` (a dict of tensors or one image
    tensor) to ``path``: batch (and sequence) dynamic, the outputs by name (``logits``...). Used for the
    quantized model inside ``export_mode``, and as it is for a float model to compare against."""
    names = list(inputs) if isinstance(inputs, dict) else None
    tensors = tuple(inputs.values()) if isinstance(inputs, dict) else (inputs,)
    dims = tuple({0: "batch", 1: "sequence"} if t.dim() == 2 else {0: "batch"} for t in tensors)
    for name in ("onnx_ir", "onnxscript"):  # one line per folded initializer otherwise
        logging.getLogger(name).setLevel(logging.WARNING)
    outputs = _output_names(model, inputs)
    try:
        torch.onnx.export(_Flat(model, names, outputs), tensors, str(path), dynamo=True, opset_version=OPSET,
                          input_names=names or ["pixel_values"], output_names=outputs, dynamic_shapes=(dims,),
                          external_data=False, verbose=False)
    except Exception as err:  # the exporter's own errors: an op it cannot trace or translate
        raise ExportError(f"cannot export {type(model).__name__} to ONNX: {_root_cause(err)}") from err


def export_inputs(batch):
    """A batch as the exporter takes it: the model's inputs (``batches.model_inputs``: labels dropped,
    an ``(inputs, labels)`` pair unwrapped), on the CPU, contiguous."""
    return map_tensors(model_inputs(batch), lambda t: t.cpu().contiguous())


def _export(model: nn.Module, output_dir: Path, sample_inputs, preprocessor) -> Path:
    target = output_dir / ONNX_DIR
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".onnx-", dir=output_dir))
    except OSError as err:
        raise ExportError(f"cannot write to {output_dir}: {err.strerror or err}") from err
    try:
        with export_mode(model):
            trace(model, export_inputs(sample_inputs), staging / ONNX_NAME)
        if hasattr(model, "config"):
            model.config.save_pretrained(staging)
        if preprocessor is not None:
            preprocessor.save_pretrained(staging)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target / ONNX_NAME


def _root_cause(err: BaseException) -> str:
    """The first line of the innermost exception: the exporter wraps the tracer's message twice."""
    while err.__cause__ is not None:
        err = err.__cause__
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def providers() -> list[str]:
    """ONNX Runtime's execution providers to use: TensorRT and CUDA where present, the CPU always."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    return [p for p in ("TensorrtExecutionProvider", "CUDAExecutionProvider") if p in available] + ["CPUExecutionProvider"]


class OnnxModel:
    """An exported folder run by ONNX Runtime, called as the scripts call a torch model: keyword
    tensors (``model(**batch)``) or one image tensor; returns an object with the graph's outputs
    (``.logits``, ``.start_logits``...) as torch tensors."""

    def __init__(self, path: str | Path, provider_names: list[str] | None = None, threads: int | None = None):
        import onnxruntime as ort

        path = Path(path)
        path = path / ONNX_NAME if path.is_dir() else path
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.inference = ort.InferenceSession(str(path), options, providers=provider_names or providers())
        self.input_names = [i.name for i in self.inference.get_inputs()]
        self.output_names = [o.name for o in self.inference.get_outputs()]
        self.calls, self.seconds = 0, 0.0  # runs and the time spent in them

    def eval(self) -> "OnnxModel":
        return self

    def to(self, device) -> "OnnxModel":
        return self  # the execution providers decide where it runs

    def __call__(self, *args, **kwargs):
        if args:
            kwargs = dict(zip(self.input_names, args))
        feeds = {name: kwargs[name].detach().cpu().numpy() for name in self.input_names}
        t = time.perf_counter()
        outputs = self.inference.run(self.output_names, feeds)
        self.seconds += time.perf_counter() - t
        self.calls += 1
        return SimpleNamespace(**{n: torch.from_numpy(v) for n, v in zip(self.output_names, outputs)})
