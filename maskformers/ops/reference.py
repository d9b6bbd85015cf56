"""Pure-PyTorch multi-scale deformable attention: the oracle and the last-resort fallback.

Bilinear sampling with zero padding through ``F.grid_sample(align_corners=False)``, one call per level,
exactly the convention of Deformable-DETR's ``ms_deform_attn_core_pytorch``. It materialises a
(B*H, D, Q, L*P) tensor, so it is slow and memory hungry; use it to check, not to run.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .validation import check_inputs, check_level_shapes, check_level_values

__all__ = ["ms_deform_attn_reference"]


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
