"""Every knob of the method in one validated object.

The field names are the seed's command-line names, so a config is the same thing whether it comes
from ``run_*.py`` flags, a JSON file or Python code.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field

ORDERS = ("before", "after", "together")
RANGE_MODES = ("mse", "minmax")
DEPTHWISE_RANGES = ("weight", "output")
INPUT_DROPS = ("float", "unquantized")
CACHE_DTYPES = ("float16", "bfloat16")


class QDropConfigError(ValueError):
    """A configuration the method cannot run with; the message says which field and why."""


@dataclass
class QDropConfig:
    """QDrop post-training quantization settings.

    Bits, rounding and activation learning follow the QDrop paper; ``order`` and the four
    ``wwq/waq/awq/aaq`` switches reproduce the seed's ablations:

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

    ``round_lr`` (AdaRound's learning rate) defaults to one that fits the iteration budget
    (``rounding_lr``): 0.1 up to 500 iterations, 2.5e-3 at the method's 20k.

    ``micro_batch_size`` is not the method's: it runs each ``batch_size`` batch in chunks with
    accumulated gradients, the same update with a smaller batch's activation memory. ``cache_dtype``
    ("float16" or "bfloat16") stores each block's cached inputs and outputs at half the memory;
    ``cache_dir`` stores them in an unlinked temporary file in that directory, read back a batch at a
    time (memory then holds one batch of the cache, not all of it).

    ``channels_last`` lays the calibration images, and with them every activation the convolutions
    pass on, out in channels-last memory order, on which mkldnn's CPU convolutions run faster
    (EfficientNet-Lite0's reconstruction 1.35x, ResNet-20's 1.15x; ``benchmarks/iteration_cost.py``).
    ``None``: on for models with 2-D convolutions on the CPU unless ``compile``, off elsewhere. The
    quantized model is the same kind of result either way, not the same bits: the convolutions sum in
    another order and a drop mask falls on other elements, as on another machine.
    """

    n_bits_w: int = 4
    n_bits_a: int = 4
    channel_wise: bool = True
    act_quant: bool = True
    order: str = "together"
    wwq: bool = True
    waq: bool = True
    awq: bool = True
    aaq: bool = True
    weight: float = 0.01
    prob: float = 0.5
    input_prob: float = 0.5
    input_drop: str = "float"
    iters_w: int = 20000
    batch_size: int = 32
    micro_batch_size: int | None = None
    cache_dtype: str | None = None
    cache_dir: str | None = None
    num_samples: int = 1024
    lr: float = 4e-5
    round_lr: float | None = None
    bias_correction: bool | None = None
    depthwise_range: str | None = None
    warmup: float = 0.2
    b_start: float = 20.0
    b_end: float = 2.0
    init_wmode: str = "mse"
    init_amode: str = "mse"
    disable_8bit_head_stem: bool = False
    seed: int = 1005
    device: str | None = None
    compile: bool = False
    channels_last: bool | None = None
    keep_fp_modules: list[str] = field(default_factory=list)

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        def bad(name, why):
            raise QDropConfigError(f"invalid QDrop config: {name}={getattr(self, name)!r}: {why}")

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
        for name in ("bias_correction", "channels_last"):
            if getattr(self, name) not in (None, True, False):
                bad(name, "True, False, or None for the default")
        if self.depthwise_range not in (None,) + DEPTHWISE_RANGES:
            bad("depthwise_range", f"choose one of {DEPTHWISE_RANGES}, or None for the model family's default")
        for name in ("init_wmode", "init_amode"):
            if getattr(self, name) not in RANGE_MODES:
                bad(name, f"choose one of {RANGE_MODES}")
        if self.iters_w < 0:
            bad("iters_w", "must be >= 0 (0 means round-to-nearest, no reconstruction)")
        for name in ("batch_size", "num_samples"):
            if getattr(self, name) < 1:
                bad(name, "must be >= 1")
        if self.micro_batch_size is not None and self.micro_batch_size < 1:
            bad("micro_batch_size", "must be >= 1, or None for the whole batch")
        if self.cache_dtype is not None and self.cache_dtype not in CACHE_DTYPES:
            bad("cache_dtype", f"choose one of {CACHE_DTYPES}, or None to cache in the model's precision")
        if self.cache_dir is not None and not (os.path.isdir(self.cache_dir) and os.access(self.cache_dir, os.W_OK)):
            bad("cache_dir", "not a writable directory")
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
        """The settings that made the result; ``cache_dir``, a scratch place on one machine, is left out."""
        values = dataclasses.asdict(self)
        values.pop("cache_dir")
        return values

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
