"""Hungarian matching of predicted masks to target masks (Mask2Former's matcher).

The cost of pairing query q with target t is
``cost_class * (-p_q[label_t]) + cost_mask * BCE(mask_q, mask_t) + cost_dice * dice(mask_q, mask_t)``,
the mask terms averaged over ``num_points`` random points shared by all queries and targets of an
image. The costs of a whole batch are built in one pass (targets padded to the longest list), always
in float32 (float64 for float64 inputs) even under autocast, moved to the CPU once, and each image is
solved with scipy's ``linear_sum_assignment``. Non-finite costs (a diverged prediction) never crash
the solver: they are replaced by a finite value larger than any assignment avoiding them can cost,
so they are only used when unavoidable.

Targets are a list (one per image) of dicts ``{"labels": (N_i,) int64, "masks": (N_i, H, W)}``; the
masks of a batch share one (padded) size H, W.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .points import UniformSource, default_uniform, point_sample

__all__ = [
    "HungarianMatcher", "check_target_labels", "solve_assignments", "padded_target_labels", "sample_target_masks",
]

Target = Mapping[str, torch.Tensor]


def _cost_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_target_labels(targets: Sequence[Target], num_classes: int) -> None:
    """Raise ``ValueError`` unless every target label is in [0, ``num_classes``). The labels of the whole
    batch are read in one copy (one wait for the GPU when they live there)."""
    labels = [t["labels"].flatten() for t in targets if t["labels"].numel()]
    if not labels:
        return
    devices = {x.device for x in labels}
    flat = torch.cat([x.to(torch.int64) if len(devices) == 1 else x.cpu().to(torch.int64) for x in labels])
    low, high = torch.stack(flat.aminmax()).tolist()
    if low < 0 or high > num_classes - 1:
        raise ValueError(f"target labels must be in [0, {num_classes - 1}], got range [{low}, {high}]")


def padded_target_labels(targets: Sequence[Target], device: torch.device) -> tuple[torch.Tensor, list[int]]:
    """Labels (B, T_max) int64 padded with 0, and the number of targets per image."""
    counts = [int(t["labels"].numel()) for t in targets]
    labels = torch.zeros(len(targets), max(counts, default=0), dtype=torch.int64, device=device)
    for i, t in enumerate(targets):
        labels[i, : counts[i]] = t["labels"].to(device=device, dtype=torch.int64)
    return labels, counts


def sample_target_masks(
    targets: Sequence[Target], points: torch.Tensor, *, dtype: torch.dtype
) -> torch.Tensor:
    """Target masks of each image sampled at that image's points: points (B, P, 2) -> (B, T_max, P),
    zero for the padding targets. Bilinear, like the predictions (fractional on mask borders)."""
    B, P, _ = points.shape
    counts = [int(t["labels"].numel()) for t in targets]
    out = points.new_zeros((B, max(counts, default=0), P), dtype=dtype)
    for i in range(B):  # image by image: no concatenated copy of every full-resolution mask of the batch
        if counts[i]:
            masks = targets[i]["masks"].to(device=points.device, dtype=dtype)[:, None]  # (T_i, 1, H, W)
            grid = points[i].to(dtype).expand(counts[i], P, 2)
            out[i, : counts[i]] = point_sample(masks, grid)[:, 0]
    return out


def solve_assignments(costs: np.ndarray, counts: Sequence[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per image, the minimum-cost one-to-one assignment of ``costs[b, :, :counts[b]]`` (Q, T_b).

    Returns ``(query_index, target_index)`` int64 pairs sorted by query, ``min(Q, T_b)`` long each.
    Non-finite entries cost ``max + n * (max - min) + 1`` of the finite ones (n = pairs to assign):
    more than any difference between two assignments, so an assignment with fewer of them always wins.
    """
    from scipy.optimize import linear_sum_assignment

    out = []
    for b, n_targets in enumerate(counts):
        cost = np.asarray(costs[b, :, :n_targets], dtype=np.float64)
        finite = np.isfinite(cost)
        if not finite.all():
            cost = cost.copy()
            if finite.any():
                hi, lo = cost[finite].max(), cost[finite].min()
                cost[~finite] = hi + min(cost.shape) * (hi - lo) + 1.0
            else:
                cost[:] = 0.0
        rows, cols = linear_sum_assignment(cost)
        out.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)))
    return out


class HungarianMatcher:
    """Assign each target to one query (cost weights default to Mask2Former's: class 2, mask 5, dice 5).

    ``matcher(class_logits, mask_logits, targets)`` -> list of ``(query_index, target_index)`` per image;
    ``matcher.cost_matrices(...)`` gives the padded (B, Q, T_max) costs alone.
    """

    def __init__(
        self,
        *,
        cost_class: float = 2.0,
        cost_mask: float = 5.0,
        cost_dice: float = 5.0,
        num_points: int = 12544,
    ) -> None:
        if cost_class == 0 and cost_mask == 0 and cost_dice == 0:
            raise ValueError("at least one of cost_class, cost_mask, cost_dice must be nonzero")
        if num_points < 1:
            raise ValueError(f"num_points must be >= 1, got {num_points}")
        self.cost_class, self.cost_mask, self.cost_dice = float(cost_class), float(cost_mask), float(cost_dice)
        self.num_points = int(num_points)

    def __repr__(self) -> str:
        return (f"HungarianMatcher(cost_class={self.cost_class}, cost_mask={self.cost_mask}, "
                f"cost_dice={self.cost_dice}, num_points={self.num_points})")

    def draw_points(
        self, batch: int, *, device: torch.device, dtype: torch.dtype, uniform: UniformSource = default_uniform
    ) -> torch.Tensor:
        """Matching points (B, P, 2): one set per image, shared by its queries and targets."""
        return uniform((batch, self.num_points, 2), device=device, dtype=_cost_dtype(dtype))

    @torch.no_grad()
    def cost_matrices(
        self,
        class_logits: torch.Tensor,
        mask_logits: torch.Tensor,
        targets: Sequence[Target],
        points: torch.Tensor,
        *,
        sampled_targets: torch.Tensor | None = None,
        target_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """class_logits (B, Q, K+1), mask_logits (B, Q, h, w), points (B, P, 2) -> costs (B, Q, T_max)
        (columns past an image's target count are padding). ``sampled_targets`` (B, T_max, P) may be
        passed when the caller already sampled the targets at ``points``, ``target_labels`` (B, T_max)
        when it already padded and checked the labels (``padded_target_labels``, ``check_target_labels``)."""
        B, Q = class_logits.shape[:2]
        if class_logits.dim() != 3 or mask_logits.dim() != 4 or tuple(mask_logits.shape[:2]) != (B, Q):
            raise ValueError(f"expected class_logits (B, Q, K+1) and mask_logits (B, Q, h, w), got "
                             f"{tuple(class_logits.shape)} and {tuple(mask_logits.shape)}")
        if len(targets) != B:
            raise ValueError(f"expected {B} targets (one per image), got {len(targets)}")
        if points.dim() != 3 or points.shape[0] != B or points.shape[2] != 2:
            raise ValueError(f"expected points (B={B}, P, 2), got {tuple(points.shape)}")
        dtype = _cost_dtype(class_logits.dtype)
        with torch.autocast(class_logits.device.type, enabled=False):
            if target_labels is None:
                check_target_labels(targets, class_logits.shape[-1] - 1)
                target_labels, _ = padded_target_labels(targets, class_logits.device)
            labels = target_labels
            probs = class_logits.to(dtype).softmax(-1)  # (B, Q, K+1)
            cost_class = -probs.gather(2, labels[:, None, :].expand(B, Q, labels.shape[1]))  # (B, Q, T)
            x = point_sample(mask_logits.to(dtype), points.to(dtype))  # (B, Q, P)
            if sampled_targets is None:
                sampled_targets = sample_target_masks(targets, points, dtype=dtype)
            t = sampled_targets.to(dtype)  # (B, T, P)
            num_points = x.shape[-1]
            # BCE(x, t) summed over points = sum softplus(x) - x . t  (BCE(x,1) - BCE(x,0) = -x)
            t_columns = t.transpose(1, 2)  # (B, P, T)
            cost_mask = (F.softplus(x).sum(-1, keepdim=True) - torch.bmm(x, t_columns)) / num_points
            s = x.sigmoid()
            overlap = torch.bmm(s, t_columns)  # (B, Q, T)
            cost_dice = 1 - (2 * overlap + 1) / (s.sum(-1)[:, :, None] + t.sum(-1)[:, None, :] + 1)
            return self.cost_mask * cost_mask + self.cost_class * cost_class + self.cost_dice * cost_dice

    def __call__(
        self,
        class_logits: torch.Tensor,
        mask_logits: torch.Tensor,
        targets: Sequence[Target],
        *,
        points: torch.Tensor | None = None,
        uniform: UniformSource = default_uniform,
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Match one prediction set; points (B, P, 2) drawn from ``uniform`` unless given."""
        if points is None:
            points = self.draw_points(class_logits.shape[0], device=class_logits.device, dtype=class_logits.dtype,
                                      uniform=uniform)
        costs = self.cost_matrices(class_logits, mask_logits, targets, points)
        return solve_assignments(costs.cpu().numpy(), [int(t["labels"].numel()) for t in targets])
