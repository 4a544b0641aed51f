"""The settings of a run, in two validated objects.

``QDropConfig`` holds the method's settings: it is what a quantized model is saved with. Its field
names are the reference implementation's command-line names, and the ``run_*.py`` scripts parse it
directly (``HfArgumentParser``), so a config has the same defaults and meaning whether it comes from
flags, a JSON file or Python code. ``RuntimeConfig`` holds how a run uses the machine; it is not saved.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field

ORDERS = ("before", "after", "together")
RANGE_MODES = ("mse", "minmax")
ACT_RANGE_MODES = RANGE_MODES + ("tokenwise",)
KEEP_8BIT_ROLES = ("ffn_act", "attention")
MIGRATION_PARTS = ("layernorm", "ffn_act")
DEPTHWISE_RANGES = ("weight", "output")
INPUT_DROPS = ("float", "unquantized")
CACHE_DTYPES = ("float16", "bfloat16")


class QDropConfigError(ValueError):
    """A configuration the method cannot run with; the message says which field and why."""


@dataclass
class QDropConfig:
    """QDrop post-training quantization settings.

    Bits, rounding and activation learning follow the QDrop paper; ``order`` and the four
    ``wwq/waq/awq/aaq`` switches reproduce the reference implementation's ablations:

    * ``order="together"``: activation steps are initialised per block and learned jointly with the
      AdaRound variables (QDrop and No-Drop).
    * ``order="before"``: activation ranges are fixed before weight reconstruction (Case 2).
    * ``order="after"``: weights are reconstructed with activations in float, activation ranges are set
      afterwards, per block when ``waq`` (Case 3) or for the whole model at the end otherwise (Case 1).
    * ``wwq``/``waq``: the inputs a block is reconstructed on come from the model with quantized
      weights / activations in the blocks before it.
    * ``awq``/``aaq``: the same for whole-model activation calibration (Case 1/2).

    ``bias_correction`` subtracts the mean output shift that weight rounding causes (dW·E[x], with
    E[x] measured on the calibration data) from each quantized layer's float bias, during
    reconstruction and after it (``nn.BiasCorrection``); not the method's, an addition. ``None``: the
    model family's default, on for networks of depthwise convolutions (MobileNetV2, MNasNet,
    EfficientNet-Lite), off for the others: where every kernel sums many weights, AdaRound fixes the
    mean shift by its choice of roundings, also the part the quantized activations cause, which the
    correction would work against.

    ``depthwise_range`` chooses how depthwise kernels get their clipping ranges: ``"weight"``, the
    method's search on the weights' own error (``init_wmode``), or ``"output"``, a search on the error
    each kernel's rounding causes at its output on the calibration data, both ends of the range
    clipped separately (``observers.PatchMoments``); not the method's, an addition. ``None``: the
    family's default, ``"output"`` where ``bias_correction`` is on by default.

    ``input_drop`` is what a dropped element of a block's input becomes (QDrop, ``input_prob``):
    ``"float"``, the float model's value there, as the reference implementation mixes the cached float
    input in; or ``"unquantized"``, the partly quantized model's own value before the activation
    quantizer that feeds the block, i.e. that quantizer dropped element-wise as ``prob`` drops those
    inside the block. The float value also undoes every earlier block's error on dropped elements; the
    unquantized one undoes only the last quantizer's rounding. Where no activation quantizer
    directly feeds a block (the first one after the embeddings of a model whose embedding output is
    not quantized, say), its input is mixed with the float value either way.

    ``outlier_migration`` moves the few outlier channels of a transformer's LayerNorm outputs and
    FFN activation into the Linear layers that read them before any range is set
    (``qdrop_hf.migration``; Outlier Suppression+'s shifting and scaling, an addition to the
    method); ``None``: on for families that declare such places when ``n_bits_a <= 6``. ``migrate``
    names the parts it acts on: ``layernorm``, ``ffn_act``. ``init_amode="tokenwise"`` sets
    activation ranges so that every token's relative error counts alike
    (``observers.search_token_range``). ``keep_8bit`` names activation roles left at 8 bits
    whatever ``n_bits_a`` is: ``ffn_act``, ``attention``.

    ``round_lr`` (AdaRound's learning rate) defaults to one that fits the iteration budget
    (``rounding_lr``): 0.1 up to 500 iterations, 2.5e-3 at the method's 20k.

    Settings that change how a run uses the machine but not which model it makes (device, kernels,
    memory layout, cache placement) live in ``RuntimeConfig``: they are not saved with the model.
    """

    n_bits_w: int = field(default=4, metadata={"help": "weight bits (2-8)"})
    n_bits_a: int = field(default=4, metadata={"help": "activation bits (2-8)"})
    channel_wise: bool = field(default=True, metadata={"help": "per-output-channel weight quantization"})
    act_quant: bool = field(default=True, metadata={"help": "quantize activations"})
    order: str = field(default="together", metadata={"help": "when activation ranges are set: before|after|together"})
    wwq: bool = field(default=True, metadata={
        "help": "reconstruct each block on inputs from the model with the earlier blocks' weights quantized"})
    waq: bool = field(default=True, metadata={
        "help": "reconstruct each block on inputs from the model with the earlier activations quantized"})
    awq: bool = field(default=True, metadata={"help": "whole-model activation calibration with weights quantized"})
    aaq: bool = field(default=True, metadata={
        "help": "whole-model activation calibration with the earlier activations quantized"})
    weight: float = field(default=0.01, metadata={"help": "weight of the AdaRound rounding loss"})
    prob: float = field(default=0.5, metadata={"help": "QDrop: probability of keeping an activation quantized (1: No Drop)"})
    input_prob: float = field(default=0.5, metadata={"help": "QDrop: probability of keeping a block-input element quantized"})
    input_drop: str = field(default="float", metadata={
        "help": "what a dropped block-input element becomes: float (the float model's value, as the reference "
                "implementation) or unquantized (the quantized model's own value before its activation quantizer)"})
    iters_w: int = field(default=20000, metadata={"help": "reconstruction iterations per block (0: round-to-nearest)"})
    batch_size: int = field(default=32, metadata={"help": "reconstruction mini-batch size"})
    num_samples: int = field(default=1024, metadata={"help": "calibration samples"})
    lr: float = field(default=4e-5, metadata={"help": "learning rate of the activation steps (LSQ)"})
    round_lr: float | None = field(default=None, metadata={
        "help": "learning rate of the AdaRound variables (default: 50 / iters_w, within [1e-3, 0.1])"})
    bias_correction: bool | None = field(default=None, metadata={
        "help": "subtract the mean output shift that weight rounding causes from each layer's bias "
                "(default: on for networks of depthwise convolutions)"})
    depthwise_range: str | None = field(default=None, metadata={
        "help": "depthwise kernels' ranges from the weights' own error (weight) or the error at the kernel's output "
                "(output; the default for networks of depthwise convolutions)"})
    warmup: float = field(default=0.2, metadata={"help": "fraction of the iterations without the rounding loss"})
    b_start: float = field(default=20.0, metadata={"help": "rounding-loss beta at the start of annealing"})
    b_end: float = field(default=2.0, metadata={"help": "rounding-loss beta at the end of annealing"})
    init_wmode: str = field(default="mse", metadata={"help": "weight range initialisation: mse|minmax"})
    init_amode: str = field(default="mse", metadata={
        "help": "activation range initialisation: mse|minmax|tokenwise (ranges from quantiles of the per-token "
                "extremes, not set by a few outlier tokens)"})
    outlier_migration: bool | None = field(default=None, metadata={
        "help": "shift and scale outlier channels of LayerNorm outputs and the FFN activation into the Linear "
                "layers reading them before quantizing "
                "(default: on for transformer families when n_bits_a <= 6)"})
    migrate: list[str] = field(default_factory=lambda: list(MIGRATION_PARTS), metadata={
        "help": f"what outlier migration acts on: {', '.join(MIGRATION_PARTS)}"})
    keep_8bit: list[str] = field(default_factory=list, metadata={
        "help": f"activation roles kept at 8 bits: {', '.join(KEEP_8BIT_ROLES)}"})
    disable_8bit_head_stem: bool = field(default=False, metadata={"help": "quantize stem and head like the body, not at 8 bits"})
    seed: int = field(default=1005, metadata={"help": "random seed (calibration sampling, drop masks)"})
    keep_fp_modules: list[str] = field(default_factory=list, metadata={
        "help": "module names (fnmatch patterns) left in float"})

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        bad = _complaint(self)
        for name in ("n_bits_w", "n_bits_a"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not 2 <= value <= 8:
                bad(name, "bits must be an integer from 2 to 8")
        for name in ("prob", "input_prob"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0.0 < value <= 1.0:
                bad(name, "a keep-probability must lie in (0, 1]; 1 means no drop")
        if self.input_drop not in INPUT_DROPS:
            bad("input_drop", f"choose one of {INPUT_DROPS}")
        if self.order not in ORDERS:
            bad("order", f"choose one of {ORDERS}")
        if self.bias_correction not in (None, True, False):
            bad("bias_correction", "True, False, or None for the default")
        if self.depthwise_range not in (None,) + DEPTHWISE_RANGES:
            bad("depthwise_range", f"choose one of {DEPTHWISE_RANGES}, or None for the model family's default")
        if self.init_wmode not in RANGE_MODES:
            bad("init_wmode", f"choose one of {RANGE_MODES}")
        if self.init_amode not in ACT_RANGE_MODES:
            bad("init_amode", f"choose one of {ACT_RANGE_MODES}")
        if self.outlier_migration not in (None, True, False):
            bad("outlier_migration", "True, False, or None for the default")
        if not isinstance(self.migrate, (list, tuple)) or any(p not in MIGRATION_PARTS for p in self.migrate):
            bad("migrate", f"a list of parts from {MIGRATION_PARTS}")
        if not isinstance(self.keep_8bit, (list, tuple)) or any(r not in KEEP_8BIT_ROLES for r in self.keep_8bit):
            bad("keep_8bit", f"a list of roles from {KEEP_8BIT_ROLES}")
        if self.iters_w < 0:
            bad("iters_w", "must be >= 0 (0 means round-to-nearest, no reconstruction)")
        for name in ("batch_size", "num_samples"):
            if getattr(self, name) < 1:
                bad(name, "must be >= 1")
        if not 0.0 <= self.warmup < 1.0:
            bad("warmup", "the warm-up is a fraction of the iterations, in [0, 1)")
        if self.b_start < self.b_end or self.b_end < 1:
            # below 1, |2h - 1|^beta has an unbounded gradient where h = 1/2
            bad("b_start", f"beta anneals from b_start down to b_end >= 1 (b_end={self.b_end})")
        for name in ("weight", "lr", "round_lr"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                bad(name, "must be >= 0")

    @property
    def rounding_lr(self) -> float:
        """AdaRound's learning rate: ``round_lr``, or 50 / iters_w clipped to [1e-3, 1e-1].

        Adam moves each rounding variable by about ``lr`` per step, and a variable has to travel
        several units to settle a rounding decision; at the reference's 1e-3 a short run ends before
        most can. ResNet-20 CIFAR-10 W2A2, 500 iterations per block: 43.5% at 1e-3, 63.1 at 3e-3,
        66.3 at 1e-2, 66.6 at 3e-2, 66.7 at 4e-2, 69.8 at 1e-1, 70.5 at 3e-1 (1e-3 at 5,000
        iterations: 68.8).
        """
        if self.round_lr is not None:
            return self.round_lr
        return min(1e-1, max(1e-3, 50 / max(self.iters_w, 1)))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "QDropConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise QDropConfigError(f"unknown QDrop config fields: {unknown}")
        return cls(**values)

    @classmethod
    def from_saved(cls, values: dict) -> "QDropConfig":
        """From a saved ``quantization_config`` or argument set: the fields of this class, the rest ignored."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


REFERENCE_SWITCHES = ("channel_wise", "act_quant", "wwq", "waq", "awq", "aaq")


@dataclass
class RuntimeConfig:
    """How a run uses the machine: where it runs, which kernels, how it holds its caches. None of this
    changes which model QDrop makes (channels-last and the device change the summation order, as
    another machine would), so none of it is saved with the quantized model."""

    device: str | None = field(default=None, metadata={"help": "cuda or cpu (default: cuda when available)"})
    compile: bool = field(default=False, metadata={"help": "fuse the fake-quant kernels with torch.compile"})
    channels_last: bool | None = field(default=None, metadata={
        "help": "channels-last activations for 2-D convolutions (default: on the CPU without compile, where "
                "mkldnn runs them faster)"})
    micro_batch_size: int | None = field(default=None, metadata={
        "help": "run each reconstruction batch in chunks of this many samples, gradients accumulated: the same "
                "update with a smaller batch's activation memory"})
    cache_dtype: str | None = field(default=None, metadata={
        "help": "store block caches in float16 or bfloat16 (half the memory; default: the model's precision)"})
    cache_dir: str | None = field(default=None, metadata={
        "help": "keep block caches in an unlinked temporary file in this directory, read back a batch at a time"})

    def __post_init__(self):
        bad = _complaint(self, "runtime setting")
        if self.channels_last not in (None, True, False):
            bad("channels_last", "True, False, or None for the default")
        if self.micro_batch_size is not None and self.micro_batch_size < 1:
            bad("micro_batch_size", "must be >= 1, or None for the whole batch")
        if self.cache_dtype is not None and self.cache_dtype not in CACHE_DTYPES:
            bad("cache_dtype", f"choose one of {CACHE_DTYPES}, or None to cache in the model's precision")
        if self.cache_dir is not None and not (os.path.isdir(self.cache_dir) and os.access(self.cache_dir, os.W_OK)):
            bad("cache_dir", "not a writable directory")

    def resolved_device(self):
        import torch

        if self.device:
            return torch.device(self.device)
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _complaint(obj, what: str = "QDrop config"):
    def bad(name, why):
        raise QDropConfigError(f"invalid {what}: {name}={getattr(obj, name)!r}: {why}")
    return bad
