"""Process-wide CPU runtime settings: glibc's allocator thresholds for training-sized temporaries, and
whether the CPU has native bf16 (:func:`cpu_bf16_flags`).

glibc's ``malloc`` serves every block above ``M_MMAP_THRESHOLD`` (128 KiB at start, raised dynamically) with
fresh ``mmap`` pages and unmaps it on ``free``; heap memory above ``M_TRIM_THRESHOLD`` is handed back to the
kernel too. A training step allocates and frees the same large temporaries every iteration (multi-scale
deformable attention's sampled values are 10 MB per encoder layer with a stride-8 level), so each of them
is page-faulted and zeroed by the kernel again on every step: in a profile of the Deformable DETR teacher
with strides 8/16/32 one elementwise multiply of that size took 16 ms instead of 0.6 ms, and the whole
step ran 1.54x slower (the other models 1.16-1.2x; ``bench/allocator.py``). PyTorch's CPU performance
guide recommends jemalloc or tcmalloc for this; :func:`tune_malloc` gets the same effect from glibc itself
with ``mallopt``: blocks up to 32 MiB come from the heap and freed memory stays in the process for the next
step.

``kd`` calls :func:`tune_malloc` on import, so the training command, the notebooks, the tests and the
benchmarks all run with it; ``KD_TUNE_MALLOC=0`` in the environment turns it off. It is a no-op on other C
libraries (macOS, musl) and on Windows.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

# mallopt parameter numbers from glibc's <malloc.h>
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 32 * 1024 * 1024  # glibc's upper limit on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX)

_state = {"tuned": False}


def _libc():
    """glibc through ctypes, or None when this process runs on another C library."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018  (AttributeError on musl and other C libraries)
    except (OSError, AttributeError):
        return None
    return libc


def tune_malloc(
    mmap_threshold: int = MMAP_THRESHOLD_MAX,
    trim_threshold: int = 1 << 30,
    top_pad: int = 64 << 20,
) -> bool:
    """Keep training-sized temporaries in glibc's heap (see the module docstring).

    Args:
        mmap_threshold: blocks at least this large are mmap'd (at most 32 MiB on 64-bit glibc).
        trim_threshold: free heap memory above this is returned to the kernel.
        top_pad: extra bytes requested from the kernel whenever the heap grows.

    Returns:
        True when the settings were applied, False on a non-glibc platform, when ``KD_TUNE_MALLOC=0``, or
        when glibc refused a value.
    """
    if os.environ.get("KD_TUNE_MALLOC", "1") == "0":
        return False
    libc = _libc()
    if libc is None:
        return False
    ok = all(
        libc.mallopt(param, value) == 1
        for param, value in (
            (M_MMAP_THRESHOLD, min(mmap_threshold, MMAP_THRESHOLD_MAX)),
            (M_TRIM_THRESHOLD, trim_threshold),
            (M_TOP_PAD, top_pad),
        )
    )
    _state["tuned"] = ok
    return ok


def malloc_tuned() -> bool:
    """Whether :func:`tune_malloc` applied its settings in this process."""
    return _state["tuned"]


def cpu_bf16_flags() -> list[str]:
    """The CPU's bf16-related instruction flags (``avx512_bf16``, ``amx_*``) from Linux ``/proc/cpuinfo``;
    empty on a CPU without them and on other systems. bf16 autocast on a CPU without them runs about 2x
    slower than fp32 (README "Measured")."""
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        return []
    lines = text.splitlines()
    flags = next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), [])
    return sorted(f for f in flags if "bf16" in f or f.startswith("amx"))
