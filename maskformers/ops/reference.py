"""Pure-PyTorch versions of the native ops: the oracles and the last-resort fallbacks.

``ms_deform_attn_reference``: bilinear sampling with zero padding through
``F.grid_sample(align_corners=False)``, one call per level, exactly the convention of Deformable-DETR's
``ms_deform_attn_core_pytorch``. It materialises a (B*H, D, Q, L*P) tensor.

``neighborhood_attention_2d_reference``: gathers the neighbourhoods with index tables
(``neighborhood_windows``) and materialises the (B, H, W, heads, K*K) attention like NATTEN's unfused
``natten2dqkrpb`` + softmax + ``natten2dav``. Both are slow and memory hungry; use them to check, not to run.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .validation import check_inputs, check_level_shapes, check_level_values, check_na_inputs

__all__ = ["ms_deform_attn_reference", "neighborhood_attention_2d_reference", "neighborhood_windows"]


def ms_deform_attn_reference(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor | Sequence[tuple[int, int]],
    level_start_index: torch.Tensor | None,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Reference multi-scale deformable attention.

    value (B, S, H, D); spatial_shapes (L, 2) rows (h, w), or a list of (h, w) Python ints (then
    level_start_index may be None and nothing reads tensor data: torch.export can trace it);
    level_start_index (L,); sampling_locations (B, Q, H, L, P, 2) normalized (x, y); attention_weights
    (B, Q, H, L, P). Returns (B, Q, H*D) in value's dtype. Locations and weights are cast to value's
    dtype, as plain PyTorch code does.
    """
    if isinstance(spatial_shapes, torch.Tensor):
        check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
        shapes = check_level_values(spatial_shapes, level_start_index, value.shape[1])
    else:
        shapes = check_level_shapes(spatial_shapes, value.shape[1] if value.dim() == 4 else -1)
        table = torch.tensor(shapes, dtype=torch.int64)
        starts = level_start_index if level_start_index is not None else torch.zeros(len(shapes), dtype=torch.int64)
        check_inputs(value, table, starts, sampling_locations, attention_weights)
    B, S, H, D = value.shape
    Q, L, P = sampling_locations.shape[1], sampling_locations.shape[3], sampling_locations.shape[4]
    grids = sampling_locations.to(value.dtype) * 2 - 1
    per_level = value.split([h * w for h, w in shapes], dim=1)
    samples = []
    for level, (h, w) in enumerate(shapes):
        # (B, h*w, H, D) -> (B*H, D, h, w). Made contiguous on purpose: torch's CPU grid_sample returns
        # garbage (NaN in bfloat16, wrong values in float16) for 16-bit inputs with these strides.
        v = per_level[level].permute(0, 2, 3, 1).reshape(B * H, D, h, w).contiguous()
        # (B, Q, H, P, 2) -> (B*H, Q, P, 2)
        g = grids[:, :, :, level].transpose(1, 2).reshape(B * H, Q, P, 2)
        samples.append(F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False))
    stacked = torch.stack(samples, dim=-2).flatten(-2)  # (B*H, D, Q, L*P)
    weights = attention_weights.to(value.dtype).transpose(1, 2).reshape(B * H, 1, Q, L * P)
    out = (stacked * weights).sum(-1)  # (B*H, D, Q)
    return out.view(B, H * D, Q).transpose(1, 2).contiguous()


def neighborhood_windows(
    length: int, kernel_size: int, dilation: int, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Index tables of one axis: ``keys[i, k]``, the position of query i's k-th neighbour, and ``bias[i, k]``,
    its entry in the relative position bias (0 .. 2K-2). Both (length, K) int64.

    NATTEN semantics: query i attends to K members of its dilation group (positions = i mod dilation),
    centred on i and shifted inward at the borders so that the window stays inside the axis.
    """
    idx = torch.arange(length, device=device)
    group, g = idx % dilation, idx // dilation
    members = (length - group + dilation - 1) // dilation
    first = torch.minimum((g - kernel_size // 2).clamp(min=0), members - kernel_size)  # group-local start
    k = torch.arange(kernel_size, device=device)
    keys = (first[:, None] + k) * dilation + group[:, None]
    bias = first[:, None] - g[:, None] + k + kernel_size - 1
    return keys, bias


def neighborhood_attention_2d_reference(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    rpb: torch.Tensor | None = None,
    *,
    kernel_size: int,
    dilation: int = 1,
    scale: float | None = None,
) -> torch.Tensor:
    """Reference 2-D neighborhood attention.

    query, key, value (B, H, W, heads, D); rpb (heads, 2K-1, 2K-1) or None. Each pixel attends to its
    K x K neighbourhood (``neighborhood_windows`` per axis): softmax(scale * q.k + rpb) @ v, all in the
    inputs' dtype as plain PyTorch code computes it. Returns (B, H, W, heads, D). Works one kernel row at
    a time (K-fold copies of key or value, not K*K-fold) but keeps the whole (B, H, W, heads, K*K) attention.
    """
    check_na_inputs(query, key, value, rpb, kernel_size, dilation)
    B, H, W, heads, D = query.shape
    K = kernel_size
    scale = D**-0.5 if scale is None else scale
    rows, row_bias = neighborhood_windows(H, K, dilation, query.device)
    cols, col_bias = neighborhood_windows(W, K, dilation, query.device)
    q = query * scale
    logits = []
    for ki in range(K):
        k_nb = key[:, rows[:, ki]][:, :, cols]  # (B, H, W, K, heads, D): kernel row ki of every window
        logits.append(torch.einsum("bhwnd,bhwknd->bhwnk", q, k_nb))
    attn = torch.stack(logits, dim=-2)  # (B, H, W, heads, K, K)
    if rpb is not None:
        bias = rpb[:, row_bias[:, None, :, None], col_bias[None, :, None, :]]  # (heads, H, W, K, K)
        attn = attn + bias.permute(1, 2, 0, 3, 4)
    attn = attn.flatten(-2).softmax(dim=-1).view(B, H, W, heads, K, K)
    out = torch.zeros_like(query)
    for ki in range(K):
        v_nb = value[:, rows[:, ki]][:, :, cols]
        out = out + torch.einsum("bhwnk,bhwknd->bhwnd", attn[..., ki, :], v_nb)
    return out
