"""2-D neighborhood attention (NATTEN 0.17 semantics): custom op registration, autograd and backend choice.

Layers, as for ms_deform_attn: compiled kernels (csrc/neighborhood_attention_*, loaded by
``build.load_extension(device, "neighborhood_attention")``) -> ``torch.library`` custom ops
``maskformers::neighborhood_attention_2d`` (returns the output and the per-(pixel, head) log-sum-exp of
the logits, which is all the backward keeps) and ``maskformers::neighborhood_attention_2d_backward``
with fake (meta) implementations and autograd -> the functional ``neighborhood_attention_2d`` that
checks inputs and picks a backend.

Contract of the custom ops (the functional prepares it): query, key, value (B, H, W, heads, D)
contiguous in one of float32, float64, bfloat16, float16; rpb (heads, 2K-1, 2K-1) contiguous in that
dtype, or None; lse (B, H, W, heads) in float64 for float64 inputs, else float32; ``variant`` one of
``kernel_variants()["neighborhood_attention"]`` (CUDA kernel variants, see variants.py; ignored on the CPU).
"""

from __future__ import annotations

import torch

from . import variants
from .functional import check_no_double_backward, resolve_backend
from .reference import neighborhood_attention_2d_reference
from .validation import check_na_inputs

__all__ = ["OP_NAME", "neighborhood_attention_2d"]

OP_NAME = "neighborhood_attention"


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _bias_arg(query: torch.Tensor, rpb: torch.Tensor | None) -> torch.Tensor:
    return rpb if rpb is not None else query.new_empty(0)  # the extension reads an empty tensor as "no bias"


def _tensor_core_unsupported(ext, query: torch.Tensor) -> str:
    """Why the tensor-core kernels cannot run for this query ("" when they can)."""
    reason = ext.tensor_core_unsupported(query)
    if not reason and torch.cuda.get_device_capability(query.device) < (8, 0):
        reason = "they need compute capability 8.0 (bfloat16 tensor cores)"
    return reason


@torch.library.custom_op("maskformers::neighborhood_attention_2d", mutates_args=())
def _native_forward(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    rpb: torch.Tensor | None,
    kernel_size: int,
    dilation: int,
    scale: float,
    variant: str = "default",
) -> tuple[torch.Tensor, torch.Tensor]:
    from . import build

    kernel, _ = variants.pass_kernels(OP_NAME, variant)
    args = (query, key, value, _bias_arg(query, rpb), kernel_size, dilation, scale)
    if kernel != "default" and query.device.type == "cuda":
        ext = variants.load_variants(OP_NAME)
        reason = _tensor_core_unsupported(ext, query)
        if not reason:
            label = f"maskformers::neighborhood_attention_2d forward (cuda kernel, {kernel})"
            with torch.profiler.record_function(label):
                return getattr(ext, f"forward_{kernel}")(*args)
        variants.not_applicable(OP_NAME, kernel, reason)
    ext = build.load_extension(query.device.type, OP_NAME)
    label = f"maskformers::neighborhood_attention_2d forward ({query.device.type} kernel)"
    with torch.profiler.record_function(label):
        return ext.forward(*args)


@_native_forward.register_fake
def _native_forward_fake(query, key, value, rpb, kernel_size, dilation, scale, variant="default"):
    B, H, W, heads, _ = query.shape
    return torch.empty_like(query), query.new_empty(B, H, W, heads, dtype=_acc_dtype(query.dtype))


@torch.library.custom_op("maskformers::neighborhood_attention_2d_backward", mutates_args=())
def _native_backward(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    rpb: torch.Tensor | None,
    lse: torch.Tensor,
    grad_out: torch.Tensor,
    kernel_size: int,
    dilation: int,
    scale: float,
    variant: str = "default",
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from . import build

    _, kernel = variants.pass_kernels(OP_NAME, variant)
    if kernel != "default" and query.device.type == "cuda":
        ext = variants.load_variants(OP_NAME)
        reason = _tensor_core_unsupported(ext, query)
        if not reason and out is None:
            reason = "the forward's output was not kept (call through neighborhood_attention_2d)"
        if not reason:
            delta = (grad_out.float() * out.float()).sum(-1)  # rowsum(dO * O), flash attention's delta
            label = f"maskformers::neighborhood_attention_2d backward (cuda kernel, {kernel})"
            with torch.profiler.record_function(label):
                return getattr(ext, f"backward_{kernel}")(
                    query, key, value, _bias_arg(query, rpb), lse, grad_out, delta, kernel_size, dilation, scale
                )
        variants.not_applicable(OP_NAME, kernel, reason)
    ext = build.load_extension(query.device.type, OP_NAME)
    label = f"maskformers::neighborhood_attention_2d backward ({query.device.type} kernel)"
    with torch.profiler.record_function(label):
        return ext.backward(query, key, value, _bias_arg(query, rpb), lse, grad_out, kernel_size, dilation, scale)


@_native_backward.register_fake
def _native_backward_fake(query, key, value, rpb, lse, grad_out, kernel_size, dilation, scale, variant="default",
                          out=None):
    grad_rpb = torch.empty_like(rpb) if rpb is not None else query.new_empty(0)
    return torch.empty_like(query), torch.empty_like(key), torch.empty_like(value), grad_rpb


def _setup_context(ctx, inputs, output):
    query, key, value, rpb, kernel_size, dilation, scale, variant = inputs
    # a variant backward kernel also needs the output (for rowsum(dO * O))
    keep_out = variants.pass_kernels(OP_NAME, variant)[1] != "default"
    ctx.save_for_backward(query, key, value, rpb, output[1], output[0] if keep_out else None)
    ctx.kernel_size, ctx.dilation, ctx.scale, ctx.variant = kernel_size, dilation, scale, variant
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, grad_out, grad_lse):
    query, key, value, rpb, lse, out = ctx.saved_tensors
    check_no_double_backward("neighborhood_attention_2d", grad_out, query, key, value, rpb)
    grad_q, grad_k, grad_v, grad_rpb = _native_backward(
        query, key, value, rpb, lse, grad_out.contiguous(), ctx.kernel_size, ctx.dilation, ctx.scale, ctx.variant, out
    )
    return grad_q, grad_k, grad_v, (grad_rpb if rpb is not None else None), None, None, None, None


_native_forward.register_autograd(_backward, setup_context=_setup_context)


def neighborhood_attention_2d(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    rpb: torch.Tensor | None = None,
    *,
    kernel_size: int,
    dilation: int = 1,
    scale: float | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """2-D neighborhood attention with relative position bias, as DiNAT uses it.

    query, key, value (B, H, W, heads, D); rpb (heads, 2K-1, 2K-1) or None; K = kernel_size (odd). Every
    pixel attends to K x K pixels of its dilation group (rows and columns congruent to its own modulo
    ``dilation``), centred on it and shifted inward at the borders (NATTEN 0.17's natten2dqkrpb + softmax
    + natten2dav): out = softmax(scale * q . k + rpb) @ v with scale = D**-0.5 unless given. H and W must
    be at least K * dilation (DiNAT pads smaller maps). Returns (B, H, W, heads, D) in query's dtype.

    backend: None (native kernel when available for the tensors' device, else the reference with one
    warning), "native" or "reference". The native kernels fuse the logits, bias, softmax and weighted sum
    per pixel (no (B, H, W, heads, K*K) tensor in the forward) and accumulate in float32 (float64 for
    float64 inputs); they give first derivatives for query, key, value and rpb. The CUDA kernel takes head
    dims up to 256. On CUDA the native backend runs the kernel variant chosen by
    ``maskformers.ops.use_kernel_variant`` or ``MASKFORMERS_NA_VARIANT`` (see ``kernel_variants()``).
    """
    check_na_inputs(query, key, value, rpb, kernel_size, dilation)
    if scale is None:
        scale = query.shape[-1] ** -0.5
    elif not isinstance(scale, (int, float)) or isinstance(scale, bool) or scale != scale:
        raise TypeError(f"scale must be a float or None, got {scale!r}")
    if resolve_backend(backend, query.device, OP_NAME) == "reference":
        return neighborhood_attention_2d_reference(
            query, key, value, rpb, kernel_size=kernel_size, dilation=dilation, scale=scale
        )
    out, _ = _native_forward(
        query.contiguous(),
        key.contiguous(),
        value.contiguous(),
        rpb.contiguous() if rpb is not None else None,
        kernel_size,
        dilation,
        float(scale),
        variants.current_variant(OP_NAME) if query.device.type == "cuda" else "default",
    )
    return out
