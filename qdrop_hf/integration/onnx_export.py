"""Export a quantized model to ONNX, where ONNX Runtime runs it on integer kernels, and run it there.

The graph holds what the quantized model is, not a float approximation of it:

- each quantized layer's weight is its integer codes as an ``int8`` initializer, one byte a weight,
  dequantized by ``DequantizeLinear`` with the per-output-channel scale and zero point (axis = the
  output channel): ``code - zero point`` with zero points 0 where that fits in int8 (at 7 bits and
  fewer always), else ``code - 128`` with ``zero point - 128``. Signed, because x86 integer GEMMs
  multiply unsigned activations by signed weights (VNNI's ``vpdpbusd``): with ``uint8`` weights ONNX
  Runtime takes its slower u8 x u8 kernel, as slow as float32 on MiniLM, and it prepacks
  convolution weights only when they are symmetric;
- each activation quantizer (attention's Q, K, V, probabilities and context included) is a ``Clip``
  to its grid's range followed by a ``QuantizeLinear``/``DequantizeLinear`` pair with the learned
  step and zero point.

Every width sits in an 8-bit container: 2- to 8-bit codes are exact ``int8`` values, and the Clip
keeps a sub-8-bit activation (``uint8``) on its own grid. ONNX Runtime's integer kernels take 8-bit
operands: it fuses each DequantizeLinear → MatMul of a Linear layer into ``MatMulIntegerToFloat``
and each convolution between a DequantizeLinear input and a QuantizeLinear output into
``QLinearConv`` (fast with symmetric weights: 7 bits and fewer). A convolution whose output is not
requantized (before a residual add) stays float; ``OnnxModel`` gives it its weight as a float
constant (``fold_float_weights``). int4 types (opset 21) would halve the file at 4 bits but run only
through weight-only kernels.

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
    """The weight of a released layer as DequantizeLinear of signed codes, read once here (the int8
    GEMM's packed weight gives them back by an unpacking the exporter must not trace).

    Where every ``code - zero point`` fits in int8 (always at 7 bits and fewer) the initializer holds
    those, with zero points 0: symmetric weights, which ONNX Runtime's convolutions need for their
    prepacked kernels. Otherwise ``code - 128`` with ``zero point - 128``: the same values."""
    ops = torch.ops.quantized_decomposed
    codes, scale, zero_point = wq.codes.to(torch.int16), wq.scale.detach().flatten().clone(), wq.zero_point.detach()
    centred = codes - zero_point.to(torch.int16)
    if centred.min() >= -128 and centred.max() <= 127:
        codes, zero_point = centred.to(torch.int8), torch.zeros(zero_point.numel(), dtype=torch.long)
    else:
        codes, zero_point = (codes - 128).to(torch.int8), zero_point.flatten().long() - 128
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


def fold_float_weights(graph) -> tuple[int, list[str]]:
    """Replace by float initializers the weight DequantizeLinear nodes of the layers ONNX Runtime has
    no fast integer kernel for; returns how many, and the ORT optimizers the InferenceSession must go without.

    A MatMul or Gemm becomes ``MatMulIntegerToFloat`` on a DequantizeLinear input, a convolution
    ``QLinearConv`` between a DequantizeLinear input and a QuantizeLinear output (a Relu or Clip
    between them allowed). Every other layer computes in float on its dequantized weight, and ORT
    prepacks (reorders for its blocked kernels) constant weights only: fed by a DequantizeLinear at
    each run, ResNet-20's convolutions ran up to 2x slower than the float model's. ``QLinearConv`` is
    fast with symmetric weights only (zero points 0: every weight of 7 bits or fewer, see
    ``_dequantize_linear``); with asymmetric 8-bit ones EfficientNet-Lite0 ran 35x slower than float.
    Where no convolution has symmetric weights, these are folded too and the InferenceSession is made without
    ``WeightBiasQuantization``, which would quantize a float weight between QDQ pairs again, per
    tensor, on a grid of its own (and which also makes the int32 bias that the symmetric ones need
    for ``QLinearConv``). The values are the same, so are the outputs: closer to PyTorch's, in fact,
    than QLinearConv's, which adds its bias as int32 and rounds its output once."""
    import numpy as np
    from onnx import numpy_helper

    inits = {t.name: t for t in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)

    def quantized_after(name: str) -> bool:
        after = consumers.get(name, [])
        if len(after) == 1 and after[0].op_type in ("Relu", "Clip"):  # ORT fuses these into the conv
            after = consumers.get(after[0].output[0], [])
        return bool(after) and all(n.op_type == "QuantizeLinear" for n in after)

    def symmetric(dq) -> bool:
        return len(dq.input) < 3 or not dq.input[2] or not numpy_helper.to_array(inits[dq.input[2]]).any()

    layers = []  # (node, its weight's DequantizeLinear, "float" | "integer" | "requantizing")
    for node in graph.node:
        dq = producer.get(node.input[1]) if node.op_type in ("Conv", "MatMul", "Gemm") and len(node.input) > 1 else None
        if dq is None or dq.op_type != "DequantizeLinear" or not all(i in inits for i in dq.input if i):
            continue
        from_dq = getattr(producer.get(node.input[0]), "op_type", None) == "DequantizeLinear"
        if not from_dq or node.op_type == "Conv" and not quantized_after(node.output[0]):
            layers.append((node, dq, "float"))
        elif node.op_type != "Conv":
            layers.append((node, dq, "integer"))
        else:
            layers.append((node, dq, "integer" if symmetric(dq) else "requantizing"))
    symmetric_convs = any(kind == "integer" and node.op_type == "Conv" for node, _, kind in layers)
    fold = [dq for _, dq, kind in layers if kind == "float" or kind == "requantizing" and not symmetric_convs]
    for dq in fold:
        codes, scale = numpy_helper.to_array(inits[dq.input[0]]), numpy_helper.to_array(inits[dq.input[1]])
        zero = numpy_helper.to_array(inits[dq.input[2]]) if len(dq.input) > 2 and dq.input[2] else np.zeros_like(scale)
        shape = [1] * codes.ndim
        if scale.ndim:
            shape[next((a.i for a in dq.attribute if a.name == "axis"), 1)] = -1
        weight = (codes.astype(np.float32) - zero.astype(np.float32).reshape(shape)) * scale.reshape(shape)
        graph.node.remove(dq)
        graph.initializer.append(numpy_helper.from_array(weight.astype(np.float32), dq.output[0]))
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    for init in [t for t in graph.initializer if t.name not in used]:
        graph.initializer.remove(init)
    requantizing = any(kind == "requantizing" for _, _, kind in layers) and not symmetric_convs
    return len(fold), ["WeightBiasQuantization"] if requantizing else []


class OnnxModel:
    """An exported folder run by ONNX Runtime, called as the scripts call a torch model: keyword
    tensors (``model(**batch)``) or one image tensor; returns an object with the graph's outputs
    (``.logits``, ``.start_logits``...) as torch tensors. Layers that ORT computes in float get their
    weights as float constants in the InferenceSession (``fold_float_weights``); the file is left as exported."""

    def __init__(self, path: str | Path, provider_names: list[str] | None = None, threads: int | None = None):
        import onnx
        import onnxruntime as ort

        path = Path(path)
        path = path / ONNX_NAME if path.is_dir() else path
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        graph = onnx.load(str(path))
        _, without = fold_float_weights(graph.graph)
        self.inference = ort.InferenceSession(graph.SerializeToString(), options, providers=provider_names or providers(),
                                              disabled_optimizers=without)
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
