"""Semantic segmentation metrics from a confusion matrix: mIoU, frequency-weighted IoU, pixel accuracy.

IoU of class c is ``TP / (TP + FP + FN)`` over all images; mIoU averages the classes whose union is
non-empty (a class predicted but absent from the ground truth counts with IoU 0), as detectron2's
SemSegEvaluator (used by Mask2Former) and mmsegmentation do. Ground-truth pixels equal to
``ignore_index`` are left out. Results in percent.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["SemanticIoU"]


class SemanticIoU:
    def __init__(self, *, num_classes: int, ignore_index: int = 255) -> None:
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)  # [gt, pred]

    def update(self, pred: torch.Tensor, gt: torch.Tensor) -> None:
        """pred, gt: (H, W) class ids; gt may hold ``ignore_index``."""
        if pred.shape != gt.shape:
            raise ValueError(f"prediction {tuple(pred.shape)} and ground truth {tuple(gt.shape)} differ in size")
        pred, gt = pred.flatten().to(torch.int64).cpu(), gt.flatten().to(torch.int64).cpu()
        valid = gt != self.ignore_index
        pred, gt = pred[valid], gt[valid]
        for name, x in (("prediction", pred), ("ground truth", gt)):
            if x.numel() and (int(x.min()) < 0 or int(x.max()) >= self.num_classes):
                raise ValueError(f"{name} has class ids outside 0..{self.num_classes - 1} (and not ignore_index="
                                 f"{self.ignore_index}): {sorted(set(x.unique().tolist()))[:10]}")
        self.confusion += torch.bincount(gt * self.num_classes + pred,
                                         minlength=self.num_classes**2).view(self.num_classes, self.num_classes)

    def compute(self) -> dict[str, Any]:
        """mIoU, fwIoU, pACC, mACC (percent; None without a pixel to measure), "per_class": {class id:
        {"IoU", "ACC"}} for the classes in the ground truth or the predictions (ACC None for a class only
        predicted), and "confusion": the (num_classes, num_classes) int64 counts, rows ground truth."""
        cm = self.confusion.double()
        tp = cm.diagonal()
        gt_total, pred_total = cm.sum(1), cm.sum(0)
        union = gt_total + pred_total - tp
        valid = union > 0
        iou = torch.where(valid, tp / union.clamp(min=1), torch.zeros_like(tp))
        acc = tp / gt_total.clamp(min=1)
        total = cm.sum()
        measured = bool(total > 0)
        return {
            "mIoU": float(iou[valid].mean() * 100) if valid.any() else None,
            "fwIoU": float((gt_total / total * iou).sum() * 100) if measured else None,
            "pACC": float(tp.sum() / total * 100) if measured else None,
            "mACC": float(acc[gt_total > 0].mean() * 100) if (gt_total > 0).any() else None,
            "per_class": {c: {"IoU": float(iou[c] * 100), "ACC": float(acc[c] * 100) if gt_total[c] > 0 else None}
                          for c in range(self.num_classes) if valid[c]},
            "confusion": self.confusion.clone(),
        }
