"""Build and load the native kernels: one C++ CPU extension and one CUDA extension per op.

Nothing is compiled at import. ``load_extension(device_type, op)`` compiles on first use with
``torch.utils.cpp_extension`` (ninja) into a cache folder keyed by the op, torch version, CUDA version,
Python ABI, compiler, flags and a hash of the op's sources, publishes the library there atomically with a
manifest of its size and SHA-256 (``cache.py``), and imports it; later processes verify the cached library
against its manifest and import it. A damaged library (truncated, emptied, overwritten) is reported on
stderr with its path and rebuilt, never handed to the dynamic loader. Every reason a native kernel cannot
be had (no compiler, no ninja, a CPU-only torch, no CUDA toolkit, a compile error) is raised as
``NativeOpUnavailable`` with a message that says what is missing.

    python -m maskformers.ops.build [--device auto|cpu|cuda|all] [--op NAME|all] [--variants] [--rebuild]

prebuilds and reports. An op may also have a second CUDA extension with its kernel variants
(``load_extension("cuda", op, variants=True)``, see ``variants.py``); ``--variants`` builds it too.
Environment: ``MASKFORMERS_OPS_CACHE`` (cache root, default ``$XDG_CACHE_HOME/maskformers/ops``),
``CUDA_HOME``/``CUDA_PATH``, ``TORCH_CUDA_ARCH_LIST``, ``CXX``, ``MAX_JOBS``.
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

from . import cache, toolchain

__all__ = [
    "DEVICE_TYPES",
    "OPS",
    "NativeOpUnavailable",
    "BuildPlan",
    "OpSources",
    "build_plan",
    "cache_root",
    "cache_state",
    "is_built",
    "load_extension",
    "main",
    "source_dir",
]

DEVICE_TYPES = ("cpu", "cuda")
CACHE_ENV = "MASKFORMERS_OPS_CACHE"
_LAYOUT = "2"  # cache layout version (manifest + build/ subfolder); part of every cache key
_LOG_TAIL_LINES = 40


@dataclass(frozen=True)
class OpSources:
    """The C++/CUDA sources of one op: headers shared by its kernels, and the sources of each extension."""

    op: str
    tag: str  # short name used in module and folder names
    headers: tuple[str, ...]
    sources: dict[str, tuple[str, ...]]
    variant_sources: tuple[str, ...] = ()  # a separate CUDA extension with the op's kernel variants

    def files(self) -> tuple[str, ...]:
        return (*self.headers, *(name for names in self.sources.values() for name in names), *self.variant_sources)


OPS = {
    "ms_deform_attn": OpSources(
        op="ms_deform_attn",
        tag="msda",
        headers=("ms_deform_attn_math.h", "ms_deform_attn_checks.h"),
        sources={
            "cpu": ("ms_deform_attn_cpu.cpp",),
            "cuda": ("ms_deform_attn_cuda.cu", "ms_deform_attn_cuda_bind.cpp"),
        },
        variant_sources=("ms_deform_attn_cuda_variants.cu", "ms_deform_attn_cuda_variants_bind.cpp"),
    ),
    "neighborhood_attention": OpSources(
        op="neighborhood_attention",
        tag="na",
        headers=("neighborhood_attention_math.h", "neighborhood_attention_checks.h", "neighborhood_attention_bias.h"),
        sources={
            "cpu": ("neighborhood_attention_cpu.cpp",),
            "cuda": ("neighborhood_attention_cuda.cu", "neighborhood_attention_cuda_bind.cpp"),
        },
        variant_sources=("neighborhood_attention_cuda_variants.cu", "neighborhood_attention_cuda_variants_bind.cpp"),
    ),
}
DEFAULT_OP = "ms_deform_attn"


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
    op: str = DEFAULT_OP
    variants: bool = False

    @property
    def library(self) -> Path:
        """The published library (verified against ``manifest.json`` before every load)."""
        return self.directory / f"{self.name}.so"

    @property
    def build_dir(self) -> Path:
        """ninja's working folder: objects, torch's lock file, and the freshly linked library."""
        return self.directory / "build"

    @property
    def label(self) -> str:
        return f"{self.op} {self.device_type.upper()} kernel{' variants' if self.variants else ''}"


# ----------------------------------------------------------------------------------------------
# locating sources, toolchains and the cache
# ----------------------------------------------------------------------------------------------


def _op_sources(op: str) -> OpSources:
    if op not in OPS:
        raise NativeOpUnavailable(f"no native op named {op!r} (native ops: {', '.join(OPS)})")
    return OPS[op]


def source_dir() -> Path:
    """Folder holding the C++/CUDA sources: ``maskformers/ops/_csrc`` inside an installed wheel (a link
    to the repository's ``csrc/`` in a checkout), else ``csrc/`` at the repository root."""
    here = Path(__file__).resolve().parent
    candidates = [here / "_csrc", here.parent.parent / "csrc"]
    needed = [name for spec in OPS.values() for name in spec.files()]
    for folder in candidates:
        if all((folder / name).is_file() for name in needed):
            return folder.resolve()
    raise NativeOpUnavailable(
        "the C++/CUDA sources of the native ops were not found (looked for "
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


def _cuda_settings(description: dict[str, str]) -> tuple[Path, list[str], list[str]]:
    """(toolkit root, nvcc flags, cache key parts) for a CUDA build; raises when anything is missing."""
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
    description.update(cuda_home=f"{cuda_home} ({how})", nvcc=nvcc_release, architectures=arch_desc)
    return cuda_home, ["-O3", *arch_flags], [str(cuda_home), nvcc_release, arch_desc]


def build_plan(device_type: str, op: str = DEFAULT_OP, variants: bool = False) -> BuildPlan:
    """Resolve sources, toolchain, flags and cache folder of ``op`` for ``device_type`` (with ``variants``:
    of the op's extension of CUDA kernel variants); raise ``NativeOpUnavailable`` naming whatever is
    missing. Runs no compiler (only ``--version`` queries)."""
    spec = _op_sources(op)
    if device_type not in DEVICE_TYPES:
        raise NativeOpUnavailable(
            f"no native {op} kernel for device type {device_type!r} (native kernels exist for "
            f"{', '.join(repr(d) for d in DEVICE_TYPES)})"
        )
    if variants and (device_type != "cuda" or not spec.variant_sources):
        raise NativeOpUnavailable(f"{op} has no {device_type.upper()} kernel variants (variants are CUDA kernels)")
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
    key_parts = [_LAYOUT, op, torch.__version__, cuda_tag, sys.implementation.cache_tag or "", description["compiler"]]
    cuda_home, cuda_cflags = None, []
    if device_type == "cpu":
        cflags, ldflags, cpu_id = toolchain.cpu_build_flags()
        key_parts += [cpu_id]
    else:
        cflags, ldflags = ["-O3"], []
        cuda_home, cuda_cflags, cuda_key = _cuda_settings(description)
        key_parts += cuda_key

    sources = spec.variant_sources if variants else spec.sources[device_type]
    kind = f"{device_type}-variants" if variants else device_type
    files = [src / name for name in (*spec.headers, *sources)]
    digest = _digest(key_parts + [kind] + cflags + cuda_cflags + ldflags, files)
    folder = re.sub(r"[^A-Za-z0-9_.-]", "_", f"{op}-{kind}-torch{torch.__version__}-{cuda_tag}-{digest[:16]}")
    description["cflags"] = " ".join(cflags)
    if cuda_cflags:
        description["nvcc flags"] = " ".join(cuda_cflags)
    return BuildPlan(
        device_type=device_type,
        name=f"maskformers_{spec.tag}{'v' if variants else ''}_{device_type}_{digest[:12]}",
        directory=cache_root() / folder,
        sources=tuple(src / name for name in sources),
        include_dir=src,
        cflags=tuple(cflags),
        cuda_cflags=tuple(cuda_cflags),
        ldflags=tuple(ldflags),
        cuda_home=cuda_home,
        description=description,
        op=op,
        variants=variants,
    )


def cache_state(plan: BuildPlan) -> cache.CacheState:
    """Whether the cache holds a verified build of ``plan`` ("ok"), none ("missing") or a damaged one."""
    return cache.check(plan.library)


def is_built(plan: BuildPlan) -> bool:
    """A finished build for this plan is in the cache and matches its manifest (size and SHA-256)."""
    return cache_state(plan).state == "ok"


# ----------------------------------------------------------------------------------------------
# building and loading
# ----------------------------------------------------------------------------------------------


def _import_library(plan: BuildPlan) -> ModuleType:
    """Import the verified library. dlopen happens in ``module_from_spec``, so both calls are guarded."""
    try:
        spec = importlib.util.spec_from_file_location(plan.name, plan.library)
        if spec is None or spec.loader is None:
            raise ImportError(f"no extension-module loader for {plan.library}")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    except (ImportError, OSError) as exc:
        raise NativeOpUnavailable(
            f"the cached {plan.label} {plan.library} does not import ({exc}); "
            "rebuild it with `maskformers build-ops --rebuild`"
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


def _run_build(plan: BuildPlan) -> ModuleType:
    """Compile and link in ``plan.build_dir`` (torch's file lock serialises concurrent builds), then
    publish the library atomically with its manifest."""
    cpp_extension = _cpp_extension()
    plan.build_dir.mkdir(parents=True, exist_ok=True)
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
            build_directory=str(plan.build_dir),
            with_cuda=plan.device_type == "cuda",
            verbose=False,
        )
    except Exception as exc:  # the build log is in the message of torch's exception
        log = str(exc)
        (plan.directory / "build.log").write_text(log)
        raise NativeOpUnavailable(
            f"compiling the {plan.label} failed (full log: {plan.directory / 'build.log'}):\n{_tail(log)}"
        ) from exc
    try:
        cache.publish(plan.build_dir / f"{plan.name}.so", plan.library, plan.description)
    except OSError as exc:
        raise NativeOpUnavailable(f"the {plan.label} compiled but could not be cached in {plan.directory}: {exc}")
    return module


def _compile(plan: BuildPlan, *, reason: str = "first use") -> ModuleType:
    print(
        f"maskformers: compiling the native {plan.label} ({reason}, cached at {plan.directory}); "
        "this can take a few minutes",
        file=sys.stderr,
        flush=True,
    )
    return _run_build(plan)


def _rebuild_damaged(plan: BuildPlan, detail: str) -> ModuleType:
    """Replace a damaged published library: relink from the cached objects, from scratch if that fails."""
    print(f"maskformers: the cached {plan.label} is damaged: {detail}; rebuilding it", file=sys.stderr, flush=True)
    cache.discard(plan.library, plan.build_dir / f"{plan.name}.so")
    try:
        return _compile(plan, reason="replacing the damaged library")
    except NativeOpUnavailable:
        shutil.rmtree(plan.directory, ignore_errors=True)  # the objects may be damaged too
        plan.directory.mkdir(parents=True, exist_ok=True)
        return _compile(plan, reason="replacing the damaged library, from scratch")


_lock = threading.Lock()
_loaded: dict[tuple, ModuleType] = {}
_failed: dict[tuple, NativeOpUnavailable] = {}


def load_extension(device_type: str, op: str = DEFAULT_OP, variants: bool = False) -> ModuleType:
    """The compiled module of ``op`` for ``device_type`` ("cpu" or "cuda"), building it on first use;
    ``variants=True``: the op's separate extension of CUDA kernel variants.

    For ms_deform_attn the module has ``forward(value, spatial_shapes, level_start_index,
    sampling_locations, attention_weights) -> out (B, Q, H*D)`` and ``backward(..., grad_output) ->
    (grad_value, grad_locations, grad_weights)``. Cached per process, failures included; raises
    ``NativeOpUnavailable`` with the reason.
    """
    if not isinstance(device_type, str):
        raise TypeError(f"device_type must be a str such as 'cpu' or 'cuda', got {type(device_type).__name__}")
    key = (op, device_type) if not variants else (op, device_type, "variants")
    with _lock:
        if key in _loaded:
            return _loaded[key]
        if key in _failed:
            raise _failed[key]
        try:
            plan = build_plan(device_type, op, variants)
            state = cache_state(plan)
            if state.state == "ok":
                module = _import_library(plan)
            elif state.state == "damaged":
                module = _rebuild_damaged(plan, state.detail)
            else:
                module = _compile(plan)
        except NativeOpUnavailable as exc:
            _failed[key] = exc
            raise
        _loaded[key] = module
        return module


def _forget(device_type: str, op: str = DEFAULT_OP, variants: bool = False) -> None:
    key = (op, device_type) if not variants else (op, device_type, "variants")
    with _lock:
        _loaded.pop(key, None)
        _failed.pop(key, None)


# ----------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------


def default_devices() -> list[str]:
    """What can run here: the CPU, plus CUDA when a GPU is visible."""
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``build-ops`` (shared by ``python -m maskformers.ops.build`` and the CLI)."""
    parser.add_argument(
        "--device", choices=("auto", "cpu", "cuda", "all"), default="auto",
        help="which kernels to build: 'auto' = what can run here (CPU, plus CUDA when a GPU is visible; default); "
        "'cuda' builds for TORCH_CUDA_ARCH_LIST (else the visible GPUs, else torch's architectures); "
        "'all' = CPU and CUDA",
    )
    parser.add_argument("--op", choices=("all", *OPS), default="all", help="which op (default: all)")
    parser.add_argument(
        "--variants", action="store_true",
        help="with the CUDA kernels, also build each op's extension of CUDA kernel variants (see kernel_variants())",
    )
    parser.add_argument("--rebuild", action="store_true", help="delete the cached builds first and compile again")


def run(args: argparse.Namespace) -> int:
    """Prebuild and report; exit status 1 when a requested kernel is unavailable."""
    if args.device == "auto":
        devices = default_devices()
    elif args.device == "all":
        devices = ["cpu", "cuda"]
    else:
        devices = [args.device]
    if args.op != "all" and args.op not in OPS:
        print(f"--op must be one of {', '.join(OPS)} or all, got {args.op!r}", file=sys.stderr)
        return 2
    ops = list(OPS) if args.op == "all" else [args.op]
    status = 0
    jobs = [(op, device, False) for op in ops for device in devices]
    if args.variants and "cuda" in devices:
        jobs += [(op, "cuda", True) for op in ops if OPS[op].variant_sources]
    for op, device, variants in jobs:
        label = f"{op} {device}{' variants' if variants else ''}"
        try:
            plan = build_plan(device, op, variants)
            if args.rebuild and plan.directory.exists():
                shutil.rmtree(plan.directory)
                _forget(device, op, variants)
            cached = is_built(plan)
            load_extension(device, op, variants)
        except NativeOpUnavailable as exc:
            print(f"{label}: unavailable: {exc}")
            status = 1
            continue
        print(f"{label}: ready ({'cached' if cached else 'built'}) at {plan.library}")
        for key, value in plan.description.items():
            print(f"  {key}: {value}")
        if device == "cuda" and not torch.cuda.is_available():
            print("  note: no GPU is visible here; this kernel runs only where one is")
    return status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m maskformers.ops.build", description="Prebuild the native kernels.")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
