"""Samples, per-task targets, the training dataset wrapper and batch collation.

Every reader returns *samples* in one format::

    {"image": (3, H, W) uint8, "masks": (N, H, W) bool, "labels": (N,) int64 contiguous class ids,
     "iscrowd": (N,) bool, "source": str (the file it came from)}

and describes its classes with ``id2label`` and ``thing_ids``. :func:`targets_for_task` turns a sample
into the criterion's target ``{"labels", "masks"}`` for one task, as the original dataset mappers do:

- panoptic: every non-crowd segment (things and stuff);
- instance: the non-crowd thing segments;
- semantic: one mask per class present (the union of its segments, crowd included).

Pixels no mask covers (void / ignore) are negatives for every mask, as in the original.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch

from ..processing.image_processor import IMAGENET_MEAN, IMAGENET_STD

__all__ = [
    "SampleError",
    "TASKS",
    "check_sample",
    "targets_for_task",
    "TrainingDataset",
    "collate",
    "semantic_map",
    "panoptic_map",
    "MODEL_INPUTS",
]

TASKS = ("panoptic", "instance", "semantic")
MODEL_INPUTS = ("task_inputs", "text_inputs")  # target entries that collate stacks and the loop gives the model
Sample = dict[str, Any]


class SampleError(ValueError):
    """A sample that cannot be used (unreadable image, annotation of another size, unknown class)."""


def check_sample(sample: Mapping[str, Any], num_classes: int) -> None:
    """Raise :class:`SampleError` naming ``sample["source"]`` unless the sample is consistent."""
    source = sample.get("source", "<unknown>")
    image, masks, labels = sample["image"], sample["masks"], sample["labels"]
    if image.dim() != 3 or image.shape[0] != 3:
        raise SampleError(f"{source}: expected image (3, H, W), got {tuple(image.shape)}")
    if masks.dim() != 3 or tuple(masks.shape[1:]) != tuple(image.shape[1:]):
        raise SampleError(f"{source}: annotation size {tuple(masks.shape[1:])} does not match the image size "
                          f"{tuple(image.shape[1:])}")
    if labels.shape != (masks.shape[0],) or sample["iscrowd"].shape != (masks.shape[0],):
        raise SampleError(f"{source}: {masks.shape[0]} masks but labels {tuple(labels.shape)} and iscrowd "
                          f"{tuple(sample['iscrowd'].shape)}")
    bad = labels[(labels < 0) | (labels >= num_classes)]
    if bad.numel():
        raise SampleError(f"{source}: unknown class id(s) {sorted(set(bad.tolist()))}; "
                          f"expected 0..{num_classes - 1}")


def targets_for_task(sample: Mapping[str, Any], task: str, thing_ids: Iterable[int]) -> dict[str, torch.Tensor]:
    """The criterion target ``{"labels": (N,), "masks": (N, H, W) bool}`` of ``sample`` for ``task``."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    labels, masks, crowd = sample["labels"], sample["masks"].bool(), sample["iscrowd"].bool()
    if task == "semantic":
        classes = labels.unique()  # sorted
        merged = torch.stack([masks[labels == c].any(0) for c in classes]) if len(classes) else masks[:0]
        keep = merged.flatten(1).any(1)
        return {"labels": classes[keep], "masks": merged[keep]}
    keep = ~crowd & masks.flatten(1).any(1)
    if task == "instance":
        things = torch.tensor(sorted(set(thing_ids)), dtype=labels.dtype)
        keep &= torch.isin(labels, things)
    return {"labels": labels[keep], "masks": masks[keep]}


def semantic_map(sample: Mapping[str, Any], ignore_index: int = 255) -> torch.Tensor:
    """(H, W) int64 class map of a sample (``ignore_index`` where no mask is); later masks win overlaps."""
    out = torch.full(sample["masks"].shape[1:], ignore_index, dtype=torch.int64)
    for label, mask in zip(sample["labels"].tolist(), sample["masks"]):
        out[mask.bool()] = label
    return out


def panoptic_map(sample: Mapping[str, Any]) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    """(H, W) int64 segment ids (0 = void) and ``[{"id", "category_id", "iscrowd"}]`` of a sample."""
    out = torch.zeros(sample["masks"].shape[1:], dtype=torch.int64)
    info = []
    for k, (label, crowd, mask) in enumerate(zip(sample["labels"].tolist(), sample["iscrowd"].tolist(),
                                                 sample["masks"])):
        out[mask.bool()] = k + 1
        info.append({"id": k + 1, "category_id": label, "iscrowd": bool(crowd)})
    return out, info


class TrainingDataset:
    """A reader + an augmentation + a task, giving ``(sample, target)`` pairs for :func:`collate`.

    on_error: "raise" (default) re-raises a :class:`SampleError` (it names the file); "skip" returns
    None for that index, which :func:`collate` drops and reports in ``batch["skipped"]``.
    transform: ``transform(sample, index)`` -> sample (see :mod:`maskformers.training.transforms`).
    """

    def __init__(
        self,
        reader: Sequence[Sample],
        *,
        task: str,
        transform: Callable[[Sample, int], Sample] | None = None,
        on_error: str = "raise",
        num_classes: int | None = None,
        thing_ids: Iterable[int] | None = None,
    ) -> None:
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        self.reader, self.task, self.transform, self.on_error = reader, task, transform, on_error
        self.id2label = dict(getattr(reader, "id2label", {}))
        self.num_classes = num_classes if num_classes is not None else len(self.id2label)
        if self.num_classes < 1:
            raise ValueError("the reader has no id2label; pass num_classes")
        self.thing_ids = frozenset(thing_ids if thing_ids is not None else getattr(reader, "thing_ids", ()))

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, index: int) -> tuple[Sample, dict[str, torch.Tensor]] | tuple[None, str]:
        try:
            sample = self.reader[index]
            check_sample(sample, self.num_classes)
            if self.transform is not None:
                sample = self.transform(sample, index)
        except SampleError as exc:
            if self.on_error == "raise":
                raise
            return None, str(exc)
        return sample, self.make_target(sample, index)

    def make_target(self, sample: Sample, index: int) -> dict[str, Any]:
        """The target of an augmented sample (subclasses add model inputs, e.g. OneFormer's prompts)."""
        return targets_for_task(sample, self.task, self.thing_ids)


def collate(
    items: Sequence[tuple[Sample | None, Any]],
    *,
    size_divisibility: int = 32,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> dict[str, Any]:
    """Normalise and pad a list of ``(sample, target)`` into a batch.

    Returns ``{"pixel_values": (B, 3, H, W) float32, "pixel_mask": (B, H, W) int64, "targets": [{"labels",
    "masks": (N, H, W) bool}], "samples": [...], "skipped": [reasons]}``; H, W are the largest image sides
    rounded up to ``size_divisibility``; images are padded with 0 after normalisation and target masks
    with False (as detectron2 pads). Skipped items (None) are left out. Targets with model inputs
    (OneFormer's, see :mod:`.oneformer_data`) add ``"task_inputs"`` (B, L) and ``"text_inputs"`` (B, T, L)
    (:data:`MODEL_INPUTS`) and ``"tasks"`` (one name per image).
    """
    kept = [(s, t) for s, t in items if s is not None]
    skipped = [t for s, t in items if s is None]
    if not kept:
        return {"pixel_values": torch.zeros(0, 3, 0, 0), "pixel_mask": torch.zeros(0, 0, 0, dtype=torch.int64),
                "targets": [], "samples": [], "skipped": skipped}
    d = max(int(size_divisibility), 1)
    H = math.ceil(max(s["image"].shape[1] for s, _ in kept) / d) * d
    W = math.ceil(max(s["image"].shape[2] for s, _ in kept) / d) * d
    mean_t = torch.tensor(mean, dtype=torch.float32)[:, None, None] * 255
    std_t = torch.tensor(std, dtype=torch.float32)[:, None, None] * 255
    pixel_values = torch.zeros(len(kept), 3, H, W)
    pixel_mask = torch.zeros(len(kept), H, W, dtype=torch.int64)
    targets = []
    for i, (sample, target) in enumerate(kept):
        h, w = sample["image"].shape[1:]
        pixel_values[i, :, :h, :w] = (sample["image"].float() - mean_t) / std_t
        pixel_mask[i, :h, :w] = 1
        masks = torch.zeros(target["masks"].shape[0], H, W, dtype=torch.bool)
        masks[:, :h, :w] = target["masks"]
        targets.append({"labels": target["labels"], "masks": masks})
    batch = {"pixel_values": pixel_values, "pixel_mask": pixel_mask, "targets": targets,
             "samples": [s for s, _ in kept], "skipped": skipped}
    for key in MODEL_INPUTS:
        present = [key in t for _, t in kept]
        if any(present) and not all(present):
            raise ValueError(f"{sum(present)} of {len(kept)} targets carry {key!r}: a batch mixes datasets")
        if all(present):
            batch[key] = torch.stack([t[key] for _, t in kept])
    if all("task" in t for _, t in kept):
        batch["tasks"] = [t["task"] for _, t in kept]
    return batch
