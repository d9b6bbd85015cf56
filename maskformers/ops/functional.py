"""Multi-scale deformable attention: custom op registration, autograd and backend choice.

Layers: compiled kernels (csrc/, loaded by ``build.load_extension``) -> ``torch.library`` custom ops
``maskformers::ms_deform_attn`` and ``maskformers::ms_deform_attn_backward`` with fake (meta)
implementations and autograd -> the functional ``ms_deform_attn`` that checks inputs and picks a backend.

Contract of the custom ops (the functional prepares it): value (B, S, H, D) contiguous in float32,
float64, bfloat16 or float16; spatial_shapes (L, 2) and level_start_index (L,) int64 on the CPU;
sampling_locations and attention_weights contiguous in ``coord_dtype(value.dtype)`` (float64 for
float64 values, else float32) on value's device; ``variant`` one of
``kernel_variants()["ms_deform_attn"]`` (CUDA kernel variants, see variants.py; ignored on the CPU).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence

import torch

from . import variants
from .backend import BACKENDS, check_backend, default_backend
from .reference import ms_deform_attn_reference
from .validation import check_inputs, check_level_shapes, check_level_values, coord_dtype

__all__ = ["ms_deform_attn", "resolve_backend", "check_no_double_backward", "BACKENDS", "STRICT_ENV"]

STRICT_ENV = "MASKFORMERS_STRICT_OPS"


# ----------------------------------------------------------------------------------------------
# custom ops
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("maskformers::ms_deform_attn", mutates_args=())
def _native_forward(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    variant: str = "default",
) -> torch.Tensor:
    from . import build

    check_level_values(spatial_shapes, level_start_index, value.shape[1])
    kernel, _ = variants.pass_kernels("ms_deform_attn", variant)
    args = (value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    if kernel != "default" and value.device.type == "cuda":
        ext = variants.load_variants("ms_deform_attn")
        with torch.profiler.record_function(f"maskformers::ms_deform_attn forward (cuda kernel, {kernel})"):
            return getattr(ext, f"forward_{kernel}")(*args)
    ext = build.load_extension(value.device.type)
    # the compiled kernel is invisible to torch.profiler unless named here
    with torch.profiler.record_function(f"maskformers::ms_deform_attn forward ({value.device.type} kernel)"):
        return ext.forward(*args)


@_native_forward.register_fake
def _native_forward_fake(value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                         variant="default"):
    B, _, H, D = value.shape
    return value.new_empty(B, sampling_locations.shape[1], H * D)


@torch.library.custom_op("maskformers::ms_deform_attn_backward", mutates_args=())
def _native_backward(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    grad_output: torch.Tensor,
    variant: str = "default",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from . import build

    check_level_values(spatial_shapes, level_start_index, value.shape[1])
    _, kernel = variants.pass_kernels("ms_deform_attn", variant)
    args = (value, spatial_shapes, level_start_index, sampling_locations, attention_weights, grad_output)
    if kernel != "default" and value.device.type == "cuda":
        ext = variants.load_variants("ms_deform_attn")
        reason = ext.tiled_unsupported(value.shape[3], value.dtype == torch.float64, attention_weights.numel())
        if not reason:
            with torch.profiler.record_function(f"maskformers::ms_deform_attn backward (cuda kernel, {kernel})"):
                return tuple(getattr(ext, f"backward_{kernel}")(*args))
        variants.not_applicable("ms_deform_attn", kernel, reason)
    ext = build.load_extension(value.device.type)
    with torch.profiler.record_function(f"maskformers::ms_deform_attn backward ({value.device.type} kernel)"):
        grad_value, grad_locations, grad_weights = ext.backward(*args)
    return grad_value, grad_locations, grad_weights


@_native_backward.register_fake
def _native_backward_fake(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, grad_output,
                          variant="default"):
    return torch.empty_like(value), torch.empty_like(sampling_locations), torch.empty_like(attention_weights)


def _setup_context(ctx, inputs, output):
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights, variant = inputs
    ctx.save_for_backward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    ctx.variant = variant


def check_no_double_backward(op: str, *tensors: torch.Tensor | None) -> None:
    """Raise when a native backward runs under create_graph=True for tensors that need a graph.

    Autograd runs a backward in grad mode only under create_graph=True; the gradients returned there
    would claim requires_grad=True while their own backward does not exist. Refuse up front instead.
    """
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        raise RuntimeError(
            f"{op}: the native backend has no double backward, and this backward was asked to build a graph "
            "of itself (create_graph=True: higher-order gradients, gradient penalties). Run this computation "
            "with backend='reference' (maskformers.ops.set_backend(model, 'reference'), or inside "
            "`with maskformers.ops.use_backend('reference'):`), whose gradients are differentiable."
        )


def _backward(ctx, grad_output):
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights = ctx.saved_tensors
    check_no_double_backward("ms_deform_attn", grad_output, value, sampling_locations, attention_weights)
    grad_value, grad_locations, grad_weights = _native_backward(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights, grad_output.contiguous(),
        ctx.variant,
    )
    return grad_value, None, None, grad_locations, grad_weights, None


_native_forward.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------
# backend choice
# ----------------------------------------------------------------------------------------------

_warned_fallback: set[str] = set()


def _native_reason(device_type: str, op: str = "ms_deform_attn") -> str:
    """Empty string when the native kernel of ``op`` for ``device_type`` loads, else why it does not."""
    from . import build  # imported here so that `python -m maskformers.ops.build` runs it only once

    try:
        build.load_extension(device_type, op)
    except build.NativeOpUnavailable as exc:
        return str(exc)
    return ""


# What torch.compiler.assume_constant_result(_native_reason) does (torch.compile treats the result as a
# constant instead of tracing the build); set by hand because that decorator imports torch._dynamo,
# which would add ~2 s to `import maskformers.ops`. tests/test_ms_deform_attn.py checks both agree.
_native_reason._dynamo_marked_constant = True  # type: ignore[attr-defined]


def resolve_backend(backend: str | None, device: torch.device, op: str = "ms_deform_attn") -> str:
    """The backend of ``op`` that will run for tensors on ``device``: ``backend`` itself, or the choice for None.

    ``None`` takes the thread's default (:func:`maskformers.ops.use_backend`), and when that is None too
    picks "native" when its kernel loads for that device type, else "reference" with one warning per
    op and device type saying why; with ``MASKFORMERS_STRICT_OPS=1`` that fallback is an error. Asking
    for "native" explicitly never falls back.
    """
    check_backend(backend)
    if backend is None:
        backend = default_backend()
    if backend == "reference":
        return backend
    if device.type == "meta":  # shapes only: the custom op's fake implementation answers, no kernel runs
        return "native"
    reason = _native_reason(device.type, op)
    if not reason:
        return "native"
    if backend == "native":
        raise RuntimeError(f"{op} backend='native' is unavailable on {device.type}: {reason}")
    if os.environ.get(STRICT_ENV, "") not in ("", "0"):
        raise RuntimeError(
            f"{op}: the native kernel is unavailable on {device.type} and {STRICT_ENV} is set, "
            f"so there is no fallback to the reference implementation. Reason: {reason}"
        )
    key = f"{op}:{device.type}"
    if key not in _warned_fallback:
        _warned_fallback.add(key)
        warnings.warn(
            f"maskformers {op}: native kernel unavailable on {device.type} ({reason}); "
            "running the pure-PyTorch reference instead (slower, more memory). "
            f"Set {STRICT_ENV}=1 to make this an error.",
            RuntimeWarning,
            stacklevel=3,
        )
    return "reference"


def ms_deform_attn(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor | Sequence[tuple[int, int]],
    level_start_index: torch.Tensor | None,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Multi-scale deformable attention (Deformable-DETR convention).

    value (B, S, H, D) with S = sum of h*w over levels; spatial_shapes (L, 2) int64 rows (h, w), or a
    list of (h, w) Python ints; level_start_index (L,) int64, or None with a list (derived from it);
    sampling_locations (B, Q, H, L, P, 2) normalized (x, y) in [0, 1] (outside is allowed and reads
    zeros, as grid_sample with align_corners=False and zero padding); attention_weights (B, Q, H, L, P).
    Returns (B, Q, H*D) in value's dtype. Level sizes as Python ints are checked without reading any
    tensor, which keeps the call traceable by ``torch.export``.

    backend: None (native kernel when available for the tensors' device, else the reference with a
    warning), "native" or "reference". The native kernels accumulate in float32 (float64 for float64
    inputs) and keep sampling coordinates in float32 for 16-bit values.

    NaN or +-inf sampling locations propagate as in grid_sample, on both backends: the output row of that
    (query, head) becomes NaN, and so do the sample's attention-weight gradient and the gradient of the
    other coordinate of its location. The native backend has first derivatives only; a backward with
    ``create_graph=True`` through it raises and names the reference backend, which supports it. On CUDA
    the native backend runs the kernel variant chosen by ``maskformers.ops.use_kernel_variant`` or
    ``MASKFORMERS_MSDA_VARIANT`` (default: the default kernels; see ``kernel_variants()``).
    """
    if not isinstance(spatial_shapes, torch.Tensor):
        if level_start_index is not None:
            raise ValueError("pass level_start_index=None with spatial_shapes as a list (it is derived from the sizes)")
        shapes = check_level_shapes(spatial_shapes, value.shape[1] if value.dim() == 4 else -1)
        starts = [0]
        for h, w in shapes[:-1]:
            starts.append(starts[-1] + h * w)
        spatial_shapes = torch.tensor(shapes, dtype=torch.int64)
        level_start_index = torch.tensor(starts, dtype=torch.int64)
    else:
        shapes = None
    check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    if resolve_backend(backend, value.device) == "reference":
        return ms_deform_attn_reference(
            value, shapes if shapes is not None else spatial_shapes,
            None if shapes is not None else level_start_index, sampling_locations, attention_weights,
        )
    cdt = coord_dtype(value.dtype)
    variant = variants.current_variant("ms_deform_attn") if value.device.type == "cuda" else "default"
    return _native_forward(
        value.contiguous(),
        spatial_shapes.to(device="cpu", dtype=torch.int64),
        level_start_index.to(device="cpu", dtype=torch.int64),
        sampling_locations.to(cdt).contiguous(),
        attention_weights.to(cdt).contiguous(),
        variant,
    )
