"""Shared inputs of the criterion parity tests: random predictions and targets, and a uniform source
that replays recorded draws so that our criterion and transformers' losses see the same points."""

from __future__ import annotations

import torch

from maskformers.training.points import num_importance_points


def make_case(seed: int, *, batch=2, queries=7, classes=5, levels=3, low=(16, 20), high=(64, 80), counts=(3, 5)):
    """float64 model outputs (final + ``levels - 1`` auxiliary predictions) and targets with ``counts``
    masks per image."""
    g = torch.Generator().manual_seed(seed)
    preds = []
    for _ in range(levels):
        cls = torch.randn(batch, queries, classes + 1, generator=g, dtype=torch.float64) * 2
        masks = torch.randn(batch, queries, *low, generator=g, dtype=torch.float64) * 3
        preds.append((cls, masks))
    targets = []
    for n in counts:
        labels = torch.randint(0, classes, (n,), generator=g)
        masks = (torch.rand(n, *high, generator=g) < torch.rand(n, 1, 1, generator=g)).to(torch.float64)
        targets.append({"labels": labels, "masks": masks})
    outputs = {"class_logits": preds[-1][0], "mask_logits": preds[-1][1],
               "aux_outputs": [{"class_logits": c, "mask_logits": m} for c, m in preds[:-1]]}
    return outputs, targets


class Replay:
    """A uniform source that hands out pre-drawn tensors in order, checking their shapes."""

    def __init__(self, tensors):
        self.tensors = list(tensors)

    def __call__(self, *shape, device=None, dtype=None, **_):
        shape = tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else tuple(shape)
        assert self.tensors, f"no recorded draw left for shape {shape}"
        t = self.tensors.pop(0)
        assert tuple(t.shape) == shape, f"recorded draw {tuple(t.shape)} requested as {shape}"
        return t

    def done(self) -> bool:
        return not self.tensors


def recorded_draws(outputs, targets, *, num_points, oversample=3.0, importance=0.75, seed=1):
    """Our draws (matching points (L, B, P, 2), candidates, uniform points) and the same numbers in the
    order transformers' Mask2Former and OneFormer losses draw them (per prediction, final first: one
    matching draw per image, then the candidates and uniform points of its matched masks)."""
    g = torch.Generator().manual_seed(seed)
    levels = 1 + len(outputs["aux_outputs"])
    B, Q = outputs["class_logits"].shape[:2]
    per_level = sum(min(Q, len(t["labels"])) for t in targets)
    k, m = int(num_points * oversample), num_importance_points(num_points, importance)
    match = torch.rand(levels, B, num_points, 2, generator=g, dtype=torch.float64)
    cand = torch.rand(levels * per_level, k, 2, generator=g, dtype=torch.float64)
    rand = torch.rand(levels * per_level, num_points - m, 2, generator=g, dtype=torch.float64)
    ours = [match, cand, rand]
    theirs = []
    for lvl in range(levels):
        theirs += [match[lvl, b][None] for b in range(B)]
        rows = slice(lvl * per_level, (lvl + 1) * per_level)
        theirs += [cand[rows], rand[rows]]
    return ours, theirs
