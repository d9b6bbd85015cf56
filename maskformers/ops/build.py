"""Build and load the native ms_deform_attn kernels: a C++ CPU extension and a CUDA extension.

Nothing is compiled at import. ``load_extension(device_type)`` compiles on first use with
``torch.utils.cpp_extension`` (ninja) into a cache directory keyed by the torch version, CUDA version,
Python ABI, compiler, flags and a hash of the sources, then imports the module; later processes import
the cached module directly. Every reason the native kernel cannot be had (no compiler, no ninja, a
CPU-only torch, no CUDA toolkit, a compile error) is raised as ``NativeOpUnavailable`` with a message
that says what is missing.

    python -m maskformers.ops.build [--device cpu|cuda|all] [--rebuild]

prebuilds and reports. Environment: ``MASKFORMERS_OPS_CACHE`` (cache root, default
``$XDG_CACHE_HOME/maskformers/ops``), ``CUDA_HOME``/``CUDA_PATH``, ``TORCH_CUDA_ARCH_LIST``, ``CXX``, ``MAX_JOBS``.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import logging
import os
import re
import shutil
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import torch

from . import toolchain

__all__ = [
    "DEVICE_TYPES",
    "NativeOpUnavailable",
    "BuildPlan",
    "build_plan",
    "cache_root",
    "is_built",
    "load_extension",
    "main",
    "source_dir",
]

DEVICE_TYPES = ("cpu", "cuda")
CACHE_ENV = "MASKFORMERS_OPS_CACHE"
_HEADERS = ("ms_deform_attn_math.h", "ms_deform_attn_checks.h")
_SOURCES = {
    "cpu": ("ms_deform_attn_cpu.cpp",),
    "cuda": ("ms_deform_attn_cuda.cu", "ms_deform_attn_cuda_bind.cpp"),
}
_MARKER = "BUILD_OK"
_LOG_TAIL_LINES = 40


class NativeOpUnavailable(RuntimeError):
    """The native kernel for a device type cannot be built or loaded; the message says why."""


@dataclass(frozen=True)
class BuildPlan:
    """Everything one build needs; ``directory`` is unique for the inputs that affect the binary."""

    device_type: str
    name: str
    directory: Path
    sources: tuple[Path, ...]
    include_dir: Path
    cflags: tuple[str, ...]
    cuda_cflags: tuple[str, ...] = ()
    ldflags: tuple[str, ...] = ()
    cuda_home: Path | None = None
    description: dict[str, str] = field(default_factory=dict)

    @property
    def library(self) -> Path:
        return self.directory / f"{self.name}.so"


# ----------------------------------------------------------------------------------------------
# locating sources, toolchains and the cache
# ----------------------------------------------------------------------------------------------


def source_dir() -> Path:
    """Folder holding the C++/CUDA sources: ``maskformers/ops/_csrc`` inside an installed wheel (a link
    to the repository's ``csrc/`` in a checkout), else ``csrc/`` at the repository root."""
    here = Path(__file__).resolve().parent
    candidates = [here / "_csrc", here.parent.parent / "csrc"]
    needed = _HEADERS + _SOURCES["cpu"] + _SOURCES["cuda"]
    for folder in candidates:
        if all((folder / name).is_file() for name in needed):
            return folder.resolve()
    raise NativeOpUnavailable(
        "the C++/CUDA sources of ms_deform_attn were not found (looked for "
        f"{', '.join(needed)} in {', '.join(str(c) for c in candidates)}); reinstall maskformers"
    )


def cache_root() -> Path:
    """Root folder of the build cache (``$MASKFORMERS_OPS_CACHE`` or ``$XDG_CACHE_HOME/maskformers/ops``)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "maskformers" / "ops"


def _digest(parts: list[str], files: list[Path]) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode() + b"\0")
    for path in files:
        h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def build_plan(device_type: str) -> BuildPlan:
    """Resolve sources, toolchain, flags and cache folder for ``device_type``; raise ``NativeOpUnavailable``
    naming whatever is missing. Runs no compiler (only ``--version`` queries)."""
    if device_type not in DEVICE_TYPES:
        raise NativeOpUnavailable(
            f"no native ms_deform_attn kernel for device type {device_type!r} (native kernels exist for "
            f"{', '.join(repr(d) for d in DEVICE_TYPES)})"
        )
    src = source_dir()
    compiler = toolchain.cxx_compiler()
    if compiler is None:
        raise NativeOpUnavailable(
            f"no C++ compiler: {os.environ.get('CXX', 'c++')!r} is not on PATH (install g++ or clang, or set CXX)"
        )
    if toolchain.ninja_path() is None:
        hint = (
            "the ninja Python package is installed but its `ninja` command is not on PATH"
            if importlib.util.find_spec("ninja") is not None
            else "ninja is not installed (pip install ninja)"
        )
        raise NativeOpUnavailable(f"{hint}; torch builds C++ extensions with ninja")
    cuda_tag = f"cu{torch.version.cuda}" if torch.version.cuda else "cpuonly"
    description = {"compiler": f"{compiler} ({toolchain.tool_version([compiler, '--version'])})"}
    key_parts = [torch.__version__, cuda_tag, sys.implementation.cache_tag or "", description["compiler"]]
    cuda_home, cuda_cflags = None, []

    if device_type == "cpu":
        cflags, ldflags, cpu_id = toolchain.cpu_build_flags()
        key_parts += [cpu_id]
    else:
        if getattr(torch.version, "hip", None):
            raise NativeOpUnavailable(f"torch {torch.__version__} is a ROCm build; the CUDA kernel needs a CUDA build")
        if not torch.version.cuda:
            raise NativeOpUnavailable(
                f"torch {torch.__version__} is a CPU-only build (torch.version.cuda is None); install a CUDA build"
            )
        cuda_home, how = toolchain.find_cuda_home()
        if cuda_home is None:
            raise NativeOpUnavailable(how)
        nvcc_release = toolchain.nvcc_version(cuda_home)
        if not nvcc_release:
            raise NativeOpUnavailable(f"cannot run {cuda_home / 'bin' / 'nvcc'} --version (toolkit from {how})")
        if nvcc_release.split(".")[0] != torch.version.cuda.split(".")[0]:
            raise NativeOpUnavailable(
                f"nvcc {nvcc_release} in {cuda_home} ({how}) does not match the CUDA {torch.version.cuda} "
                "torch was built with; point CUDA_HOME at a matching toolkit"
            )
        arch_flags, arch_desc = toolchain.cuda_arch_flags(cuda_home)
        cflags, ldflags = ["-O3"], []
        cuda_cflags = ["-O3", *arch_flags]
        description.update(cuda_home=f"{cuda_home} ({how})", nvcc=nvcc_release, architectures=arch_desc)
        key_parts += [str(cuda_home), nvcc_release, arch_desc]

    files = [src / name for name in (*_HEADERS, *_SOURCES[device_type])]
    digest = _digest(key_parts + cflags + cuda_cflags + ldflags, files)
    folder = re.sub(r"[^A-Za-z0-9_.-]", "_", f"{device_type}-torch{torch.__version__}-{cuda_tag}-{digest[:16]}")
    description["cflags"] = " ".join(cflags)
    if cuda_cflags:
        description["nvcc flags"] = " ".join(cuda_cflags)
    return BuildPlan(
        device_type=device_type,
        name=f"maskformers_msda_{device_type}_{digest[:12]}",
        directory=cache_root() / folder,
        sources=tuple(src / name for name in _SOURCES[device_type]),
        include_dir=src,
        cflags=tuple(cflags),
        cuda_cflags=tuple(cuda_cflags),
        ldflags=tuple(ldflags),
        cuda_home=cuda_home,
        description=description,
    )


def is_built(plan: BuildPlan) -> bool:
    """A finished build for this plan is in the cache."""
    return (plan.directory / _MARKER).is_file() and plan.library.is_file()


# ----------------------------------------------------------------------------------------------
# building and loading
# ----------------------------------------------------------------------------------------------


def _import_library(plan: BuildPlan) -> ModuleType:
    spec = importlib.util.spec_from_file_location(plan.name, plan.library)
    if spec is None or spec.loader is None:
        raise NativeOpUnavailable(f"cannot import {plan.library}")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except ImportError as exc:
        raise NativeOpUnavailable(
            f"the cached {plan.device_type} kernel {plan.library} does not import ({exc}); "
            f"delete {plan.directory} to rebuild"
        ) from exc
    return module


def _cpp_extension():
    # torch logs a warning about CUDA_HOME on import when no GPU is present; it is not ours to show
    logger = logging.getLogger("torch.utils.cpp_extension")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        import torch.utils.cpp_extension as cpp_extension
    finally:
        logger.setLevel(level)
    return cpp_extension


def _tail(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return "\n".join(lines[-_LOG_TAIL_LINES:])


def _compile(plan: BuildPlan) -> ModuleType:
    cpp_extension = _cpp_extension()
    plan.directory.mkdir(parents=True, exist_ok=True)
    print(
        f"maskformers: compiling the native ms_deform_attn {plan.device_type.upper()} kernel "
        f"(first use, cached at {plan.directory}); this can take a few minutes",
        file=sys.stderr,
        flush=True,
    )
    if plan.cuda_home is not None:
        cpp_extension.CUDA_HOME = str(plan.cuda_home)  # torch's own guess follows the nvcc wrapper wrongly
    try:
        module = cpp_extension.load(
            name=plan.name,
            sources=[str(s) for s in plan.sources],
            extra_cflags=list(plan.cflags),
            extra_cuda_cflags=list(plan.cuda_cflags),
            extra_ldflags=list(plan.ldflags),
            extra_include_paths=[str(plan.include_dir)],
            build_directory=str(plan.directory),
            with_cuda=plan.device_type == "cuda",
            verbose=False,
        )
    except Exception as exc:  # the build log is in the message of torch's exception
        log = str(exc)
        (plan.directory / "build.log").write_text(log)
        raise NativeOpUnavailable(
            f"compiling the {plan.device_type} kernel failed (full log: {plan.directory / 'build.log'}):\n{_tail(log)}"
        ) from exc
    (plan.directory / _MARKER).write_text("\n".join(f"{k}: {v}" for k, v in plan.description.items()) + "\n")
    return module


_lock = threading.Lock()
_loaded: dict[str, ModuleType] = {}
_failed: dict[str, NativeOpUnavailable] = {}


def load_extension(device_type: str) -> ModuleType:
    """The compiled module for ``device_type`` ("cpu" or "cuda"), building it on first use.

    The module has ``forward(value, spatial_shapes, level_start_index, sampling_locations,
    attention_weights) -> out (B, Q, H*D)`` and ``backward(..., grad_output) -> (grad_value,
    grad_locations, grad_weights)``. Cached per process, failures included; raises
    ``NativeOpUnavailable`` with the reason.
    """
    if not isinstance(device_type, str):
        raise TypeError(f"device_type must be a str such as 'cpu' or 'cuda', got {type(device_type).__name__}")
    with _lock:
        if device_type in _loaded:
            return _loaded[device_type]
        if device_type in _failed:
            raise _failed[device_type]
        try:
            plan = build_plan(device_type)
            module = _import_library(plan) if is_built(plan) else _compile(plan)
        except NativeOpUnavailable as exc:
            _failed[device_type] = exc
            raise
        _loaded[device_type] = module
        return module


def _forget(device_type: str) -> None:
    with _lock:
        _loaded.pop(device_type, None)
        _failed.pop(device_type, None)


# ----------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """Prebuild the native kernels and report; exit status 1 when a requested kernel is unavailable."""
    parser = argparse.ArgumentParser(
        prog="python -m maskformers.ops.build", description="Prebuild the native ms_deform_attn kernels."
    )
    parser.add_argument(
        "--device", choices=("cpu", "cuda", "all"), default="all",
        help="which kernel to build; 'all' = CPU, plus CUDA when torch is a CUDA build (default)",
    )
    parser.add_argument("--rebuild", action="store_true", help="delete the cached build first")
    args = parser.parse_args(argv)
    if args.device == "all":
        devices = ["cpu"] + (["cuda"] if torch.version.cuda else [])
    else:
        devices = [args.device]
    status = 0
    for device in devices:
        try:
            plan = build_plan(device)
            if args.rebuild and plan.directory.exists():
                shutil.rmtree(plan.directory)
                _forget(device)
            cached = is_built(plan)
            load_extension(device)
        except NativeOpUnavailable as exc:
            print(f"{device}: unavailable: {exc}")
            status = 1
            continue
        print(f"{device}: ready ({'cached' if cached else 'built'}) at {plan.library}")
        for key, value in plan.description.items():
            print(f"  {key}: {value}")
    return status


if __name__ == "__main__":
    sys.exit(main())
