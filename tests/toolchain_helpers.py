"""When a test that compiles the CUDA kernels can run here."""

from __future__ import annotations

import os
import shutil

import torch

from maskformers.ops import toolchain


def cuda_build_skip_reason() -> str:
    """Why the CUDA kernels cannot be compiled here ("" when they can).

    Skip only where there is no CUDA toolkit to look for. Where nvcc is on PATH or CUDA_HOME is set (CI),
    the tests run, so a regression in toolkit discovery fails them instead of skipping them."""
    if not torch.version.cuda:
        return "torch is a CPU-only build"
    if shutil.which("nvcc") is None and not (os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")):
        return "no nvcc on PATH and no CUDA_HOME"
    if toolchain.cxx_compiler() is None or toolchain.ninja_path() is None:
        return "no C++ compiler or ninja"
    return ""
