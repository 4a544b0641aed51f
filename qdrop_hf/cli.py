"""What the three ``run_*.py`` scripts share: the quantization arguments (the seed's flag names),
argument parsing (flags or one JSON file), user-facing errors, and writing results.

The switches ``--channel_wise --act_quant --wwq --waq --awq --aaq`` are off unless given, exactly as
in the seed's ``main_imagenet.py``, so its Case 1/2/3 and No-Drop lines mean what they meant there.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from transformers import HfArgumentParser

from . import distributed
from .batches import CalibrationDataError
from .checkpoint import Checkpoint, ResumeError
from .config import QDropConfig, QDropConfigError
from .families import UnsupportedModelError
from .hf_integration import push_to_hub, save_quantized
from .quantize import quantize_model


class UserError(Exception):
    """Bad input from the user: reported as one line, exit code 2, no traceback."""


USER_ERRORS = (UserError, QDropConfigError, CalibrationDataError, UnsupportedModelError, FileNotFoundError, ResumeError)


@dataclass
class QuantArguments:
    n_bits_w: int = field(default=4, metadata={"help": "weight bits (2-8)"})
    n_bits_a: int = field(default=4, metadata={"help": "activation bits (2-8)"})
    channel_wise: bool = field(default=False, metadata={"help": "per-output-channel weight quantization"})
    act_quant: bool = field(default=False, metadata={"help": "quantize activations"})
    order: str = field(default="together", metadata={"help": "activation calibration order: before|after|together"})
    wwq: bool = field(default=False, metadata={"help": "weight reconstruction sees inputs with earlier weights quantized"})
    waq: bool = field(default=False, metadata={"help": "weight reconstruction sees inputs with earlier activations quantized"})
    awq: bool = field(default=False, metadata={"help": "activation calibration with weights quantized"})
    aaq: bool = field(default=False, metadata={"help": "activation calibration with earlier activations quantized"})
    weight: float = field(default=0.01, metadata={"help": "weight of the AdaRound rounding loss"})
    prob: float = field(default=0.5, metadata={"help": "QDrop: probability of keeping an activation quantized"})
    input_prob: float = field(default=0.5, metadata={"help": "QDrop: probability of keeping the block input quantized"})
    input_drop: str = field(default="float", metadata={
        "help": "QDrop: a dropped block-input element takes the float model's value (float, the reference "
                "implementation) or the quantized model's own value before its activation quantizer (unquantized)"})
    num_samples: int = field(default=1024, metadata={"help": "calibration samples"})
    iters_w: int = field(default=20000, metadata={"help": "reconstruction iterations per block (0: round-to-nearest)"})
    batch_size: int = field(default=32, metadata={"help": "reconstruction mini-batch size"})
    micro_batch_size: int | None = field(default=None, metadata={
        "help": "run each reconstruction batch in chunks of this many samples, gradients accumulated: the same "
                "update with the activation memory of a smaller batch"})
    cache_dtype: str | None = field(default=None, metadata={
        "help": "store block caches in float16 or bfloat16 (half the cache memory; default: the model's precision)"})
    cache_dir: str | None = field(default=None, metadata={
        "help": "keep block caches in a temporary file in this directory, read back a batch at a time "
                "(memory holds one batch of a cache instead of all of it)"})
    lr: float = field(default=4e-5, metadata={"help": "learning rate of the activation steps (LSQ)"})
    round_lr: float | None = field(default=None, metadata={
        "help": "learning rate of the AdaRound variables (default: 50 / iters_w, within [1e-3, 0.1])"})
    bias_correction: bool | None = field(default=None, metadata={
        "help": "subtract the mean output shift that weight rounding causes (dW·E[x]) from each layer's float bias "
                "(default: on for networks of depthwise convolutions: MobileNetV2, MNasNet, EfficientNet-Lite)"})
    depthwise_range: str | None = field(default=None, metadata={
        "help": "depthwise kernels' ranges: weight (the weights' own error, as every other layer) or output (the "
                "error at the kernel's output on the calibration data; default for networks of depthwise convolutions)"})
    warmup: float = field(default=0.2, metadata={"help": "fraction of iterations without the rounding loss"})
    b_start: float = field(default=20.0, metadata={"help": "rounding-loss beta at the start of annealing"})
    b_end: float = field(default=2.0, metadata={"help": "rounding-loss beta at the end"})
    init_wmode: str = field(default="mse", metadata={"help": "weight range init: mse|minmax"})
    init_amode: str = field(default="mse", metadata={"help": "activation range init: mse|minmax"})
    disable_8bit_head_stem: bool = field(default=False, metadata={"help": "do not keep stem/head at 8 bits"})
    seed: int = field(default=1005, metadata={"help": "random seed (calibration sampling, drop masks)"})
    device: str | None = field(default=None, metadata={"help": "cuda or cpu (default: cuda when available)"})
    compile: bool = field(default=False, metadata={"help": "fuse fake-quant kernels with torch.compile"})
    channels_last: bool | None = field(default=None, metadata={
        "help": "calibrate and reconstruct with channels-last activations (default: for 2-D convolutions on the CPU, "
                "where mkldnn runs them faster)"})

    def to_config(self) -> QDropConfig:
        return QDropConfig.from_saved(vars(self))


@dataclass
class RunArguments:
    output_dir: str = field(metadata={"help": "where results.json (and the quantized model) go"})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "replace a non-empty output_dir"})
    skip_fp_eval: bool = field(default=False, metadata={"help": "do not evaluate the float model"})


@dataclass
class HubRunArguments(RunArguments):
    push_to_hub: bool = field(default=False, metadata={"help": "upload the quantized model and its card"})
    hub_model_id: str | None = field(default=None, metadata={"help": "repository for --push_to_hub"})
    hub_token: str | None = field(default=None, metadata={"help": "token for --push_to_hub (default: your login)"})

    def __post_init__(self):
        if self.push_to_hub and not self.hub_model_id:
            raise UserError("--push_to_hub needs --hub_model_id")

    def push(self, folder: Path) -> None:
        """Upload the saved folder when asked; a failed upload leaves the folder valid and says where it is."""
        if not self.push_to_hub or not distributed.is_main():
            return
        try:
            url = push_to_hub(folder, self.hub_model_id, token=self.hub_token)
        except Exception as err:  # network, auth or permission
            raise UserError(f"could not push to {self.hub_model_id}: {err}; the quantized model is in {folder}") from err
        logging.getLogger("qdrop_hf").info("pushed to %s", url)


def quantize_and_evaluate(model, calibration, config: QDropConfig, evaluate, skip_fp_eval: bool,
                          checkpoint: Checkpoint | None = None):
    """FP evaluation (unless skipped), QDrop (resumable through ``checkpoint``), quantized evaluation;
    returns the model and the results entries every script writes: ``fp``, ``quant``, ``time_s`` and
    the per-block ``blocks`` report."""
    logger = logging.getLogger("qdrop_hf")
    results, times = {}, {}
    if not skip_fp_eval:
        t = time.perf_counter()
        results["fp"] = evaluate(model, "eval FP")
        times["fp_eval"] = time.perf_counter() - t
        logger.info("FP: %s", results["fp"])
    t = time.perf_counter()
    model = quantize_model(model, calibration, config, checkpoint=checkpoint)
    times["quantize"] = time.perf_counter() - t
    t = time.perf_counter()
    results["quant"] = evaluate(model, "eval quantized")
    times["quant_eval"] = time.perf_counter() - t
    logger.info("W%dA%s: %s", config.n_bits_w, config.n_bits_a if config.act_quant else "32", results["quant"])
    results["time_s"] = times
    results["blocks"] = model.qdrop_report["units"]
    return model, results


def quantize_evaluate_save(out: Path, results: dict, model, calibration, config: QDropConfig, evaluate,
                           run_args: HubRunArguments, preprocessor, calibration_note: str) -> None:
    """What every script does once model and data are loaded: FP evaluation, resumable QDrop and the
    quantized evaluation; then ``results.json`` and the quantized model written (main process only,
    all or nothing), the resume checkpoint removed and, when asked, the upload."""
    checkpoint = run_checkpoint(out, results["config"])
    model, measured = quantize_and_evaluate(model, calibration, config, evaluate, run_args.skip_fp_eval, checkpoint)
    results.update(measured)
    write_outputs(out, results, lambda folder: save_quantized(model, preprocessor, folder, results,
                                                              calibration=calibration_note))
    checkpoint.clear()
    run_args.push(out)


def recorded_arguments(*argument_sets) -> dict:
    """Every argument, merged, for results.json; secrets (the hub token) are left out."""
    merged = {k: v for args in argument_sets for k, v in asdict(args).items()}
    merged.pop("hub_token", None)
    return merged


def parse_args(*dataclass_types):
    """Flags, or a single ``.json`` file holding them, as transformers' example scripts accept."""
    parser = HfArgumentParser(dataclass_types)
    if len(sys.argv) == 2 and sys.argv[1].endswith(".json"):
        return parser.parse_json_file(json_file=os.path.abspath(sys.argv[1]))
    return parser.parse_args_into_dataclasses()


def run_main(main) -> None:
    """Run a script's ``main`` (in each process when launched with several); user errors become one
    clear line on stderr and exit code 2."""
    try:
        distributed.init()
        main()
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    finally:
        distributed.finish()


CHECKPOINT_DIR = "qdrop_checkpoint"
# Arguments that do not change the quantized model: a run may resume with them changed.
NOT_IN_IDENTITY = {"output_dir", "overwrite_output_dir", "skip_fp_eval", "push_to_hub", "hub_model_id",
                   "eval_batch_size", "max_eval_samples"}


def check_output_dir(path: str, overwrite: bool) -> Path:
    """Refuse a non-empty or unwritable output_dir up front, before any work and without writing.

    A folder holding only an unfinished run's ``qdrop_checkpoint`` is accepted: the run resumes there.
    ``overwrite`` discards such a checkpoint, so the run starts fresh."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise UserError(f"output_dir {out} exists and is not a directory")
    if out.exists():
        contents = {p.name for p in out.iterdir()}
        if overwrite:
            shutil.rmtree(out / CHECKPOINT_DIR, ignore_errors=True)
        elif contents and contents != {CHECKPOINT_DIR}:
            raise UserError(f"output_dir {out} exists and is not empty; pass --overwrite_output_dir to replace it")
    existing = next(p for p in [out, *out.parents] if p.exists())
    if not os.access(existing, os.W_OK):
        raise UserError(f"output_dir {out} is not writable")
    return out


def run_checkpoint(out: Path, arguments: dict) -> Checkpoint:
    """The resume checkpoint of a script run: in ``<output_dir>/qdrop_checkpoint``, tied to every
    argument that changes the quantized model."""
    checkpoint = Checkpoint(out / CHECKPOINT_DIR, {k: v for k, v in arguments.items() if k not in NOT_IN_IDENTITY})
    checkpoint.check()  # a mismatch is refused now, before any work
    return checkpoint


def write_outputs(out: Path, results: dict, save_model) -> None:
    """``results.json`` and ``save_model(folder)`` into a staging folder, then its files moved into
    ``out``. A failure on the way (disk full, read-only or vanished folder) leaves ``out`` as it was
    and is reported as one line. Only the main process writes."""
    if not distributed.is_main():
        return
    created = not out.exists()
    staging = out / ".staging"
    try:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        (staging / "results.json").write_text(json.dumps(results, indent=2, sort_keys=True, default=str))
        save_model(staging)
        for path in staging.iterdir():
            os.replace(path, out / path.name)
        staging.rmdir()
    except OSError as err:
        shutil.rmtree(staging, ignore_errors=True)
        if created and out.exists() and not any(out.iterdir()):
            out.rmdir()
        raise UserError(f"could not write the results to {out}: {err.strerror or err}") from err
