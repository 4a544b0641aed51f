"""The fused CPU fake-quant kernels of ``csrc/fake_quant.cpp``, compiled on first use.

One pass forward and one backward instead of the eager kernels' twelve (a CIFAR ResNet block's
iteration spends a third of an FP forward+backward on them otherwise). Built with torch's JIT
extension loader (``ninja`` and a C++ compiler; about 20 s once, then cached under
``$TORCH_EXTENSIONS_DIR``) and compiled for the machine it runs on. Where the build fails, or with
``QDROP_NATIVE=0``, the eager kernels run instead: same values, slower.
"""
from __future__ import annotations

import logging
import os
import platform
from pathlib import Path

import torch

logger = logging.getLogger(__name__)
_SOURCE = Path(__file__).with_name("csrc") / "fake_quant.cpp"
_state: dict = {}


def fake_quant_kernels():
    """The compiled module (``forward``/``backward``), or None where it cannot be had."""
    if "module" not in _state:
        _state["module"] = _build() if os.environ.get("QDROP_NATIVE", "1") != "0" else None
    return _state["module"]


def _build():
    try:
        from torch.utils.cpp_extension import load

        # -march=native: the build is cached per machine type (the name carries it), never shipped.
        name = f"qdrop_fake_quant_{platform.machine()}"
        flags = ["-O3", "-fno-math-errno", "-fopenmp-simd"]
        if platform.machine() in ("x86_64", "AMD64"):
            flags.append("-march=native")
        # ATen's parallel_for is inlined OpenMP: without -fopenmp it runs on one thread. The library
        # then needs libgomp.so.1, which resolves to the copy torch has already loaded.
        openmp = ["-fopenmp"] if torch.backends.openmp.is_available() else []
        logger.info("building the fused fake-quant kernels (once per machine, about 20 s)")
        return load(name, [str(_SOURCE)], extra_cflags=flags + openmp, extra_ldflags=openmp)
    except Exception as err:  # no compiler, no ninja, unwritable cache: the eager kernels still work
        logger.warning("fused fake-quant kernels unavailable (%s); using the eager ones", err)
        return None
