"""Panoptic quality (PQ = SQ x RQ) with panopticapi's definitions, on segment-id maps.

Per image, a predicted and a ground-truth segment of the same class match when their IoU exceeds 0.5,
where the union leaves out the predicted pixels that fall on ground-truth void (id 0). Unmatched
non-crowd ground-truth segments are false negatives; an unmatched prediction is a false positive unless
more than half of it lies on void or on a crowd region of its class. Per class
``PQ = sum(IoU of matches) / (TP + FP/2 + FN/2)``, ``SQ = sum(IoU) / TP``, ``RQ = TP / (TP + FP/2 + FN/2)``;
the reported numbers average the classes that occur (TP + FP + FN > 0), over all, things and stuff,
in percent; a group without such a class has no number (None), not 0.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

__all__ = ["PanopticQuality"]


class PanopticQuality:
    """Accumulates PQ statistics over images; :meth:`compute` gives the averages (percent)."""

    def __init__(self, *, num_classes: int, thing_ids: Iterable[int]) -> None:
        self.num_classes = num_classes
        self.thing_ids = frozenset(int(c) for c in thing_ids)
        self.tp = torch.zeros(num_classes, dtype=torch.int64)
        self.fp = torch.zeros(num_classes, dtype=torch.int64)
        self.fn = torch.zeros(num_classes, dtype=torch.int64)
        self.iou = torch.zeros(num_classes, dtype=torch.float64)

    def update(
        self,
        pred: torch.Tensor,
        pred_segments: Sequence[Mapping[str, Any]],
        gt: torch.Tensor,
        gt_segments: Sequence[Mapping[str, Any]],
    ) -> None:
        """pred, gt: (H, W) integer segment ids, 0 = void / unassigned; segments: ``{"id", "category_id"}``
        (``"label_id"`` is accepted for predictions, ``"iscrowd"`` for ground truth)."""
        if pred.shape != gt.shape:
            raise ValueError(f"prediction {tuple(pred.shape)} and ground truth {tuple(gt.shape)} differ in size")
        pred_cat = {int(s["id"]): int(s.get("category_id", s.get("label_id"))) for s in pred_segments}
        gt_cat = {int(s["id"]): int(s["category_id"]) for s in gt_segments}
        crowd_of = {gt_cat[int(s["id"])]: int(s["id"]) for s in gt_segments if s.get("iscrowd")}
        for name, cats in (("prediction", pred_cat), ("ground truth", gt_cat)):
            bad = [c for c in cats.values() if not 0 <= c < self.num_classes]
            if bad or 0 in cats:
                raise ValueError(f"{name} segments: ids must be > 0 and classes in 0..{self.num_classes - 1}, "
                                 f"got ids {sorted(cats)} and classes {sorted(set(cats.values()))}")
        pred, gt = pred.to(torch.int64).flatten(), gt.to(torch.int64).flatten()
        unknown = set(pred.unique().tolist()) - set(pred_cat) - {0}
        if unknown:
            raise ValueError(f"prediction map has segment ids {sorted(unknown)} missing from pred_segments")
        gt = torch.where(torch.isin(gt, torch.tensor(sorted(gt_cat), dtype=torch.int64)), gt, 0)  # unlisted = void
        pred_ids, pred_area = pred.unique(return_counts=True)
        gt_ids, gt_area = gt.unique(return_counts=True)
        pred_area = dict(zip(pred_ids.tolist(), pred_area.tolist()))
        gt_area = dict(zip(gt_ids.tolist(), gt_area.tolist()))
        base = max(int(pred.max()), 0) + 1
        pairs, counts = (gt * base + pred).unique(return_counts=True)
        overlap = {(int(p) // base, int(p) % base): int(c) for p, c in zip(pairs.tolist(), counts.tolist())}

        matched_gt, matched_pred = set(), set()
        for (g, p), inter in overlap.items():
            if g == 0 or p == 0 or g not in gt_cat or gt_cat[g] != pred_cat[p]:
                continue
            if any(s.get("iscrowd") and int(s["id"]) == g for s in gt_segments):
                continue
            union = pred_area[p] + gt_area[g] - inter - overlap.get((0, p), 0)
            iou = inter / union
            if iou > 0.5:
                self.tp[gt_cat[g]] += 1
                self.iou[gt_cat[g]] += iou
                matched_gt.add(g)
                matched_pred.add(p)
        for s in gt_segments:
            g = int(s["id"])
            if g not in matched_gt and not s.get("iscrowd") and gt_area.get(g, 0) > 0:
                self.fn[gt_cat[g]] += 1
        for p, cat in pred_cat.items():
            if p in matched_pred or pred_area.get(p, 0) == 0:
                continue
            ignored = overlap.get((0, p), 0) + overlap.get((crowd_of.get(cat, -1), p), 0)
            if ignored / pred_area[p] > 0.5:
                continue
            self.fp[cat] += 1

    def compute(self) -> dict[str, Any]:
        """PQ, SQ, RQ (percent) over all / thing / stuff classes (None for a group without a class that
        occurs, e.g. PQ_th of a dataset without things), class counts "n", "n_th", "n_st", and "per_class":
        {class id: {"PQ", "SQ", "RQ", "TP", "FP", "FN"}} for the classes that occur."""
        tp, fp, fn = self.tp.double(), self.fp.double(), self.fn.double()
        present = (tp + fp + fn) > 0
        denom = (tp + 0.5 * fp + 0.5 * fn).clamp(min=1e-12)
        pq, rq = self.iou / denom, tp / denom
        sq = torch.where(tp > 0, self.iou / tp.clamp(min=1), torch.zeros_like(tp))
        is_thing = torch.tensor([c in self.thing_ids for c in range(self.num_classes)])
        out: dict[str, Any] = {}
        for suffix, select in (("", present), ("_th", present & is_thing), ("_st", present & ~is_thing)):
            n = int(select.sum())
            for name, values in (("PQ", pq), ("SQ", sq), ("RQ", rq)):
                out[name + suffix] = float(values[select].mean() * 100) if n else None
            out["n" + suffix] = n
        out["per_class"] = {c: {"PQ": float(pq[c] * 100), "SQ": float(sq[c] * 100), "RQ": float(rq[c] * 100),
                                "TP": int(self.tp[c]), "FP": int(self.fp[c]), "FN": int(self.fn[c])}
                            for c in range(self.num_classes) if present[c]}
        return out
