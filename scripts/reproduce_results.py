#!/usr/bin/env python
"""Regenerate every accuracy figure README.md shows: run each experiment, then write
``OUT/results.md`` (one table per task, with the command behind it) and ``OUT/accuracy_vs_bits.png``
(float / round-to-nearest / No-Drop / QDrop per bit width per task; needs matplotlib).

    python scripts/reproduce_results.py --budget quick OUT     # about 80 min on 2 CPU cores
    python scripts/reproduce_results.py --budget full OUT      # the method's budgets: hours on a CPU

Each run writes ``OUT/<task>/<run>/results.json``; a run whose results.json exists is not run again,
so an interrupted call picks up where it stopped. ``OUT --tasks lite0 ...`` (after OUT) runs a subset.
"""
from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path("../shared/data")  # relative to ROOT: the commands run there and read as written

# Per-budget settings: iterations per block, calibration samples, bit widths.
BUDGETS = {
    "quick": {
        "sst2": dict(iters=200, samples=256, bits=["W4A8", "W2A8", "W4A4"]),
        "squad": dict(iters=100, samples=128, bits=["W4A8", "W2A8"], finetune_epochs=4),
        "resnet20": dict(iters=200, samples=512, bits=["W4A4", "W2A4"]),
        "cases": dict(iters=200, samples=512, bits=["W2A2"]),
        "lite0": dict(iters=100, samples=256, bits=["W4A4"]),
    },
    "full": {
        "sst2": dict(iters=20000, samples=1024, bits=["W8A8", "W4A8", "W2A8", "W4A4", "W2A4"]),
        "squad": dict(iters=20000, samples=1024, bits=["W8A8", "W4A8", "W2A8", "W4A4"], finetune_epochs=10),
        "resnet20": dict(iters=20000, samples=1024, bits=["W4A4", "W2A4", "W2A2"]),
        "cases": dict(iters=20000, samples=1024, bits=["W2A2"]),
        "lite0": dict(iters=20000, samples=256, bits=["W4A4", "W2A4"]),
    },
}

REFERENCE_FLAGS = "--channel_wise --act_quant"
ARMS = {  # the method's arms, as flags added to a task's command
    "rtn": "--order together --wwq --waq --awq --aaq --iters_w 0",
    "nodrop": "--order together --wwq --waq --awq --aaq --prob 1 --input_prob 1",
    "qdrop": "--order together --wwq --waq --awq --aaq --prob 0.5 --input_prob 0.5",
}
CASES = {  # the reference implementation's "More experiments", flag for flag
    "case1": "--order after --wwq --awq --aaq --input_prob 1.0 --prob 1.0",
    "case2": "--order before --wwq --waq --aaq --input_prob 1.0 --prob 1.0",
    "case3": "--order after --wwq --waq --awq --aaq --input_prob 1.0 --prob 1.0",
    "nodrop": ARMS["nodrop"],
    "qdrop": ARMS["qdrop"],
}
ARM_NAMES = {"fp": "float", "rtn": "round-to-nearest", "nodrop": "No-Drop", "qdrop": "QDrop",
             "case1": "Case 1", "case2": "Case 2", "case3": "Case 3"}


@dataclass
class Task:
    name: str
    title: str
    script: str
    data: str            # the task's model and data flags
    metric: str          # the results.json key shown
    scale: float = 1.0   # to percent
    arms: dict = None

    def command(self, bits: str, arm: str, settings: dict, out: Path, fp_eval: bool) -> list[str]:
        w, a = bits[1:].split("A")
        iters = "" if arm == "rtn" else f"--iters_w {settings['iters']}"
        line = (f"{sys.executable} {self.script} {self.data} --n_bits_w {w} --n_bits_a {a} {REFERENCE_FLAGS} "
                f"{(self.arms or ARMS)[arm]} {iters} --num_samples {settings['samples']} "
                f"{'' if fp_eval else '--skip_fp_eval'} --output_dir {out} --overwrite_output_dir")
        return shlex.split(line)


def tasks(out: Path) -> dict[str, Task]:
    squad_model = out / "squad" / "minilm-squad"
    cifar = (f"--arch resnet20 --weights {SHARED}/cifar10-resnet/resnet20-12fca82f.th "
             f"--train_dir {SHARED}/cifar10/train-subset --validation_dir {SHARED}/cifar10/test --weight 0.01")
    return {
        "sst2": Task("sst2", "SST-2, MiniLM-L6-SST2, 872 validation sentences (accuracy)", "run_glue.py",
                     f"--model_name_or_path {SHARED}/models/minilm-l6-sst2 --train_file {SHARED}/glue/sst2/train.tsv "
                     f"--validation_file {SHARED}/glue/sst2/validation.tsv --batch_size 32", "accuracy", 100.0),
        "squad": Task("squad", "SQuAD v1.1, MiniLM-L6 QA head fine-tuned by scripts/finetune_qa.py, held-out articles (F1)",
                      "run_squad.py", f"--model_name_or_path {squad_model} --train_file {squad_model}/train.jsonl "
                      f"--validation_file {squad_model}/validation.jsonl --batch_size 16", "f1"),
        "resnet20": Task("resnet20", "CIFAR-10, ResNet-20, 10,000 test images (top-1)", "run_imagenet.py", cifar, "top1"),
        "cases": Task("cases", "CIFAR-10 ResNet-20: where activation ranges are set (the reference's Case 1/2/3)",
                      "run_imagenet.py", cifar, "top1", arms=CASES),
        "lite0": Task("lite0", "ImageNet sample, EfficientNet-Lite0, 744 held-out images (top-1)", "run_imagenet.py",
                      f"--arch efficientnet_lite0 --validation_dir {SHARED}/imagenet-sample "
                      "--num_calib_from_validation 256 --batch_size 32 --weight 0.1", "top1"),
    }


def run(cmd: list[str], out: Path, log: Path) -> dict:
    if (out / "results.json").exists():
        return json.loads((out / "results.json").read_text())
    out.parent.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): {shlex.join(cmd)}; see {log}")
    print(f"  {out.name}: {time.perf_counter() - t:.0f} s", flush=True)
    return json.loads((out / "results.json").read_text())


def finetune_qa(out: Path, epochs: int) -> None:
    model = out / "squad" / "minilm-squad"
    if (model / "model.safetensors").exists():
        return
    print("fine-tuning the QA model", flush=True)
    cmd = [sys.executable, "scripts/finetune_qa.py", "--output_dir", str(model), "--epochs", str(epochs)]
    model.mkdir(parents=True, exist_ok=True)
    with open(out / "squad" / "finetune.log", "w") as f:
        if subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT).returncode != 0:
            sys.exit(f"fine-tuning failed: see {out / 'squad' / 'finetune.log'}")


def run_task(task: Task, settings: dict, out: Path) -> dict:
    """{bits: {arm: metric}} plus the float metric under "fp"."""
    table = {}
    for i, bits in enumerate(settings["bits"]):
        row = table.setdefault(bits, {})
        for arm in (task.arms or ARMS):
            folder = out / task.name / f"{bits.lower()}-{arm}"
            fp_eval = i == 0 and arm == next(iter(task.arms or ARMS))
            result = run(task.command(bits, arm, settings, folder, fp_eval), folder, folder.with_suffix(".log"))
            row[arm] = result["quant"][task.metric] * task.scale
            if fp_eval:
                table["fp"] = result["fp"][task.metric] * task.scale
    return table


def markdown(task: Task, settings: dict, table: dict, budget: str, out: Path) -> str:
    arms = list(task.arms or ARMS)
    head = "| W/A | float | " + " | ".join(ARM_NAMES[a] for a in arms) + " | best − float |"
    lines = [f"### {task.title}", "", head, "|" + "---|" * (len(arms) + 3)]
    for bits in settings["bits"]:
        row = table[bits]
        best = max(row[a] for a in arms if a != "rtn")
        cells = " | ".join(f"**{row[a]:.2f}**" if row[a] == best else f"{row[a]:.2f}" for a in arms)
        lines.append(f"| {bits} | {table['fp']:.2f} | {cells} | {best - table['fp']:+.2f} |")
    example = task.command(settings["bits"][0], arms[-1], settings, Path("OUT"), False)
    example = shlex.join(["python", *example[1:]]).replace(str(out), "OUT")
    lines += ["", f"Budget `{budget}`: {settings['iters']} iterations per block, {settings['samples']} calibration "
              "samples. Each cell is one run of", "", "```bash", wrapped(example), "```", "", "with the column's flags in place of `" + (task.arms or ARMS)[arms[-1]] + "`: "
              + "; ".join(f"{ARM_NAMES[a]} `{f}`" for a, f in (task.arms or ARMS).items()) + ".", ""]
    return "\n".join(lines)


def wrapped(command: str, width: int = 100) -> str:
    """A shell command broken before its flags into lines of at most about ``width`` characters."""
    lines, line = [], ""
    for part in command.replace(" --", "\0--").split("\0"):
        if line and len(line) + len(part) + 1 > width:
            lines.append(line + " \\")
            line = "  " + part
        else:
            line = f"{line} {part}" if line else part
    return "\n".join(lines + [line])


def plot(tables: dict, all_tasks: dict, budgets: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no", path.name)
        return False
    shown = [name for name in tables if all_tasks[name].arms is None]
    fig, axes = plt.subplots(1, len(shown), figsize=(4.2 * len(shown), 3.6), dpi=110, squeeze=False)
    for ax, name in zip(axes[0], shown):
        table, bits = tables[name], budgets[name]["bits"]
        ax.axhline(table["fp"], color="black", linestyle="--", label="float")
        for arm, style in (("rtn", "s:"), ("nodrop", "^-"), ("qdrop", "o-")):
            ax.plot(bits, [table[b][arm] for b in bits], style, label=ARM_NAMES[arm])
        ax.set_title(name, fontsize=10)
        ax.set_ylabel(all_tasks[name].metric)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def cpu_name() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        import platform

        return platform.processor() or "an unknown CPU"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--budget", choices=sorted(BUDGETS), default="quick")
    parser.add_argument("--tasks", nargs="+", help="a subset of the budget's tasks")
    args = parser.parse_args()
    budgets = BUDGETS[args.budget]
    names = args.tasks or list(budgets)
    unknown = sorted(set(names) - set(budgets))
    if unknown:
        sys.exit(f"unknown tasks {unknown} for budget {args.budget}: {sorted(budgets)}")
    out = args.out.resolve()
    all_tasks = tasks(out)
    tables = {}
    for name in names:
        print(f"{name}:", flush=True)
        if name == "squad":
            finetune_qa(out, budgets[name]["finetune_epochs"])
        tables[name] = run_task(all_tasks[name], budgets[name], out)
        (out / "tables.json").write_text(json.dumps(tables, indent=2))
    sections = [markdown(all_tasks[n], budgets[n], tables[n], args.budget, out) for n in names]
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    header = (f"# Results, budget `{args.budget}`\n\nqdrop_hf at commit {git or 'unknown'} on {cpu_name()}, "
              f"`bash scripts/reproduce_results.sh --budget {args.budget} OUT`. Bold: the best "
              "reconstruction arm of a row.\n")
    (out / "results.md").write_text(header + "\n" + "\n".join(sections))
    plot(tables, all_tasks, budgets, out / "accuracy_vs_bits.png")
    print(f"wrote {out / 'results.md'}")


if __name__ == "__main__":
    main()
