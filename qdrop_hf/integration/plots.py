"""``reconstruction.png``: each block's error at round-to-nearest and after reconstruction.

It is the first thing to look at in a quantized model's folder: a block whose error reconstruction
did not lower, or one whose error stands far above its neighbours', is where accuracy went. Drawn
with matplotlib (the ``plots`` extra); without it the folder is complete but for the picture.
"""
from __future__ import annotations

import logging
from pathlib import Path

PLOT_NAME = "reconstruction.png"
logger = logging.getLogger("qdrop_hf")


def reconstruction_plot(units: list[dict], path: str | Path) -> bool:
    """Draw the per-unit errors of a ``qdrop_report["units"]`` list into ``path``; False (and one
    log line) where matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.info("matplotlib is not installed (pip install 'qdrop_hf[plots]'): no %s", PLOT_NAME)
        return False
    names = [u["unit"] for u in units]
    x = range(len(units))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.35 * len(units) + 2), 4.2), dpi=110)
    ax.plot(x, [u["rtn_error"] for u in units], "o-", color="tab:red", label="round-to-nearest")
    ax.plot(x, [u["error"] for u in units], "o-", color="tab:blue", label="after reconstruction")
    ax.set_yscale("log")
    ax.set_xticks(list(x), names, rotation=70, ha="right", fontsize=7)
    ax.set_ylabel("block output MSE vs float (calibration data)")
    ax.set_title("QDrop block reconstruction")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True
