"""The one CPU-capability probe: what `/proc/cpuinfo` says, read once per process.

Speed here depends on the CPU class more than on anything else: with AMX or AVX512-BF16,
oneDNN runs bf16 matmuls several times faster than fp32; on an AVX2-only CPU bf16 is a
slowdown (seen here: AMD EPYC, 0.14 TFLOP/s fp32 vs 0.02 bf16). Training's precision, the
engine's dtype, the kernel's cache key and every benchmark's report read it from here.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

# The flags that decide which code paths are fast, as reports record them.
RELEVANT = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16")


@functools.cache
def cpuinfo() -> dict[str, str]:
    """The first processor's `key: value` lines ({} where /proc/cpuinfo cannot be read)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    out: dict[str, str] = {}
    for line in text.split("\n\n")[0].splitlines():
        key, _, value = line.partition(":")
        out.setdefault(key.strip(), value.strip())
    return out


def cpu_flags() -> frozenset[str]:
    return frozenset(cpuinfo().get("flags", "").split())


def has_fast_bf16() -> bool:
    """AMX or AVX512-BF16: where bf16 matmuls beat fp32."""
    flags = cpu_flags()
    return "amx_bf16" in flags or "avx512_bf16" in flags


def cpu_class() -> str:
    """"AMX", "AVX512-BF16", "AVX2-only" or "other": the classes times are stated per."""
    flags = cpu_flags()
    if "amx_bf16" in flags:
        return "AMX"
    if "avx512_bf16" in flags:
        return "AVX512-BF16"
    return "AVX2-only" if "avx2" in flags else "other"


def cpu_report() -> dict:
    """What a benchmark records beside its figures."""
    flags = cpu_flags()
    return {"model": cpuinfo().get("model name", ""), "class": cpu_class(), "cores": os.cpu_count(),
            "flags": sorted(f for f in RELEVANT if f in flags)}
