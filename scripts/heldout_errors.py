"""Where a quantized image classifier loses accuracy: each block's output error on the calibration
images against the held-out ones.

Reads a `run_imagenet.py` output folder, rebuilds the float model and the same seeded split of
calibration and evaluation images from its results.json, and runs both models side by side. Per body
block (and the logits) it prints the relative error ||quantized - float||^2 / ||float||^2 summed over
each image set, then top-1 of both models on both sets. A block whose calibration error falls while its
held-out error does not has fitted the calibration images, not the task.

``--perturb_steps REL [REL ...]`` also measures how sharp the quantized model sits on its activation steps
(QDrop's argument is flatness): the mean KL(float || quantized) of the logits on each image set, at the
learned steps and with every activation step scaled by 1 + REL or 1 - REL (random signs, ``--draws``
draws each). A fit that holds only at the exact learned steps shows as a calibration KL that jumps
while the held-out one does not move.

``--split_of RUN`` takes the split of another run instead: a model calibrated on every image (an oracle,
not a result) measured on a standard run's held-out images.

    python scripts/heldout_errors.py outputs/lite0-w2a4 [--max_images 744] [--perturb_steps 1e-3 [--draws 4]]
"""
import argparse
import dataclasses
import json
import random
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

BATCH = 64  # images per forward pass
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import run_imagenet  # noqa: E402
from run_imagenet import image_batches, logits_of  # noqa: E402
from qdrop_hf.families import find_family, matches  # noqa: E402
from qdrop_hf.integration.serialization import load_quantized  # noqa: E402
from qdrop_hf.plan import first_output  # noqa: E402
from qdrop_hf.quantizers import ActQuantizer  # noqa: E402


def fields(cls, config: dict):
    return cls(**{f.name: config[f.name] for f in dataclasses.fields(cls) if f.name in config})


def sample(images, n: int):
    """At most ``n`` of ``images``: all of them, or a seeded random choice kept in their order."""
    if len(images.labels) <= n:
        return images
    return images.subset(sorted(random.Random(0).sample(range(len(images.labels)), n)))


def kl_sum(logits, target) -> float:
    """KL(float || quantized) of the logits, summed over the batch."""
    return F.kl_div(F.log_softmax(logits.float(), -1), F.log_softmax(target.float(), -1), log_target=True,
                    reduction="sum").item()


@torch.no_grad()
def compare(quantized, fp, names, images, preprocess):
    """Relative error per named module output and at the logits, top-1 of (quantized, float), and the
    logits' mean KL(float || quantized)."""
    sums = {name: [0.0, 0.0] for name in names + ["logits"]}
    correct = [0, 0]
    kl = 0.0
    outs = ({}, {})  # module name -> the last batch's output, of each model
    hooks = [dict(model.named_modules())[name].register_forward_hook(
                 lambda m, a, o, seen=seen, name=name: seen.__setitem__(name, o))
             for model, seen in zip((quantized, fp), outs) for name in names]
    try:
        for x, y in image_batches(images, preprocess, BATCH):
            for k, (model, seen) in enumerate(zip((quantized, fp), outs)):
                seen["logits"] = logits_of(model(x))
                correct[k] += (seen["logits"].argmax(-1) == y).sum().item()
            kl += kl_sum(outs[0]["logits"], outs[1]["logits"])
            for name, s in sums.items():
                q, f = first_output(outs[0][name]), first_output(outs[1][name])
                s[0] += (q - f).pow(2).sum().item()
                s[1] += f.pow(2).sum().item()
    finally:
        for h in hooks:
            h.remove()
    n = len(images.labels)
    return ({name: e / max(norm, 1e-30) for name, (e, norm) in sums.items()}, [100.0 * c / n for c in correct],
            kl / n)


@torch.no_grad()
def step_sensitivity(quantized, fp, image_sets, preprocess, rels, draws):
    """{rel: {set label: mean KL(float || quantized)}}, each of ``rels`` averaged over ``draws`` draws
    of every active activation step scaled by 1 ± rel (random signs)."""
    cached = {label: [(x, logits_of(fp(x))) for x, _ in image_batches(images, preprocess, BATCH)]  # loaded once for every draw
              for label, images in image_sets.items()}

    def kl(label):
        return sum(kl_sum(logits_of(quantized(x)), target) for x, target in cached[label]) / len(image_sets[label].labels)

    steps = [(m, m.scale.data.clone()) for m in quantized.modules() if isinstance(m, ActQuantizer) and m.active]
    generator = torch.Generator().manual_seed(0)
    result = {}
    try:
        for rel in rels:
            sums = dict.fromkeys(cached, 0.0)
            for _ in range(draws):
                signs = torch.randint(0, 2, (len(steps),), generator=generator) * 2 - 1
                for (m, learned), sign in zip(steps, signs.tolist()):
                    m.scale.data = learned * (1 + rel * sign)
                for label in cached:
                    sums[label] += kl(label) / draws
            result[rel] = sums
    finally:
        for m, learned in steps:
            m.scale.data = learned
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output_dir", help="a run_imagenet.py output folder (results.json and the quantized model)")
    parser.add_argument("--max_images", type=int, default=10 ** 9,
                        help="at most this many images of each set, a seeded random choice (class folders are sorted)")
    parser.add_argument("--perturb_steps", type=float, nargs="+", default=[], metavar="REL",
                        help="also the logits' KL to float with every activation step scaled by 1 ± REL")
    parser.add_argument("--draws", type=int, default=4, help="random-sign draws per REL")
    parser.add_argument("--split_of", metavar="RUN", help="the calibration/held-out split of another run_imagenet.py "
                        "output folder (its data flags, num_samples and seed) instead of this run's own")
    args = parser.parse_args()
    if args.draws < 1 or any(not 0 <= rel < 1 for rel in args.perturb_steps):
        parser.error("--draws must be at least 1 and each --perturb_steps REL in [0, 1)")

    def run_config(run: str) -> dict:
        results = Path(run) / "results.json"
        if not results.is_file():
            parser.error(f"{results} not found: give a finished run_imagenet.py output folder")
        return json.loads(results.read_text())["config"]

    config = run_config(args.output_dir)
    split = run_config(args.split_of) if args.split_of else config
    torch.set_grad_enabled(False)
    quantized = load_quantized(args.output_dir).eval()
    fp, preprocess, _ = run_imagenet.load_model(fields(run_imagenet.ModelArguments, config))
    fp.eval()
    calib, val = run_imagenet.calibration_split(fields(run_imagenet.DataArguments, split), split["num_samples"],
                                                split["seed"])
    sets = {"calibration": sample(calib, args.max_images), "held-out": sample(val, args.max_images)}
    family = find_family(quantized)
    names = [name for name, module in quantized.named_modules() if matches(family.body, name, module)]
    errors, accuracy, kl = {}, {}, {}
    for label, images in sets.items():
        errors[label], accuracy[label], kl[label] = compare(quantized, fp, names, images, preprocess)
    print(f"{'block':24s} {'calibration':>12s} {'held-out':>10s} {'ratio':>7s}")
    for name in names + ["logits"]:
        c, h = errors["calibration"][name], errors["held-out"][name]
        print(f"{name:24s} {c:12.4f} {h:10.4f} {h / max(c, 1e-30):7.2f}")
    for label, (q, f) in accuracy.items():
        print(f"top-1 on the {label} images ({len(sets[label].labels)}): quantized {q:.2f}, float {f:.2f}")
    if args.perturb_steps:
        perturbed = step_sensitivity(quantized, fp, sets, preprocess, args.perturb_steps, args.draws)
        print(f"{'KL to float at steps':24s} {'calibration':>12s} {'held-out':>10s}")
        for label, values in [("learned", kl)] + [(f"x (1 ± {rel:g})", v) for rel, v in perturbed.items()]:
            print(f"{label:24s} {values['calibration']:12.4g} {values['held-out']:10.4g}")


if __name__ == "__main__":
    main()
