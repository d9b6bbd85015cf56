"""COCO mask AP through pycocotools' COCOeval (iouType "segm"): the standard AP, AP50, AP75, APs/m/l.

Ground truth and predictions are given per image as binary masks; they are RLE-encoded and evaluated
in memory. pycocotools is an optional dependency (``pip install "maskformers[train]"`` or ``pip install
pycocotools``), imported when used. A number COCOeval cannot measure (APs when no object is small, any AP
without ground truth) is None, not COCOeval's -1.
"""

from __future__ import annotations

import contextlib
import io
import math
import warnings
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

__all__ = ["MaskAP"]


def _encode(masks: torch.Tensor) -> list[dict[str, Any]]:
    from pycocotools import mask as mask_utils

    array = np.asfortranarray(masks.to(torch.uint8).cpu().numpy().transpose(1, 2, 0))  # (H, W, N)
    rles = mask_utils.encode(array)
    for r in rles:
        r["counts"] = r["counts"].decode("ascii")
    return rles


class MaskAP:
    """Collects instance predictions and ground truth; :meth:`compute` runs COCOeval."""

    def __init__(self, *, class_ids: Iterable[int]) -> None:
        try:
            import pycocotools  # noqa: F401
        except ImportError as exc:
            from ..training.readers_coco import PYCOCOTOOLS_HINT

            raise ImportError(f"COCO mask AP needs pycocotools: {PYCOCOTOOLS_HINT}") from exc
        self.class_ids = sorted(int(c) for c in class_ids)
        self.images: list[dict[str, Any]] = []
        self.gt: list[dict[str, Any]] = []
        self.dt: list[dict[str, Any]] = []

    def update(self, pred_masks: torch.Tensor, pred_labels: torch.Tensor, pred_scores: torch.Tensor,
               gt_masks: torch.Tensor, gt_labels: torch.Tensor, gt_iscrowd: torch.Tensor | None = None) -> None:
        """One image: predicted (N, H, W) bool masks with labels and scores; ground truth (M, H, W)."""
        from pycocotools import mask as mask_utils

        H, W = gt_masks.shape[-2:]
        if pred_masks.shape[0] and tuple(pred_masks.shape[-2:]) != (H, W):
            raise ValueError(f"prediction masks {tuple(pred_masks.shape)} and ground truth {tuple(gt_masks.shape)} "
                             f"differ in size")
        image_id = len(self.images) + 1
        self.images.append({"id": image_id, "height": int(H), "width": int(W)})
        crowd = gt_iscrowd if gt_iscrowd is not None else torch.zeros(len(gt_labels), dtype=torch.bool)
        for rle, label, c in zip(_encode(gt_masks) if len(gt_labels) else [], gt_labels.tolist(), crowd.tolist()):
            self.gt.append({"id": len(self.gt) + 1, "image_id": image_id, "category_id": int(label),
                            "segmentation": rle, "area": float(mask_utils.area(rle)), "iscrowd": int(c),
                            "bbox": list(mask_utils.toBbox(rle))})
        for rle, label, score in zip(_encode(pred_masks) if len(pred_labels) else [], pred_labels.tolist(),
                                     pred_scores.tolist()):
            self.dt.append({"image_id": image_id, "category_id": int(label), "segmentation": rle,
                            "score": float(score)})

    def compute(self) -> dict[str, Any]:
        """AP, AP50, AP75, APs, APm, APl in percent (None where COCOeval has nothing to measure) and
        "per_class": {class id: {"AP": AP or None}} over the classes of ``class_ids``."""
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        names = ["AP", "AP50", "AP75", "APs", "APm", "APl"]
        if not self.gt:
            return {**{n: None for n in names}, "per_class": {c: {"AP": None} for c in self.class_ids}}
        if not self.dt:
            areas = [a["area"] for a in self.gt if not a["iscrowd"]]
            present = {a["category_id"] for a in self.gt if not a["iscrowd"]}
            ranges = {"AP": (0, math.inf), "AP50": (0, math.inf), "AP75": (0, math.inf),  # COCOeval's areas
                      "APs": (0, 32**2), "APm": (32**2, 96**2), "APl": (96**2, math.inf)}
            out = {n: 0.0 if any(lo <= a < hi for a in areas) else None for n, (lo, hi) in ranges.items()}
            return {**out, "per_class": {c: {"AP": 0.0 if c in present else None} for c in self.class_ids}}
        coco_gt = COCO()
        coco_gt.dataset = {"images": self.images, "annotations": self.gt,
                           "categories": [{"id": c} for c in self.class_ids]}
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            coco_gt.createIndex()
            coco_dt = coco_gt.loadRes(self.dt)
            evaluator = COCOeval(coco_gt, coco_dt, iouType="segm")
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        out: dict[str, Any] = {n: float(v * 100) if v >= 0 else None for n, v in zip(names, evaluator.stats[:6])}
        precision = evaluator.eval["precision"]  # (IoU thresholds, recall points, classes, areas, max dets)
        per_class = {}
        for k, c in enumerate(evaluator.params.catIds):
            p = precision[:, :, k, 0, -1]  # area "all", 100 detections
            per_class[int(c)] = {"AP": float(p[p > -1].mean() * 100) if (p > -1).any() else None}
        out["per_class"] = per_class
        return out
