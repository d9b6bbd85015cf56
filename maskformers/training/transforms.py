"""Training augmentations on samples, with torchvision.transforms.v2 moving masks with the image.

- :func:`lsj_augmentation` (instance / panoptic, the Mask2Former COCO recipe): large-scale jitter (resize
  so the image fits ``size * s``, s in [0.1, 2.0]), a ``size`` x ``size`` crop (padded where the image
  is smaller), horizontal flip.
- :func:`semantic_augmentation` (the ADE20K recipe): shortest side resized to a random choice among
  ``min_sizes`` (longest side at most ``max_size``), a crop of ``crop_size``, horizontal flip.

Masks travel as one ``tv_tensors.Mask`` stack (nearest-neighbour resize), plus one extra all-ones
channel that marks the real image inside padded crops; segments that leave the crop are dropped.
Randomness is seeded from ``(seed, epoch, index)`` inside a forked RNG, so a sample's augmentation
does not depend on worker order and a resumed run sees the same augmentations.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["Augmentation", "lsj_augmentation", "semantic_augmentation"]

_MEAN_FILL = (124, 116, 104)  # ImageNet mean in 0..255: padded pixels normalise to about 0


class Augmentation:
    """Apply a torchvision v2 transform to a sample's image and masks together.

    ``augmentation(sample, index)`` -> sample; call :meth:`set_epoch` at the start of every epoch.
    """

    def __init__(self, transform: Any, *, seed: int = 0) -> None:
        self.transform = transform
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __repr__(self) -> str:
        return f"Augmentation(seed={self.seed}, transform={self.transform!r})"

    def __call__(self, sample: dict[str, Any], index: int) -> dict[str, Any]:
        from torchvision import tv_tensors

        masks = sample["masks"]
        stack = torch.cat([masks.to(torch.uint8), torch.ones_like(masks[:1], dtype=torch.uint8)
                           if masks.shape[0] else torch.ones(1, *sample["image"].shape[1:], dtype=torch.uint8)])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((self.seed * 1_000_003 + self.epoch) * 1_000_033 + int(index))
            image, stack = self.transform(tv_tensors.Image(sample["image"]), tv_tensors.Mask(stack))
        image, stack = image.as_subclass(torch.Tensor), stack.as_subclass(torch.Tensor).bool()
        masks = stack[:-1]
        keep = masks.flatten(1).any(1)
        return {**sample, "image": image, "masks": masks[keep], "labels": sample["labels"][keep],
                "iscrowd": sample["iscrowd"][keep], "valid": stack[-1]}


def _fill() -> dict[Any, Any]:
    from torchvision import tv_tensors

    return {tv_tensors.Image: _MEAN_FILL, tv_tensors.Mask: 0}


def lsj_augmentation(
    size: int | Sequence[int] = 1024, *, scale_range: tuple[float, float] = (0.1, 2.0), flip: bool = True,
    seed: int = 0,
) -> Augmentation:
    """Large-scale jitter + fixed-size crop + flip (instance and panoptic training)."""
    from torchvision.transforms import v2

    hw = (size, size) if isinstance(size, int) else tuple(size)
    steps = [v2.ScaleJitter(target_size=hw, scale_range=scale_range, antialias=True),
             v2.RandomCrop(hw, pad_if_needed=True, fill=_fill())]
    if flip:
        steps.append(v2.RandomHorizontalFlip())
    return Augmentation(v2.Compose(steps), seed=seed)


def semantic_augmentation(
    crop_size: int | Sequence[int] = 512,
    *,
    min_sizes: Sequence[int] = tuple(int(512 * x / 10) for x in range(5, 21)),
    max_size: int = 2048,
    flip: bool = True,
    seed: int = 0,
) -> Augmentation:
    """Random shortest-side resize + crop + flip (semantic training; the ADE20K-512 defaults)."""
    from torchvision.transforms import v2

    hw = (crop_size, crop_size) if isinstance(crop_size, int) else tuple(crop_size)
    steps = [v2.RandomShortestSize(min_size=list(min_sizes), max_size=max_size, antialias=True),
             v2.RandomCrop(hw, pad_if_needed=True, fill=_fill())]
    if flip:
        steps.append(v2.RandomHorizontalFlip())
    return Augmentation(v2.Compose(steps), seed=seed)
