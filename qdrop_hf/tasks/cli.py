"""What the three ``run_*.py`` scripts share: argument parsing (flags or one JSON file, with
``QDropConfig`` and ``RuntimeConfig`` parsed as they are), user-facing errors, and writing results.

The switches ``--channel_wise --act_quant --wwq --waq --awq --aaq`` are on by default, as in Python.
A command line written in the reference implementation's style, which names some of them as bare
flags (``--order after --wwq --awq --aaq``), means what it meant there: the switches it names are
on and the others off, so its Case 1/2/3 and No-Drop lines run the same experiments.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from transformers import HfArgumentParser

from .. import distributed
from ..batches import CalibrationDataError
from ..checkpoint import Checkpoint, ResumeError
from ..config import REFERENCE_SWITCHES, QDropConfig, QDropConfigError, RuntimeConfig
from ..families import UnsupportedModelError
from ..integration.hub import push_to_hub
from ..integration.onnx_export import ExportError, OnnxModel, export_onnx
from ..integration.serialization import save_quantized
from ..quantize import quantize_model


class UserError(Exception):
    """Bad input from the user: reported as one line, exit code 2, no traceback."""


USER_ERRORS = (UserError, QDropConfigError, CalibrationDataError, UnsupportedModelError, FileNotFoundError, ResumeError,
               ExportError)


@dataclass
class RunArguments:
    output_dir: str = field(metadata={"help": "where results.json (and the quantized model) go"})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "replace a non-empty output_dir"})
    skip_fp_eval: bool = field(default=False, metadata={"help": "do not evaluate the float model"})
    export_onnx: bool = field(default=False, metadata={
        "help": "also export the quantized model to <output_dir>/onnx and evaluate it there with ONNX Runtime "
                "(results.json 'onnx'); needs the onnx extra"})

    def __post_init__(self):
        if self.export_onnx:
            missing = [m for m in ("onnx", "onnxruntime", "onnxscript") if importlib.util.find_spec(m) is None]
            if missing:
                raise UserError(f"--export_onnx needs {', '.join(missing)}: pip install 'qdrop_hf[onnx]'")


@dataclass
class HubRunArguments(RunArguments):
    push_to_hub: bool = field(default=False, metadata={"help": "upload the quantized model and its card"})
    hub_model_id: str | None = field(default=None, metadata={"help": "repository for --push_to_hub"})
    hub_token: str | None = field(default=None, metadata={"help": "token for --push_to_hub (default: your login)"})

    def __post_init__(self):
        super().__post_init__()
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


def quantize_and_evaluate(model, calibration, config: QDropConfig, runtime: RuntimeConfig, evaluate,
                          skip_fp_eval: bool, checkpoint: Checkpoint | None = None):
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
    model = quantize_model(model, calibration, config, checkpoint=checkpoint, runtime=runtime)
    times["quantize"] = time.perf_counter() - t
    t = time.perf_counter()
    results["quant"] = evaluate(model, "eval quantized")
    times["quant_eval"] = time.perf_counter() - t
    logger.info("W%dA%s: %s", config.n_bits_w, config.n_bits_a if config.act_quant else "32", results["quant"])
    results["time_s"] = times
    results["blocks"] = model.qdrop_report["units"]
    if "outlier_migration" in model.qdrop_report:  # {part: {place: largest channel scale}}
        results["outlier_migration"] = model.qdrop_report["outlier_migration"]
    return model, results


def quantize_evaluate_save(out: Path, results: dict, model, calibration, config: QDropConfig, runtime: RuntimeConfig,
                           evaluate, run_args: HubRunArguments, preprocessor, calibration_note: str) -> None:
    """What every script does once model and data are loaded: FP evaluation, resumable QDrop and the
    quantized evaluation; then ``results.json`` and the quantized model written (main process only,
    all or nothing), the resume checkpoint removed and, when asked, the upload."""
    checkpoint = run_checkpoint(out, results["config"])
    model, measured = quantize_and_evaluate(model, calibration, config, runtime, evaluate, run_args.skip_fp_eval,
                                            checkpoint)
    results.update(measured)

    def save(folder: Path) -> None:
        if run_args.export_onnx:
            results["onnx"] = export_and_evaluate(model, folder, calibration, preprocessor, evaluate)
        save_quantized(model, preprocessor, folder, results, calibration=calibration_note)

    write_outputs(out, results, save)
    checkpoint.clear()
    run_args.push(out)


def export_and_evaluate(model, folder: Path, calibration, preprocessor, evaluate) -> dict:
    """Export to ``folder/onnx`` (a calibration batch as the sample input) and evaluate the exported
    model with ONNX Runtime: the task's metrics, the time per batch in ONNX Runtime and its providers."""
    runner = OnnxModel(export_onnx(model, folder, calibration[0], preprocessor))
    metrics = evaluate(runner, "eval ONNX")
    logging.getLogger("qdrop_hf").info("ONNX Runtime: %s", metrics)
    return {**metrics, "latency_ms_per_batch": 1e3 * runner.seconds / max(runner.calls, 1),
            "providers": runner.inference.get_providers()}


def recorded_arguments(*argument_sets) -> dict:
    """Every argument, merged, for results.json; secrets (the hub token) are left out."""
    merged = {k: v for args in argument_sets for k, v in asdict(args).items()}
    merged.pop("hub_token", None)
    return merged


def parse_args(*dataclass_types, argv: list[str] | None = None):
    """Flags, or a single ``.json`` file holding them, as transformers' example scripts accept; a
    command line in the reference implementation's style turns the reference switches it does not name off."""
    argv = sys.argv[1:] if argv is None else argv
    parser = HfArgumentParser(dataclass_types)
    if len(argv) == 1 and argv[0].endswith(".json"):
        return parser.parse_json_file(json_file=os.path.abspath(argv[0]))
    parsed = parser.parse_args_into_dataclasses(args=argv)
    off = reference_style_off(argv)
    for values in parsed:
        if isinstance(values, QDropConfig) and off:
            for name in off:
                setattr(values, name, False)
            values.validate()
    return parsed


_BOOL_WORDS = {"true", "false", "yes", "no", "t", "f", "y", "n", "1", "0"}


def reference_style_off(argv: list[str]) -> list[str]:
    """The reference switches a reference-style command line leaves off: where any of them stands as a
    bare flag (``--wwq``, no value after it), those not named at all; otherwise none."""
    bare, named = set(), set()
    for i, token in enumerate(argv):
        for name in REFERENCE_SWITCHES:
            if token in (f"--{name}", f"--no_{name}") or token.startswith(f"--{name}="):
                named.add(name)
                following = argv[i + 1].lower() if i + 1 < len(argv) else None
                if token == f"--{name}" and following not in _BOOL_WORDS:
                    bare.add(name)
    return [name for name in REFERENCE_SWITCHES if name not in named] if bare else []


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
NOT_IN_IDENTITY = {"output_dir", "overwrite_output_dir", "skip_fp_eval", "export_onnx", "push_to_hub", "hub_model_id",
                   "eval_batch_size", "max_eval_samples", *(f.name for f in fields(RuntimeConfig))}


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
    """``save_model(folder)`` (which may add to ``results``), then ``results.json``, into a staging
    folder, then its files moved into ``out``. A failure on the way (disk full, read-only or vanished
    folder, a failed export) leaves ``out`` as it was; a failed write is reported as one line. Only
    the main process writes."""
    if not distributed.is_main():
        return
    created = not out.exists()
    staging = out / ".staging"
    try:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        save_model(staging)
        (staging / "results.json").write_text(json.dumps(results, indent=2, sort_keys=True, default=str))
        for path in staging.iterdir():
            if path.is_dir() and (out / path.name).is_dir():
                shutil.rmtree(out / path.name)  # a folder of an earlier run (onnx/): replaced whole
            os.replace(path, out / path.name)
        staging.rmdir()
    except BaseException as err:
        shutil.rmtree(staging, ignore_errors=True)
        if created and out.exists() and not any(out.iterdir()):
            out.rmdir()
        if isinstance(err, OSError):
            raise UserError(f"could not write the results to {out}: {err.strerror or err}") from err
        raise
