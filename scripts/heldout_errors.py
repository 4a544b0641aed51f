"""Where a quantized image classifier loses accuracy: each block's output error on the calibration
images against the held-out ones.

Reads a `run_imagenet.py` output folder, rebuilds the float model and the same seeded split of
calibration and evaluation images from its results.json, and runs both models side by side. Per body
block (and the logits) it prints the relative error ||quantized - float||^2 / ||float||^2 summed over
each image set, then top-1 of both models on both sets. A block whose calibration error falls while its
held-out error does not has fitted the calibration images, not the task.

    python scripts/heldout_errors.py outputs/lite0-w2a4 [--max_images 744]
"""
import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import run_imagenet  # noqa: E402
from qdrop_hf.families import find_family, matches  # noqa: E402
from qdrop_hf.hf_integration import load_quantized  # noqa: E402
from qdrop_hf.plan import first_output  # noqa: E402


def fields(cls, config: dict):
    return cls(**{f.name: config[f.name] for f in dataclasses.fields(cls) if f.name in config})


@torch.no_grad()
def compare(quantized, fp, names, images, preprocess, limit, batch_size=64):
    """Relative error per named module output and at the logits, and top-1 of (quantized, float)."""
    n = min(limit, len(images.labels))
    sums = {name: [0.0, 0.0] for name in names + ["logits"]}
    correct = [0, 0]
    outs = ({}, {})  # module name -> the last batch's output, of each model
    hooks = [dict(model.named_modules())[name].register_forward_hook(
                 lambda m, a, o, seen=seen, name=name: seen.__setitem__(name, o))
             for model, seen in zip((quantized, fp), outs) for name in names]
    try:
        for start in range(0, n, batch_size):
            idx = range(start, min(start + batch_size, n))
            x = preprocess([images.load(i) for i in idx])
            y = torch.tensor([images.labels[i] for i in idx])
            for k, (model, seen) in enumerate(zip((quantized, fp), outs)):
                out = model(x)
                seen["logits"] = getattr(out, "logits", out)
                correct[k] += (seen["logits"].argmax(-1) == y).sum().item()
            for name, s in sums.items():
                q, f = first_output(outs[0][name]), first_output(outs[1][name])
                s[0] += (q - f).pow(2).sum().item()
                s[1] += f.pow(2).sum().item()
    finally:
        for h in hooks:
            h.remove()
    return {name: e / max(norm, 1e-30) for name, (e, norm) in sums.items()}, [100.0 * c / n for c in correct]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output_dir", help="a run_imagenet.py output folder (results.json and the quantized model)")
    parser.add_argument("--max_images", type=int, default=10 ** 9, help="at most this many images of each set")
    args = parser.parse_args()
    results = Path(args.output_dir) / "results.json"
    if not results.is_file():
        parser.error(f"{results} not found: give a finished run_imagenet.py output folder")
    config = json.loads(results.read_text())["config"]
    torch.set_grad_enabled(False)
    quantized = load_quantized(args.output_dir).eval()
    fp, preprocess, _ = run_imagenet.load_model(fields(run_imagenet.ModelArguments, config))
    fp.eval()
    calib, val = run_imagenet.calibration_split(fields(run_imagenet.DataArguments, config), config["num_samples"],
                                                config["seed"])
    family = find_family(quantized)
    names = [name for name, module in quantized.named_modules() if matches(family.body, name, module)]
    errors, accuracy = {}, {}
    for label, images in (("calibration", calib), ("held-out", val)):
        errors[label], accuracy[label] = compare(quantized, fp, names, images, preprocess, args.max_images)
    print(f"{'block':24s} {'calibration':>12s} {'held-out':>10s} {'ratio':>7s}")
    for name in names + ["logits"]:
        c, h = errors["calibration"][name], errors["held-out"][name]
        print(f"{name:24s} {c:12.4f} {h:10.4f} {h / max(c, 1e-30):7.2f}")
    for label, (q, f) in accuracy.items():
        print(f"top-1 on the {label} images: quantized {q:.2f}, float {f:.2f}")


if __name__ == "__main__":
    main()
