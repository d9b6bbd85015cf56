"""Environment report: versions of the toolchain and whether the native kernels are available.

    python -m maskformers.info [--build]

Prints the versions of Python, torch (and the CUDA runtime it was built with), the C++ compiler,
nvcc, ninja, timm and transformers, then for the CPU and CUDA kernels of every native op whether they
can be built, whether a verified build is cached (a cached library that does not match its recorded size
and SHA-256 is reported as damaged), and why not where they are unavailable. Nothing is compiled unless
``--build`` is given (a first build takes minutes).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import platform
import sys
from pathlib import Path

import torch

from .ops import build, toolchain

__all__ = ["main", "native_status"]


def _package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _torch_line() -> str:
    cuda = f"CUDA runtime {torch.version.cuda}" if torch.version.cuda else "CPU-only build"
    if torch.cuda.is_available():
        names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        gpus = f"GPUs: {names}"
    else:
        gpus = "no GPU visible"
    return f"{torch.__version__} ({cuda}; {gpus})"


def _nvcc_line() -> str:
    if not torch.version.cuda:
        return "not needed (torch is a CPU-only build)"
    root, how = toolchain.find_cuda_home()
    if root is None:
        return f"not found: {how}"
    release = toolchain.nvcc_version(root)
    return f"{release or 'unknown version'} at {root} ({how})"


def _compiler_line() -> str:
    compiler = toolchain.cxx_compiler()
    if compiler is None:
        return "not found (install g++ or clang, or set CXX)"
    return f"{compiler} ({toolchain.tool_version([compiler, '--version'])})"


def native_status(device_type: str, *, compile_now: bool = False, op: str = build.DEFAULT_OP) -> tuple[str, str]:
    """(state, explanation) of the native kernel of ``op`` for ``device_type``. state is "unavailable" (a
    prerequisite is missing), "failed" (the compile failed), "built" (cached and verified), "damaged"
    (cached but not what the build wrote; rebuilt on first use) or "not built"."""
    try:
        plan = build.build_plan(device_type, op)
    except build.NativeOpUnavailable as exc:
        return "unavailable", str(exc)
    if compile_now:
        try:
            build.load_extension(device_type, op)
        except build.NativeOpUnavailable as exc:
            return "failed", str(exc)
    cached = build.cache_state(plan)
    if cached.state == "ok":
        return "built", f"cached at {plan.directory}"
    if cached.state == "damaged":
        return "damaged", f"{cached.detail}; rebuilt on first use or by `maskformers build-ops --rebuild`"
    return "not built", "compiles on first use (or run with --build)"


def main(argv: list[str] | None = None) -> int:
    """Print the report; exit status 1 only when ``--build`` tried a compile that failed."""
    parser = argparse.ArgumentParser(prog="python -m maskformers.info", description=__doc__.splitlines()[0])
    parser.add_argument("--build", action="store_true", help="compile the native kernels that are not cached yet")
    args = parser.parse_args(argv)

    from . import __version__

    print(f"maskformers {__version__} ({Path(__file__).resolve().parent})")
    print(f"python {platform.python_version()} ({sys.executable})")
    print(f"torch {_torch_line()}")
    print(f"c++ compiler: {_compiler_line()}")
    print(f"nvcc: {_nvcc_line()}")
    print(f"ninja: {_package_version('ninja')}")
    print(f"timm: {_package_version('timm')}")
    print(f"transformers: {_package_version('transformers')}")
    status = 0
    for op in build.OPS:
        print(f"native {op} kernels (cache: {build.cache_root()}):")
        for device_type in build.DEVICE_TYPES:
            state, text = native_status(device_type, compile_now=args.build, op=op)
            status |= int(state == "failed")
            label = {"built": "available, built", "not built": "available, not built yet"}.get(state, state)
            if device_type == "cuda" and state in ("built", "not built") and not torch.cuda.is_available():
                built = "built" if state == "built" else "not built yet"
                label = f"compiles but cannot run here (no GPU visible), {built}"
            print(f"  {device_type}: {label}: {text}")
    return status


if __name__ == "__main__":
    sys.exit(main())
