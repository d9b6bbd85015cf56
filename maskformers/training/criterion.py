"""The set-prediction loss of Mask2Former (and OneFormer): matching, then class, mask and dice losses.

For the final prediction and every auxiliary one, queries are matched to targets (a fresh Hungarian
matching per prediction) and

- ``loss_cross_entropy``: cross-entropy over K+1 classes for every query (unmatched ones -> "no
  object", whose weight is ``no_object_weight``), weighted mean over queries;
- ``loss_mask``: BCE of each matched mask on ``num_points`` importance-sampled points, averaged over
  points, summed over masks and divided by ``num_masks``;
- ``loss_dice``: ``1 - (2 sum(p t) + 1) / (sum(p) + sum(t) + 1)`` on the same points, likewise.

``num_masks`` is the number of target masks averaged over processes (all-reduced when
``torch.distributed`` is initialised), at least 1. Auxiliary terms get the suffix ``_{i}`` (oldest
prediction first), as in transformers. Extra terms (OneFormer's contrastive loss) plug in through
``extra_terms``: modules called as ``term(outputs, targets)`` that return a dict of named losses
(computed on the final prediction only).

All levels are matched in one pass and their mask losses sampled together: one draw of matching
points (L, B, P, 2), one of candidate points, one of uniform points (see :mod:`.points`).

Keyed points (``forward(..., image_keys=...)``): every image's points then come from generators seeded
by its key (the training loop passes a hash of the seed, the step and the dataset index), so the loss of
an image does not depend on which other images share its batch or process, nor on the global RNG. With
that, and with both normalisers (``num_masks`` and the cross-entropy's weight sum) taken over the whole
optimizer step (``step_target_counts``: all processes and micro-batches), N processes with gradient
accumulation compute the same gradients as one process with the same global batch. Without them, one
process computes the original's plain means.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .matcher import HungarianMatcher, Target, check_target_labels, padded_target_labels, solve_assignments
from .points import (
    UniformSource,
    default_uniform,
    num_importance_points,
    point_sample,
    select_uncertain_points,
)

__all__ = ["MaskFormerCriterion", "DEFAULT_LOSS_WEIGHTS", "weighted_total", "predictions_of"]

DEFAULT_LOSS_WEIGHTS: dict[str, float] = {"loss_cross_entropy": 2.0, "loss_mask": 5.0, "loss_dice": 5.0}
_SUFFIX = re.compile(r"_\d+$")


def predictions_of(outputs: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """[(class_logits, mask_logits)] of a model output (attributes or a dict), final first, then the
    auxiliary predictions oldest first."""
    def get(obj: Any, name: str) -> Any:
        return obj[name] if isinstance(obj, Mapping) else getattr(obj, name)

    preds = [(get(outputs, "class_logits"), get(outputs, "mask_logits"))]
    aux = (outputs.get("aux_outputs") if isinstance(outputs, Mapping) else getattr(outputs, "aux_outputs", None)) or []
    preds += [(get(a, "class_logits"), get(a, "mask_logits")) for a in aux]
    return preds


def weighted_total(losses: Mapping[str, torch.Tensor], weights: Mapping[str, float]) -> torch.Tensor:
    """Sum of ``weights[name] * loss`` where name is the key without its ``_{i}`` auxiliary suffix;
    keys with no weight are left out."""
    total = None
    for key, value in losses.items():
        w = weights.get(_SUFFIX.sub("", key))
        if w:
            total = value * w if total is None else total + value * w
    if total is None:
        raise ValueError(f"no loss in {sorted(losses)} has a weight in {dict(weights)}")
    return total


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _normalizers(counts: Sequence[int], num_queries: int, no_object_weight: float, device: torch.device,
                 reduce: bool) -> tuple[float, float]:
    """(num_masks, class-weight sum), each summed over ``counts`` (all-reduced when ``reduce``) and divided by
    the number of processes; num_masks is at least 1. Every image has ``num_queries`` queries, min(Q, T)
    of them matched (weight 1) and the rest "no object" (weight ``no_object_weight``)."""
    masks = float(sum(counts))
    weights = sum(num_queries * no_object_weight + min(num_queries, c) * (1 - no_object_weight) for c in counts)
    world = 1
    if _distributed():
        if reduce:
            totals = torch.tensor([masks, weights], dtype=torch.float64, device=device)
            torch.distributed.all_reduce(totals)
            masks, weights = totals.tolist()
        world = torch.distributed.get_world_size()
    return max(masks / world, 1.0), weights / world


def _keyed_uniform(keys: Sequence[int], row_shape: tuple[int, ...], *, device: torch.device,
                   dtype: torch.dtype) -> torch.Tensor:
    """One row of U[0, 1) numbers per key, each from its own seeded CPU generator -> (len(keys), *row_shape)."""
    rows = [torch.rand(row_shape, generator=torch.Generator().manual_seed(k), dtype=dtype) for k in keys]
    return (torch.stack(rows) if rows else torch.zeros((0, *row_shape), dtype=dtype)).to(device)


def _mix(*parts: int) -> int:
    """A 63-bit seed from integers (tuple hashing of ints is stable across runs and platforms)."""
    return hash(tuple(int(p) for p in parts)) & (2**63 - 1)


class MaskFormerCriterion(nn.Module):
    """Losses of a mask-classification model. ``forward(outputs, targets)`` returns the unweighted terms
    (``loss_cross_entropy``, ``loss_mask``, ``loss_dice``, their ``_{i}`` auxiliary copies, extra terms);
    :meth:`total` weighs and sums them.

    outputs: the model output (``class_logits`` (B, Q, K+1), ``mask_logits`` (B, Q, h, w), ``aux_outputs``);
    targets: per image ``{"labels": (N_i,), "masks": (N_i, H, W)}``, all masks of a batch at one size.
    uniform: source of U[0, 1) draws (tests inject recorded points).
    """

    def __init__(
        self,
        *,
        num_classes: int,
        matcher: HungarianMatcher | None = None,
        no_object_weight: float = 0.1,
        num_points: int = 12544,
        oversample_ratio: float = 3.0,
        importance_sample_ratio: float = 0.75,
        weights: Mapping[str, float] | None = None,
        extra_terms: Mapping[str, nn.Module] | None = None,
        use_aux: bool = True,
        uniform: UniformSource = default_uniform,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.matcher = matcher if matcher is not None else HungarianMatcher(num_points=num_points)
        self.no_object_weight = float(no_object_weight)
        class_weight = torch.ones(num_classes + 1)
        class_weight[-1] = no_object_weight
        self.register_buffer("class_weight", class_weight, persistent=False)
        self.num_points = int(num_points)
        self.oversample_ratio = float(oversample_ratio)
        self.importance_sample_ratio = float(importance_sample_ratio)
        self.weights = dict(DEFAULT_LOSS_WEIGHTS if weights is None else weights)
        self.extra_terms = nn.ModuleDict(dict(extra_terms or {}))
        self.use_aux = use_aux
        self.uniform = uniform

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, matcher={self.matcher!r}, no_object_weight={self.no_object_weight}, "
                f"num_points={self.num_points}, oversample_ratio={self.oversample_ratio}, "
                f"importance_sample_ratio={self.importance_sample_ratio}, weights={self.weights}")

    def total(self, losses: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return weighted_total(losses, self.weights)

    # ------------------------------------------------------------------ matching
    @torch.no_grad()
    def match(
        self,
        predictions: Sequence[tuple[torch.Tensor, torch.Tensor]],
        targets: Sequence[Target],
        image_keys: Sequence[int] | None = None,
        target_labels: torch.Tensor | None = None,
    ) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
        """Matches of every prediction: ``[level][image] = (query_index, target_index)``, on the CPU.
        ``target_labels``: the padded labels (B, T_max) when the caller already checked them."""
        class_logits, mask_logits = predictions[0]
        if target_labels is None:
            check_target_labels(targets, class_logits.shape[-1] - 1)
            target_labels, _ = padded_target_labels(targets, class_logits.device)
        L, B, device = len(predictions), class_logits.shape[0], class_logits.device
        dtype = torch.float64 if class_logits.dtype == torch.float64 else torch.float32
        P = self.matcher.num_points
        if image_keys is None:
            points = self.uniform((L, B, P, 2), device=device, dtype=dtype)  # per level and image
        else:
            keys = [_mix(image_keys[b], 0, level) for level in range(L) for b in range(B)]
            points = _keyed_uniform(keys, (P, 2), device=device, dtype=dtype).view(L, B, P, 2)
        counts = [int(t["labels"].numel()) for t in targets]
        T = max(counts, default=0)
        sampled = points.new_zeros((L, B, T, P))
        if T:
            masks, owner, slot = _concat_targets(targets, device, dtype)
            per_target = points[:, owner].transpose(0, 1).reshape(len(owner), L * P, 2)  # (T_all, L*P, 2)
            values = point_sample(masks[:, None], per_target)[:, 0].view(len(owner), L, P)
            sampled[:, owner, slot] = values.transpose(0, 1)
        costs = torch.stack([
            self.matcher.cost_matrices(c, m, targets, points[i], sampled_targets=sampled[i],
                                       target_labels=target_labels)
            for i, (c, m) in enumerate(predictions)
        ]).cpu().numpy()  # (L, B, Q, T): one device-to-host copy for the whole batch
        return [solve_assignments(costs[i], counts) for i in range(L)]

    # ------------------------------------------------------------------ losses
    def _class_loss(self, class_logits: torch.Tensor, matched: _Matched, labels: torch.Tensor,
                    weight_sum: float | None) -> torch.Tensor:
        B, Q, _ = class_logits.shape
        target = torch.full((B, Q), self.num_classes, dtype=torch.int64, device=class_logits.device)
        target[matched.image, matched.query] = labels[matched.image, matched.target]
        logits = class_logits if class_logits.dtype == torch.float64 else class_logits.float()
        weight = self.class_weight.to(logits.dtype)
        if weight_sum is None:
            return F.cross_entropy(logits.transpose(1, 2), target, weight=weight)
        # weighted mean over the queries of the whole step (all processes and micro-batches)
        return F.cross_entropy(logits.transpose(1, 2), target, weight=weight, reduction="sum") / weight_sum

    def forward(
        self,
        outputs: Any,
        targets: Sequence[Target],
        *,
        image_keys: Sequence[int] | None = None,
        step_target_counts: Sequence[int] | None = None,
    ) -> dict[str, torch.Tensor]:
        """The unweighted loss terms.

        image_keys: one int per image; switches to keyed points (see the module doc).
        step_target_counts: the target count of every image of the optimizer step, over all micro-batches
        and processes. The losses are then normalised by the step's totals (divided by the number of
        processes), so summing the micro-batches' losses and averaging over processes gives exactly the
        loss of the whole global batch. Without it: this batch's counts, all-reduced under torch.distributed.
        Extra terms (means over this batch) are then weighted by the batch's share of the step's images, times
        the number of processes (whose gradients DDP averages), so that the micro-batches add up to one mean.
        """
        predictions = predictions_of(outputs)
        if not self.use_aux:
            predictions = predictions[:1]
        class_logits = predictions[0][0]
        device = class_logits.device
        if len(targets) != class_logits.shape[0]:
            raise ValueError(f"expected {class_logits.shape[0]} targets (one per image), got {len(targets)}")
        for i, t in enumerate(targets):
            if t["masks"].dim() != 3 or t["masks"].shape[0] != t["labels"].numel():
                raise ValueError(f"targets[{i}]: expected masks (N, H, W) for N={t['labels'].numel()} labels, "
                                 f"got {tuple(t['masks'].shape)}")
        counts = [int(t["labels"].numel()) for t in targets]
        if step_target_counts is None and not _distributed():
            num_masks, weight_sum = max(float(sum(counts)), 1.0), None  # the original's plain means
        else:
            num_masks, weight_sum = _normalizers(
                counts if step_target_counts is None else step_target_counts, class_logits.shape[1],
                self.no_object_weight, device, reduce=step_target_counts is None)
        if image_keys is not None and len(image_keys) != len(targets):
            raise ValueError(f"expected one image key per image ({len(targets)}), got {len(image_keys)}")
        check_target_labels(targets, self.num_classes)
        labels, _ = padded_target_labels(targets, device)
        all_matches = self.match(predictions, targets, image_keys, target_labels=labels)
        matched = _matched_on_device(all_matches, counts, device)

        names = [""] + [f"_{i}" for i in range(len(predictions) - 1)]
        losses: dict[str, torch.Tensor] = {}
        for name, (cls, _), level in zip(names, predictions, matched):
            losses["loss_cross_entropy" + name] = self._class_loss(cls, level, labels, weight_sum)

        bce, dice = self._mask_losses(predictions, all_matches, matched, targets, image_keys)
        for name, b, d in zip(names, bce, dice):
            losses["loss_mask" + name] = b / num_masks
            losses["loss_dice" + name] = d / num_masks
        share = 1.0
        if step_target_counts is not None and len(step_target_counts):  # extra terms are means over their batch
            world = torch.distributed.get_world_size() if _distributed() else 1
            share = len(targets) * world / len(step_target_counts)
        for term in self.extra_terms.values():
            extra = term(outputs, targets)
            losses.update(extra if share == 1.0 else {k: v * share for k, v in extra.items()})
        return losses

    def _mask_losses(
        self,
        predictions: Sequence[tuple[torch.Tensor, torch.Tensor]],
        all_matches: Sequence[Sequence[tuple[torch.Tensor, torch.Tensor]]],
        matched: Sequence[_Matched],
        targets: Sequence[Target],
        image_keys: Sequence[int] | None = None,
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Summed BCE and dice of the matched masks, per prediction level."""
        mask_logits = predictions[0][1]
        device = mask_logits.device
        dtype = torch.float64 if mask_logits.dtype == torch.float64 else torch.float32
        row_keys = []
        if image_keys is not None:
            for level, matches in enumerate(all_matches):
                row_keys += [_mix(image_keys[i], level, j) for i, (q, _) in enumerate(matches) for j in range(len(q))]
        sizes = [len(level.query) for level in matched]
        zero = mask_logits.sum() * 0.0  # keeps the graph when there is nothing to match
        if sum(sizes) == 0:
            return [zero.to(dtype)] * len(predictions), [zero.to(dtype)] * len(predictions)
        pred_rows = [logits[level.image, level.query] for (_, logits), level in zip(predictions, matched)]
        src = torch.cat(pred_rows).to(dtype)[:, None]  # (N, 1, h, w)
        num_candidates = int(self.num_points * self.oversample_ratio)
        num_uncertain = num_importance_points(self.num_points, self.importance_sample_ratio)
        if not 0 <= num_uncertain <= min(self.num_points, num_candidates):
            raise ValueError(f"importance_sample_ratio={self.importance_sample_ratio} and oversample_ratio="
                             f"{self.oversample_ratio} give {num_uncertain} uncertain points of {num_candidates} "
                             f"candidates for num_points={self.num_points}")
        shapes = [(num_candidates, 2), (self.num_points - num_uncertain, 2)]
        if image_keys is None:
            candidates, extra = (self.uniform((len(src), *shape), device=device, dtype=dtype) for shape in shapes)
        else:
            candidates, extra = (_keyed_uniform([_mix(k, 1 + i) for k in row_keys], shape, device=device, dtype=dtype)
                                 for i, shape in enumerate(shapes))
        points = torch.cat([select_uncertain_points(src.detach(), candidates, num_uncertain), extra], dim=1)
        with torch.no_grad():
            masks, _, _ = _concat_targets(targets, device, dtype)
            point_labels = _sample_rows(masks, matched[0].rows, points)  # (N, P)
        point_logits = point_sample(src, points)[:, 0]  # (N, P)
        bce = F.binary_cross_entropy_with_logits(point_logits, point_labels, reduction="none").mean(1)
        probs = point_logits.sigmoid()
        dice = 1 - (2 * (probs * point_labels).sum(-1) + 1) / (probs.sum(-1) + point_labels.sum(-1) + 1)
        return [x.sum() for x in bce.split(sizes)], [x.sum() for x in dice.split(sizes)]


class _RowPlan(NamedTuple):
    """How the matched rows of all levels read the concatenated target masks (see ``_sample_rows``):
    unique (U,) target rows used; inverse (N,) and rank (N,): each matched row's place in the (U, width)
    grid of points; width: the most rows that use one target."""

    unique: torch.Tensor
    inverse: torch.Tensor
    rank: torch.Tensor
    width: int


class _Matched(NamedTuple):
    """One level's matches as device indices: image, query and target (within its image) per matched pair,
    in image order; ``rows`` (only on the first level) plans the target sampling of every level."""

    image: torch.Tensor
    query: torch.Tensor
    target: torch.Tensor
    rows: _RowPlan | None


def _matched_on_device(
    all_matches: Sequence[Sequence[tuple[torch.Tensor, torch.Tensor]]], counts: Sequence[int], device: torch.device
) -> list[_Matched]:
    """The solver's host indices of every level (and the target-row plan) moved to ``device`` in one copy.

    Everything here is decided on the host, where the assignments already are; a copy per image, or the
    ``unique`` / ``bincount`` of the rows on a GPU, would each make the host wait for the device."""
    columns = []  # per level: image, query, target of every matched pair (CPU tensors)
    for matches in all_matches:
        columns.append(torch.cat([torch.full((len(q),), i, dtype=torch.int64) for i, (q, _) in enumerate(matches)]))
        columns.append(torch.cat([q.to(torch.int64) for q, _ in matches]))
        columns.append(torch.cat([t.to(torch.int64) for _, t in matches]))
    host = torch.cat(columns).numpy()  # one view of all of them as numpy
    sizes = [len(c) for c in columns]
    splits = np.split(host, np.cumsum(sizes)[:-1])
    parts = [tuple(splits[i : i + 3]) for i in range(0, len(splits), 3)]
    offsets = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
    rows = np.concatenate([offsets[image] + target for image, _, target in parts])
    unique, inverse = np.unique(rows, return_inverse=True)
    uses = np.bincount(inverse, minlength=len(unique))
    order = np.argsort(inverse, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(len(rows)) - (np.cumsum(uses) - uses)[inverse[order]]
    flat = [a for part in parts for a in part] + [unique, inverse.reshape(-1), rank]
    packed = torch.from_numpy(np.concatenate(flat).astype(np.int64)).to(device, non_blocking=True)
    pieces = iter(packed.split([len(a) for a in flat]))
    levels = [(next(pieces), next(pieces), next(pieces)) for _ in parts]
    plan = _RowPlan(next(pieces), next(pieces), next(pieces), int(uses.max(initial=0)))
    return [_Matched(*level, plan if i == 0 else None) for i, level in enumerate(levels)]


def _concat_targets(
    targets: Sequence[Target], device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """All target masks (T_all, H, W) in ``dtype``, with each one's image and index within its image."""
    masks = torch.cat([t["masks"].to(device) for t in targets]).to(dtype)
    owner = torch.cat([torch.full((int(t["labels"].numel()),), i, device=device) for i, t in enumerate(targets)])
    slot = torch.cat([torch.arange(int(t["labels"].numel()), device=device) for t in targets])
    return masks, owner, slot


def _sample_rows(masks: torch.Tensor, plan: _RowPlan, points: torch.Tensor) -> torch.Tensor:
    """masks[rows[n]] sampled at points[n] -> (N, P), without copying a full mask per row: each target
    is sampled once at the points of every row that uses it (``plan``, made on the host)."""
    P = points.shape[1]
    grid = points.new_zeros((len(plan.unique), plan.width, P, 2))
    grid[plan.inverse, plan.rank] = points
    values = point_sample(masks[plan.unique][:, None], grid.view(len(plan.unique), plan.width * P, 2))[:, 0]
    return values.view(len(plan.unique), plan.width, P)[plan.inverse, plan.rank]
