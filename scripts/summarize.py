"""One line per run under a table script's output folder: FP and quantized metrics, quantization time.

    python scripts/summarize.py OUT
"""
import json
import pathlib
import sys


def fmt(metrics: dict) -> str:
    return " ".join(f"{k}={v * 100 if k in ('accuracy', 'pearsonr', 'spearmanr') else v:.2f}" for k, v in metrics.items()
                    if isinstance(v, float) and not k.startswith(("best_", "HasAns", "NoAns")))


for path in sorted(pathlib.Path(sys.argv[1]).glob("*/results.json")):
    r = json.loads(path.read_text())
    print(f"{path.parent.name:14s} fp[{fmt(r.get('fp', {}))}] quant[{fmt(r['quant'])}] quantize={r['time_s']['quantize']:.0f}s")
