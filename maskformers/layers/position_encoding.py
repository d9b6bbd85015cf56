"""Sine position embedding of a 2-D grid (DETR / Mask2Former convention), channels-last.

For a grid of ``height x width`` positions the embedding has ``2 * num_pos_feats`` channels: the first
half encodes the row (y), the second half the column (x). Within each half, channel ``2k`` is
``sin(p / T^(2k/F))`` and channel ``2k+1`` is ``cos(p / T^(2k/F))`` with ``F = num_pos_feats`` and
``p`` the 1-based position, optionally normalized to ``(0, scale]`` as ``p / (n + 1e-6) * scale``
(no ``-0.5`` shift, unlike Deformable-DETR).

The embedding does not depend on the batch (padding is not masked, as in the published models), so it
is computed once per grid as (H, W, C) and broadcast; only ``H + W`` rows of sines are evaluated.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["SinePositionEmbedding", "sine_position_embedding"]

_EPS = 1e-6


def _axis_embedding(
    length: int, dim_t: torch.Tensor, *, normalize: bool, scale: float, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """(length, F) interleaved sin/cos embedding of the positions 1..length along one axis."""
    pos = torch.arange(1, length + 1, dtype=dtype, device=device)
    if normalize:
        pos = pos / (pos[-1:] + _EPS) * scale
    angles = pos[:, None] / dim_t  # (length, F)
    return torch.stack((angles[:, 0::2].sin(), angles[:, 1::2].cos()), dim=2).flatten(1)


def sine_position_embedding(
    height: int,
    width: int,
    *,
    num_pos_feats: int = 128,
    temperature: float = 10000.0,
    normalize: bool = True,
    scale: float = 2 * math.pi,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Sine embedding of an ``height x width`` grid: (H, W, 2 * num_pos_feats), y channels first.

    Computed in ``dtype`` for float32/float64 (bit-compatible with transformers' Mask2Former); for
    16-bit dtypes it is computed in float32 and cast, as the original Mask2Former code does.
    """
    if height < 1 or width < 1:
        raise ValueError(f"expected a grid with height >= 1 and width >= 1, got ({height}, {width})")
    if num_pos_feats < 2 or num_pos_feats % 2:
        raise ValueError(f"num_pos_feats must be even and >= 2, got {num_pos_feats}")
    work = dtype if dtype in (torch.float32, torch.float64) else torch.float32
    dim_t = torch.arange(num_pos_feats, dtype=torch.int64, device=device).to(work)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_pos_feats)
    kw = dict(normalize=normalize, scale=scale, dtype=work, device=dim_t.device)
    pos_y = _axis_embedding(height, dim_t, **kw)  # (H, F)
    pos_x = _axis_embedding(width, dim_t, **kw)  # (W, F)
    grid = (height, width, num_pos_feats)
    pos = torch.cat((pos_y[:, None, :].expand(grid), pos_x[None, :, :].expand(grid)), dim=2)  # (H, W, 2F)
    return pos.to(dtype)


class SinePositionEmbedding(nn.Module):
    """Module wrapper of :func:`sine_position_embedding` (no parameters).

    ``forward(height, width, dtype=..., device=...)`` returns (H, W, 2 * num_pos_feats).
    """

    def __init__(
        self,
        *,
        num_pos_feats: int = 128,
        temperature: float = 10000.0,
        normalize: bool = True,
        scale: float | None = None,
    ) -> None:
        super().__init__()
        if scale is not None and not normalize:
            raise ValueError("scale is only used with normalize=True; got normalize=False and a scale")
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = 2 * math.pi if scale is None else scale

    @property
    def dim(self) -> int:
        """Number of output channels (2 * num_pos_feats)."""
        return 2 * self.num_pos_feats

    def forward(
        self, height: int, width: int, *, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
    ) -> torch.Tensor:
        return sine_position_embedding(
            height,
            width,
            num_pos_feats=self.num_pos_feats,
            temperature=self.temperature,
            normalize=self.normalize,
            scale=self.scale,
            dtype=dtype,
            device=device,
        )

    def extra_repr(self) -> str:
        return (
            f"num_pos_feats={self.num_pos_feats}, temperature={self.temperature}, "
            f"normalize={self.normalize}, scale={self.scale:.6g}"
        )
