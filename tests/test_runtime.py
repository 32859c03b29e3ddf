"""Tests for kd/runtime.py: glibc's allocator keeps training-sized temporaries once kd is imported; the CPU's
bf16 flags."""

import json
import os
import subprocess
import sys

import pytest

from kd import runtime
from kd.runtime import _libc, tune_malloc

GLIBC = _libc() is not None and hasattr(_libc(), "mallinfo2")  # glibc >= 2.33

# How much of a fresh 16 MiB tensor glibc serves with mmap (mallinfo2's hblkhd grows by the block) rather
# than from the heap: with glibc's defaults (threshold 128 KiB until a first large free) all of it; tuned,
# none.
PROBE = """
import ctypes, json
import torch
import kd
from kd.runtime import malloc_tuned
class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                              "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
before = libc.mallinfo2().hblkhd
block = torch.empty(4 << 20)
print(json.dumps({"tuned": malloc_tuned(), "mmapped": libc.mallinfo2().hblkhd - before}))
"""


def _probe(setting: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "KD_TUNE_MALLOC"}
    if setting is not None:
        env["KD_TUNE_MALLOC"] = setting
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not GLIBC, reason="glibc only")
def test_import_tunes_and_keeps_blocks_in_the_heap():
    on, off = _probe(None), _probe("0")
    assert on["tuned"] and not off["tuned"]
    assert off["mmapped"] >= 16 << 20  # a fresh mapping, page-faulted in and unmapped again on free
    assert on["mmapped"] == 0  # from the heap, which keeps it for the next step


def test_opt_out(monkeypatch):
    monkeypatch.setenv("KD_TUNE_MALLOC", "0")
    assert tune_malloc() is False


def test_cpu_bf16_flags_reads_cpuinfo(monkeypatch, tmp_path):
    import builtins

    fake = tmp_path / "cpuinfo"
    real_open = builtins.open

    def opener(path, *args, **kwargs):
        return real_open(fake if path == "/proc/cpuinfo" else path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", opener)
    fake.write_text("processor : 0\nflags : fpu avx512f avx512_bf16 amx_tile sse\n\nprocessor : 1\n")
    assert runtime.cpu_bf16_flags() == ["amx_tile", "avx512_bf16"]
    fake.write_text("processor : 0\nflags : fpu avx2 sse\n")
    assert runtime.cpu_bf16_flags() == []
    fake.unlink()
    assert runtime.cpu_bf16_flags() == []
