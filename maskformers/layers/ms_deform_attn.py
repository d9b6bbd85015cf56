"""Multi-scale deformable attention layer (Deformable-DETR) on top of ``maskformers.ops.ms_deform_attn``.

Each query predicts, per head, ``num_points`` sampling offsets on each of ``num_levels`` feature maps
around its reference point, plus softmax weights over the ``num_levels * num_points`` samples; the op
gathers the bilinearly sampled values and the weighted sum goes through an output projection.

Precision: sampling locations and attention weights are computed in float32 (float64 for float64
inputs) even under autocast or for 16-bit inputs, because a 16-bit location in [0, 1] cannot address a
pixel of a large map; only the value projection and the op's value input follow the input dtype.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import ms_deform_attn
from ..ops.validation import coord_dtype
from .autocast import autocast_disabled, autocast_enabled

__all__ = ["MSDeformAttn"]


def _level_sizes(shapes: Sequence[tuple[int, int]], *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(L, 2) rows (w, h) on ``device``, written by fill kernels: ``torch.tensor(rows, device="cuda")``
    would copy from host memory, which waits for the GPU and cannot be captured in a CUDA graph."""
    sizes = torch.empty(len(shapes), 2, dtype=dtype, device=device)
    for level, (h, w) in enumerate(shapes):
        sizes[level, 0] = w
        sizes[level, 1] = h
    return sizes


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention.

    Parameters keep the original names: ``sampling_offsets`` (C -> heads*levels*points*2, rows ordered
    (head, level, point, xy)), ``attention_weights`` (C -> heads*levels*points), ``value_proj`` and
    ``output_proj`` (C -> C).

    op_backend: passed to :func:`maskformers.ops.ms_deform_attn` (None: native when available, else the
    reference with a warning; "native"; "reference"). It may be changed on the instance at any time.
    """

    def __init__(
        self,
        *,
        embed_dim: int = 256,
        num_heads: int = 8,
        num_levels: int = 4,
        num_points: int = 4,
        op_backend: str | None = None,
    ) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(
                f"embed_dim must be divisible by num_heads, got embed_dim={embed_dim}, num_heads={num_heads}"
            )
        for name, v in (("num_heads", num_heads), ("num_levels", num_levels), ("num_points", num_points)):
            if v < 1:
                raise ValueError(f"{name} must be >= 1, got {v}")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.num_levels = num_levels
        self.num_points = num_points
        self.op_backend = op_backend
        self.sampling_offsets = nn.Linear(embed_dim, num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(embed_dim, num_heads * num_levels * num_points)
        self.value_proj = nn.Linear(embed_dim, embed_dim)
        self.output_proj = nn.Linear(embed_dim, embed_dim)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Deformable-DETR initialisation: no learned offsets yet, point k of head h starts k+1 pixels
        away in direction 2*pi*h/H on every level; uniform attention weights; Xavier projections."""
        H, L, P = self.num_heads, self.num_levels, self.num_points
        nn.init.zeros_(self.sampling_offsets.weight)
        angles = torch.arange(H, dtype=torch.float64) * (2 * math.pi / H)
        directions = torch.stack([angles.cos(), angles.sin()], dim=-1)  # (H, 2)
        directions = directions / directions.abs().amax(-1, keepdim=True)  # onto the unit square
        steps = torch.arange(1, P + 1, dtype=torch.float64)[None, None, :, None]
        grid = directions[:, None, None, :] * steps  # (H, 1, P, 2)
        self.sampling_offsets.bias.copy_(grid.expand(H, L, P, 2).reshape(-1))
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for proj in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(proj.weight)
            nn.init.zeros_(proj.bias)

    def _offsets_and_weights(self, query: torch.Tensor, cdt: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw offsets (B, Q, H*L*P*2) and softmax weights (B, Q, H, L*P), both in ``cdt``."""
        B, Q, _ = query.shape
        if query.dtype == cdt and not autocast_enabled(query.device.type):
            offsets = self.sampling_offsets(query)
            logits = self.attention_weights(query)
        else:
            with autocast_disabled(query.device.type):
                q = query.to(cdt)
                offsets = F.linear(q, self.sampling_offsets.weight.to(cdt), self.sampling_offsets.bias.to(cdt))
                logits = F.linear(q, self.attention_weights.weight.to(cdt), self.attention_weights.bias.to(cdt))
        # softmax over the L*P samples of each head, written out: torch.softmax over a last dim of 12 is
        # several times slower on CPU; identical up to rounding
        logits = logits.view(B, Q, self.num_heads, self.num_levels * self.num_points)
        weights = torch.exp(logits - logits.amax(-1, keepdim=True))
        return offsets, weights / weights.sum(-1, keepdim=True)

    def forward(
        self,
        query: torch.Tensor,
        reference_points: torch.Tensor,
        value: torch.Tensor,
        spatial_shapes: torch.Tensor | Sequence[tuple[int, int]],
        level_start_index: torch.Tensor | None,
        value_padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attend from ``query`` to the flattened multi-scale ``value``.

        query (B, Q, C) (position embedding already added); reference_points (B or 1, Q, L, 2)
        normalized (x, y) in [0, 1]; value (B, S, C), the L maps flattened and concatenated;
        spatial_shapes (L, 2) int64 rows (h, w), ideally on the CPU, or a list of (h, w) Python ints
        (then level_start_index is None; this keeps the layer exportable); level_start_index (L,);
        value_padding_mask (B, S) bool, True where value is padding (zeroed), or None.
        Returns (B, Q, C).
        """
        if query.dim() != 3 or query.shape[-1] != self.embed_dim:
            raise ValueError(f"expected query (B, Q, {self.embed_dim}), got {tuple(query.shape)}")
        if value.dim() != 3 or value.shape[-1] != self.embed_dim or value.shape[0] != query.shape[0]:
            raise ValueError(
                f"expected value (B={query.shape[0]}, S, {self.embed_dim}) to match query, got {tuple(value.shape)}"
            )
        B, Q, _ = query.shape
        L, P, H = self.num_levels, self.num_points, self.num_heads
        if (
            reference_points.dim() != 4
            or reference_points.shape[0] not in (1, B)
            or tuple(reference_points.shape[1:]) != (Q, L, 2)
        ):
            raise ValueError(
                f"expected reference_points (B or 1, Q, L, 2) = (({B} or 1), {Q}, {L}, 2), "
                f"got {tuple(reference_points.shape)}"
            )
        if isinstance(spatial_shapes, torch.Tensor):
            if spatial_shapes.shape != (L, 2):
                raise ValueError(
                    f"expected spatial_shapes ({L}, 2) for num_levels={L}, got {tuple(spatial_shapes.shape)}"
                )
        elif len(spatial_shapes) != L:
            raise ValueError(f"expected spatial_shapes of {L} levels for num_levels={L}, got {list(spatial_shapes)}")

        v = self.value_proj(value)
        if value_padding_mask is not None:
            if value_padding_mask.shape != value.shape[:2]:
                raise ValueError(
                    f"expected value_padding_mask (B, S) = {tuple(value.shape[:2])}, "
                    f"got {tuple(value_padding_mask.shape)}"
                )
            v = v.masked_fill(value_padding_mask[..., None], 0.0)
        v = v.view(B, v.shape[1], H, self.embed_dim // H)  # (B, S, H, D)

        cdt = coord_dtype(v.dtype)
        offsets, weights = self._offsets_and_weights(query, cdt)
        with autocast_disabled(query.device.type):
            # offsets are in pixels of each level, x first: divide by (w, h), laid out as the offsets'
            # trailing (H, L, P, 2) dims so the division streams without inner-dim broadcasting
            if isinstance(spatial_shapes, torch.Tensor):
                normalizer = spatial_shapes.flip(-1).to(device=query.device, dtype=cdt)  # (L, 2) rows (w, h)
            else:
                normalizer = _level_sizes(spatial_shapes, dtype=cdt, device=query.device)
            normalizer = normalizer[None, :, None, :].expand(H, L, P, 2).contiguous()
            ref = reference_points.to(cdt)[:, :, None, :, None, :]  # (B or 1, Q, 1, L, 1, 2)
            locations = (offsets.view(B, Q, H, L, P, 2) / normalizer).add_(ref)  # (B, Q, H, L, P, 2)
        out = ms_deform_attn(
            v,
            spatial_shapes,
            level_start_index,
            locations,
            weights.view(B, Q, H, L, P),
            backend=self.op_backend,
        )  # (B, Q, C)
        return self.output_proj(out)

    def extra_repr(self) -> str:
        return (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, num_levels={self.num_levels}, "
            f"num_points={self.num_points}, op_backend={self.op_backend!r}"
        )
