"""What every benchmark table states about the machine it ran on: the CPU model and its vector extensions
(bfloat16 matmuls are native only with AVX-512 BF16 or AMX; on AVX2-only CPUs torch emulates them)."""

from __future__ import annotations

import platform
from pathlib import Path

_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")


def cpu_model() -> str:
    """The CPU's model name with the vector extensions that decide float32/bfloat16 speed."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    name = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), platform.machine())
    flags = next((set(line.split(":", 1)[1].split()) for line in lines if line.startswith("flags")), set())
    present = [f for f in _FLAGS if f in flags]
    return f"{name} ({', '.join(present) or 'no AVX2'})"
