"""Deformable transformer encoder (Deformable-DETR, encoder only) over flattened multi-scale maps.

Every position of every level is a query that attends, through :class:`MSDeformAttn`, to a few
sampled points on all levels around its own centre. Layers are post-norm:
``x = norm1(x + attn(x + pos, x)); x = norm2(x + linear2(relu(linear1(x))))``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.validation import coord_dtype
from .ms_deform_attn import MSDeformAttn

__all__ = ["DeformableEncoderLayer", "DeformableEncoder", "grid_reference_points"]


def grid_reference_points(
    shapes: Sequence[tuple[int, int]], *, dtype: torch.dtype, device: torch.device | str | None = None
) -> torch.Tensor:
    """Normalized pixel centres of every level, concatenated: (S, 2) rows (x, y) = ((j+0.5)/w, (i+0.5)/h).

    With no padding (valid ratios 1) every query uses the same point on all levels, so the layer
    input is this tensor viewed as (1, S, 1, 2) and expanded to (1, S, L, 2) without a copy.
    """
    points = []
    for h, w in shapes:
        ys = torch.linspace(0.5, h - 0.5, h, dtype=dtype, device=device) / h
        xs = torch.linspace(0.5, w - 0.5, w, dtype=dtype, device=device) / w
        grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
        points.append(torch.stack((grid_x.reshape(-1), grid_y.reshape(-1)), dim=-1))
    return torch.cat(points, dim=0)


class DeformableEncoderLayer(nn.Module):
    """MSDeformAttn self-attention over the multi-scale sequence + FFN, post-norm."""

    def __init__(
        self,
        *,
        embed_dim: int = 256,
        num_heads: int = 8,
        num_levels: int = 3,
        num_points: int = 4,
        ffn_dim: int = 1024,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.self_attn = MSDeformAttn(
            embed_dim=embed_dim,
            num_heads=num_heads,
            num_levels=num_levels,
            num_points=num_points,
        )
        self.norm1 = nn.LayerNorm(embed_dim)
        self.linear1 = nn.Linear(embed_dim, ffn_dim)
        self.linear2 = nn.Linear(ffn_dim, embed_dim)
        self.norm2 = nn.LayerNorm(embed_dim)
        self.dropout = nn.Dropout(dropout)
        # the original encoder Xavier-fills every matrix before resetting MSDeformAttn; biases keep the default
        nn.init.xavier_uniform_(self.linear1.weight)
        nn.init.xavier_uniform_(self.linear2.weight)

    def forward(
        self,
        x: torch.Tensor,
        pos: torch.Tensor,
        reference_points: torch.Tensor,
        shapes: Sequence[tuple[int, int]],
        padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x (B, S, C); pos (B or 1, S, C); reference_points (B or 1, S, L, 2); shapes: (h, w) of every
        level as Python ints. Returns (B, S, C)."""
        # The residual sums and the ReLU write into freshly made tensors (same values as out-of-place,
        # autograd-safe): at 1/8-resolution sequence lengths, new allocations cost more than the math.
        y = self.self_attn(x + pos, reference_points, x, shapes, None, padding_mask)
        x = self.norm1(self.dropout(y).add_(x))
        h = F.relu(self.linear1(x), inplace=True)
        y = self.linear2(self.dropout(h))
        return self.norm2(self.dropout(y).add_(x))


class DeformableEncoder(nn.Module):
    """A stack of :class:`DeformableEncoderLayer` sharing reference points and position embeddings."""

    def __init__(
        self,
        *,
        num_layers: int = 6,
        embed_dim: int = 256,
        num_heads: int = 8,
        num_levels: int = 3,
        num_points: int = 4,
        ffn_dim: int = 1024,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.num_levels = num_levels
        self.layers = nn.ModuleList(
            DeformableEncoderLayer(
                embed_dim=embed_dim,
                num_heads=num_heads,
                num_levels=num_levels,
                num_points=num_points,
                ffn_dim=ffn_dim,
                dropout=dropout,
                )
            for _ in range(num_layers)
        )

    def forward(
        self,
        x: torch.Tensor,
        pos: torch.Tensor,
        shapes: Sequence[tuple[int, int]],
        padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x (B, S, C) flattened levels; pos (B or 1, S, C); shapes: (h, w) of every level as Python ints
        (static, so the model exports and traces without reading tensor data). Returns (B, S, C)."""
        shapes = [(int(h), int(w)) for h, w in shapes]
        if len(shapes) != self.num_levels:
            raise ValueError(f"expected shapes of {self.num_levels} levels, got {shapes}")
        if sum(h * w for h, w in shapes) != x.shape[1]:
            raise ValueError(f"shapes {shapes} cover {sum(h * w for h, w in shapes)} positions, x has S={x.shape[1]}")
        ref = grid_reference_points(shapes, dtype=coord_dtype(x.dtype), device=x.device)
        ref = ref[None, :, None, :].expand(1, ref.shape[0], self.num_levels, 2)  # (1, S, L, 2)
        for layer in self.layers:
            x = layer(x, pos, ref, shapes, padding_mask)
        return x
