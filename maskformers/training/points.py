"""Point sampling for the mask losses and the matcher (PointRend style).

Masks are compared on a few thousand points instead of every pixel. Points are (x, y) pairs in [0, 1]
relative to a map's full extent, so maps of different resolutions (1/4-resolution mask logits, full
resolution targets) are sampled at the same physical places without resizing either.

Randomness goes through a *uniform source*: a callable ``uniform(shape, device=..., dtype=...)``
returning U[0, 1) numbers (by default ``torch.rand``). Tests inject a source that replays recorded
draws, so the same points reach two implementations.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

__all__ = [
    "UniformSource",
    "point_sample",
    "default_uniform",
    "importance_sample_points",
    "num_importance_points",
    "select_uncertain_points",
]

UniformSource = Callable[..., torch.Tensor]


def default_uniform(shape: tuple[int, ...], *, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """U[0, 1) numbers from torch's global generator (seeded and checkpointed by the training loop)."""
    return torch.rand(shape, device=device, dtype=dtype)


def point_sample(maps: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Bilinear values of ``maps`` (N, C, H, W) at ``points`` (N, P, 2) -> (N, C, P).

    A point (x, y) addresses ``(x * W - 0.5, y * H - 0.5)`` in pixel units (``grid_sample`` with
    ``align_corners=False``); outside the map the value is zero-padded.
    """
    if maps.dim() != 4 or points.dim() != 3 or points.shape[-1] != 2 or points.shape[0] != maps.shape[0]:
        raise ValueError(f"expected maps (N, C, H, W) and points (N, P, 2), got {tuple(maps.shape)} "
                         f"and {tuple(points.shape)}")
    grid = 2.0 * points[:, :, None, :] - 1.0  # (N, P, 1, 2) in grid_sample's [-1, 1]
    return F.grid_sample(maps, grid, mode="bilinear", padding_mode="zeros", align_corners=False)[..., 0]


def num_importance_points(num_points: int, importance_sample_ratio: float) -> int:
    """How many of ``num_points`` are chosen by uncertainty (the rest are uniform)."""
    return int(importance_sample_ratio * num_points)


def select_uncertain_points(logits: torch.Tensor, candidates: torch.Tensor, num_uncertain: int) -> torch.Tensor:
    """The ``num_uncertain`` candidates (N, M, 2) where the logits (N, 1, H, W) are closest to 0 -> (N, m, 2)."""
    with torch.no_grad():
        uncertainty = -point_sample(logits.to(candidates.dtype), candidates)[:, 0].abs()  # (N, M): high = near 0
        index = uncertainty.topk(num_uncertain, dim=1).indices  # (N, m)
        return candidates.gather(1, index[..., None].expand(-1, -1, 2))


def importance_sample_points(
    logits: torch.Tensor,
    *,
    num_points: int,
    oversample_ratio: float,
    importance_sample_ratio: float,
    uniform: UniformSource = default_uniform,
) -> torch.Tensor:
    """Points where the masks are most uncertain, plus uniform ones (Mask2Former's training points).

    logits (N, 1, H, W) mask logits. Draws ``int(num_points * oversample_ratio)`` candidate points per
    mask, keeps the ``int(importance_sample_ratio * num_points)`` with the smallest |logit|, and adds
    uniform points up to ``num_points``. Returns (N, num_points, 2) (x, y) in [0, 1]; no gradient.
    Draw order from ``uniform``: candidates (N, kP, 2), then the uniform points (N, P - m, 2).
    """
    if logits.dim() != 4 or logits.shape[1] != 1:
        raise ValueError(f"expected logits (N, 1, H, W), got {tuple(logits.shape)}")
    num_masks = logits.shape[0]
    num_candidates = int(num_points * oversample_ratio)
    num_uncertain = num_importance_points(num_points, importance_sample_ratio)
    if not 0 <= num_uncertain <= min(num_points, num_candidates):
        raise ValueError(f"importance_sample_ratio={importance_sample_ratio} and oversample_ratio={oversample_ratio} "
                         f"give {num_uncertain} uncertain points of {num_candidates} candidates for {num_points}")
    with torch.no_grad():
        dtype = logits.dtype if logits.dtype == torch.float64 else torch.float32
        candidates = uniform((num_masks, num_candidates, 2), device=logits.device, dtype=dtype)
        chosen = select_uncertain_points(logits, candidates, num_uncertain)
        if num_points > num_uncertain:
            extra = uniform((num_masks, num_points - num_uncertain, 2), device=logits.device, dtype=dtype)
            chosen = torch.cat([chosen, extra], dim=1)
    return chosen
