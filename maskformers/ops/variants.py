"""Kernel variants: alternative CUDA kernels of the native ops, selectable beside the default kernels.

Each op has a default CUDA kernel for its forward and its backward and may have variant kernels for
either pass. A variant name lists the variant kernels it uses, joined by "+"; a pass it does not name
runs the default kernel. :func:`kernel_variants` lists every name:

    ms_deform_attn          default, coalesced (forward), tiled (backward), coalesced+tiled
    neighborhood_attention  default, tensor_core (forward), tensor_core_bwd (backward), tensor_core+tensor_core_bwd

Choose a variant per op with an environment variable, read at every call (``MASKFORMERS_MSDA_VARIANT``,
``MASKFORMERS_NA_VARIANT``), or, taking precedence in the current thread, with
``use_kernel_variant(op, name)``. The backward of a call runs the variant chosen when its forward ran.
Variants are CUDA kernels: tensors on the CPU always run the CPU kernel. A variant kernel that does not
apply to a call (a dtype or head dim it does not handle) runs the default kernel with one warning saying
why; under ``MASKFORMERS_STRICT_OPS=1`` that is an error, so a benchmark never times the default kernel
under a variant's name. The variant kernels live in a separate extension (built on first use or by
``maskformers build-ops --device cuda --variants``).
"""

from __future__ import annotations

import os
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import ModuleType

__all__ = ["VARIANT_ENV", "kernel_variants", "use_kernel_variant", "current_variant", "pass_kernels"]

STRICT_ENV = "MASKFORMERS_STRICT_OPS"


@dataclass(frozen=True)
class _OpVariants:
    env: str
    forward: tuple[str, ...]
    backward: tuple[str, ...]


_VARIANTS = {
    "ms_deform_attn": _OpVariants("MASKFORMERS_MSDA_VARIANT", forward=("coalesced",), backward=("tiled",)),
    "neighborhood_attention": _OpVariants(
        "MASKFORMERS_NA_VARIANT", forward=("tensor_core",), backward=("tensor_core_bwd",)
    ),
}
VARIANT_ENV = {op: spec.env for op, spec in _VARIANTS.items()}

_state = threading.local()
_warned: set[tuple[str, str, str]] = set()


def kernel_variants() -> dict[str, tuple[str, ...]]:
    """{op: every variant name}, "default" first; an op's default kernels run under "default"."""
    names = {}
    for op, spec in _VARIANTS.items():
        both = tuple(f"{f}+{b}" for f in spec.forward for b in spec.backward)
        names[op] = ("default", *spec.forward, *spec.backward, *both)
    return names


def _check(op: str, variant: object, source: str) -> str:
    if op not in _VARIANTS:
        raise ValueError(f"op must be one of {', '.join(_VARIANTS)}, got {op!r}")
    names = kernel_variants()[op]
    if variant not in names:
        raise ValueError(f"{source} must name a {op} kernel variant ({', '.join(names)}), got {variant!r}")
    return variant


def pass_kernels(op: str, variant: str) -> tuple[str, str]:
    """(forward kernel, backward kernel) of a variant name; "default" where it names none."""
    spec = _VARIANTS[op]
    parts = _check(op, variant, "variant").split("+")
    forward = next((p for p in parts if p in spec.forward), "default")
    backward = next((p for p in parts if p in spec.backward), "default")
    return forward, backward


@contextmanager
def use_kernel_variant(op: str, variant: str | None) -> Iterator[None]:
    """Within the block, calls of ``op`` in this thread use ``variant`` (None: the environment's choice)."""
    if variant is not None:
        _check(op, variant, "variant")
    overrides = getattr(_state, "overrides", {})
    previous = overrides.get(op)
    _state.overrides = {**overrides, op: variant}
    try:
        yield
    finally:
        _state.overrides = {**_state.overrides, op: previous}


def current_variant(op: str) -> str:
    """The variant a call of ``op`` uses now: ``use_kernel_variant``'s, else the environment's, else default."""
    override = getattr(_state, "overrides", {}).get(op)
    if override is not None:
        return override
    env = _VARIANTS[op].env if op in _VARIANTS else None
    chosen = os.environ.get(env, "") if env else ""
    return _check(op, chosen or "default", env or "variant")


# torch.compile treats the choice as a constant of the traced call (as torch.compiler.assume_constant_result
# would, without importing torch._dynamo here), like functional._native_reason
current_variant._dynamo_marked_constant = True  # type: ignore[attr-defined]


def load_variants(op: str) -> ModuleType:
    """The extension with ``op``'s CUDA kernel variants; a RuntimeError says why it is unavailable (no
    fallback: the variant was asked for by name)."""
    from . import build

    try:
        return build.load_extension("cuda", op, variants=True)
    except build.NativeOpUnavailable as exc:
        raise RuntimeError(f"{op}: the CUDA kernel variants are unavailable: {exc}") from exc


def not_applicable(op: str, kernel: str, reason: str) -> None:
    """Say once that variant kernel ``kernel`` of ``op`` does not apply (``reason``) and the default runs;
    raise instead under MASKFORMERS_STRICT_OPS=1."""
    message = f"maskformers {op}: kernel variant '{kernel}' does not apply: {reason}; running the default kernel"
    if os.environ.get(STRICT_ENV, "") not in ("", "0"):
        raise RuntimeError(f"{message} is not allowed with {STRICT_ENV} set")
    key = (op, kernel, reason)
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=4)
