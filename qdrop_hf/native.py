"""The fused CPU kernels of ``csrc/fake_quant.cpp``, compiled on first use.

One pass each way for an activation quantizer (the eager kernels take twelve: a CIFAR ResNet
block's iteration spent a third of an FP forward+backward on them), for AdaRound's soft weight and
rounding loss, and for QDrop's input mixing; with autograd nodes written in C++, so that a training
step does not call back into Python per quantizer. Built with torch's JIT extension loader (``ninja``
and a C++ compiler; about 30 s once, then cached under ``$TORCH_EXTENSIONS_DIR``), for the CPU it
runs on. Where the build fails, or with ``QDROP_NATIVE=0``, the torch-op kernels run instead: the
same values (AdaRound's within float rounding), slower.
"""
from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import time
from pathlib import Path

import torch

logger = logging.getLogger(__name__)
_SOURCE = Path(__file__).with_name("csrc") / "fake_quant.cpp"
_state: dict = {}


def fake_quant_kernels():
    """The compiled module, or None where it cannot be had (then a warning says why, once)."""
    if os.environ.get("QDROP_NATIVE", "1") == "0":
        return None
    return build_kernels("native")


def build_kernels(march: str = "native"):
    """The module built for ``-march=<march>`` on x86 (``native``: this CPU; ``x86-64-v3``: AVX2
    without AVX-512, the code path of an AMD EPYC), cached per target; None where the build fails.

    The tests build both x86 targets, so that an AVX-512 machine also checks the AVX2 code's values.
    """
    if march not in _state:
        _state[march] = _build(march)
    return _state[march]


def _cpu_tag() -> str:
    """A short hash of the CPU's feature flags (Linux), or of the processor name elsewhere."""
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith(("flags", "Features")))
    except (OSError, StopIteration):
        flags = platform.processor()
    return hashlib.sha1(flags.encode()).hexdigest()[:8]


STALE_LOCK_S = 900  # a build takes about 30 s; a lock this old belongs to a build that was killed


def _clear_stale_lock(name: str) -> None:
    """Remove the lock file a build killed half-way leaves in its build folder: torch's loader would
    wait on it for ever, in every later process."""
    try:
        from torch.utils.cpp_extension import _get_build_directory

        lock = Path(_get_build_directory(name, verbose=False)) / "lock"
        if lock.exists() and time.time() - lock.stat().st_mtime > STALE_LOCK_S:
            logger.warning("removing %s, left by a kernel build that did not finish", lock)
            lock.unlink(missing_ok=True)
    except (ImportError, OSError):  # no such helper in this torch, or no folder yet: nothing to clear
        pass


def _build(march: str):
    try:
        from torch.utils.cpp_extension import load

        # -march=native: the build is cached under a name that carries the CPU's features, so that a
        # home directory shared by different machines never loads one built for another.
        name = f"qdrop_fake_quant_{platform.machine()}_{_cpu_tag()}"
        flags = ["-O3", "-fno-math-errno", "-fopenmp-simd"]
        if platform.machine() in ("x86_64", "AMD64"):
            flags.append(f"-march={march}")
            if march != "native":
                name += "_" + march.replace("-", "_")
        # ATen's parallel_for is inlined OpenMP: without -fopenmp it runs on one thread. The library
        # then needs libgomp.so.1, which resolves to the copy torch has already loaded.
        openmp = ["-fopenmp"] if torch.backends.openmp.is_available() else []
        if shutil.which("ninja") is None:  # pip's ninja is in the venv's bin, off PATH when not activated
            import ninja

            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        _clear_stale_lock(name)
        logger.info("loading the fused kernels (built on first use, about 30 s, then cached)")
        return load(name, [str(_SOURCE)], extra_cflags=flags + openmp, extra_ldflags=openmp)
    except Exception as err:  # no compiler, no ninja, unwritable cache: the eager kernels still work
        logger.warning("fused fake-quant kernels unavailable (%s); using the eager ones", err)
        return None
