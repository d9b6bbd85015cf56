"""Semantic segmentation readers: image + label-PNG folders, and Hugging Face ``datasets`` datasets.

Label maps hold class ids per pixel; ``ignore_index`` marks pixels without a class. ADE20K-style
``reduce_labels`` turns 0 ("other") into ``ignore_index`` and shifts every other id down by one (ADE20K's
150 classes are stored as 1..150). Each class present becomes one segment (a "stuff" segment: semantic
data has no instances). Class ids outside ``0..num_classes-1`` raise :class:`SampleError` naming the file.

``HFSegmentationDataset`` wraps a ``datasets.Dataset`` (or any sequence of dicts) with an image column
and an annotation column, as in transformers' fine-tuning tutorials: a label map ("semantic"), or an
RGB map whose R channel is the class and G channel the instance id ("instance", transformers'
instance-segmentation example). ``datasets`` is imported only by :func:`load_hf_dataset`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .data import SampleError
from .readers_coco import read_image

__all__ = ["SemanticFolder", "HFSegmentationDataset", "load_hf_dataset", "label_map_to_sample"]

_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def _label_array(label: Any, source: str) -> np.ndarray:
    """(H, W) or (H, W, C) integer array of a label PNG path, PIL image or array."""
    import PIL.Image

    try:
        if isinstance(label, (str, os.PathLike)):
            with PIL.Image.open(label) as im:
                im.load()
                return np.asarray(im)
        if isinstance(label, PIL.Image.Image):
            return np.asarray(label)
        return np.asarray(label)
    except (OSError, SyntaxError, ValueError) as exc:
        raise SampleError(f"{source}: unreadable label map ({exc})") from exc


def label_map_to_sample(image: torch.Tensor, label: np.ndarray, *, num_classes: int, ignore_index: int = 255,
                        reduce_labels: bool = False, source: str = "<unknown>") -> dict[str, Any]:
    """A sample from an image (3, H, W) uint8 and a class map (H, W): one segment per class present."""
    if label.ndim == 3:  # a palette or grey PNG saved as RGB: every channel must agree
        label = label[..., 0]
    if label.shape != tuple(image.shape[1:]):
        raise SampleError(f"{source}: annotation size {label.shape} does not match the image size "
                          f"{tuple(image.shape[1:])}")
    classes = torch.from_numpy(label.astype(np.int64))
    if reduce_labels:
        classes = torch.where(classes == 0, ignore_index, classes - 1)
        classes = torch.where(classes == ignore_index - 1, ignore_index, classes)  # 255 stays ignore
    present = [int(c) for c in classes.unique().tolist() if c != ignore_index]
    bad = [c for c in present if not 0 <= c < num_classes]
    if bad:
        hint = ""
        if not reduce_labels and bad == [num_classes]:
            hint = ("; ids look 1-based (0 = background or other?): --reduce-labels (reduce_labels=True) makes 0 "
                    "ignored and shifts the others down by one")
        raise SampleError(f"{source}: unknown class id(s) {bad} in the label map; expected 0..{num_classes - 1} "
                          f"or ignore_index={ignore_index}{hint}")
    masks = torch.stack([classes == c for c in present]) if present else torch.zeros(0, *classes.shape, dtype=bool)
    return {"image": image, "masks": masks, "labels": torch.tensor(present, dtype=torch.int64),
            "iscrowd": torch.zeros(len(present), dtype=torch.bool), "source": source}


class SemanticFolder:
    """``images_dir/NAME.jpg`` (any image suffix) paired with ``labels_dir/NAME.png``.

    id2label: class names (its length is the number of classes). Images without a label file raise at
    construction, listing a few of them.
    """

    def __init__(self, images_dir: str | os.PathLike, labels_dir: str | os.PathLike, *,
                 id2label: Mapping[int, str], ignore_index: int = 255, reduce_labels: bool = False,
                 label_suffix: str = ".png") -> None:
        self.images_dir, self.labels_dir = Path(images_dir), Path(labels_dir)
        if not self.images_dir.is_dir() or not self.labels_dir.is_dir():
            raise FileNotFoundError(f"expected folders images_dir={self.images_dir} and labels_dir={self.labels_dir}")
        self.id2label = {int(k): str(v) for k, v in id2label.items()}
        self.thing_ids: frozenset[int] = frozenset()
        self.ignore_index, self.reduce_labels = ignore_index, reduce_labels
        images = sorted(p for p in self.images_dir.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES)
        self.pairs = [(p, self.labels_dir / (p.stem + label_suffix)) for p in images]
        missing = [str(p) for p, lab in self.pairs if not lab.is_file()]
        if missing:
            raise FileNotFoundError(f"{len(missing)} image(s) in {self.images_dir} have no {label_suffix} label in "
                                    f"{self.labels_dir}, e.g. {missing[:3]}")

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict[str, Any]:
        image_path, label_path = self.pairs[index]
        image = read_image(image_path)
        label = _label_array(label_path, str(label_path))
        return label_map_to_sample(image, label, num_classes=len(self.id2label), ignore_index=self.ignore_index,
                                   reduce_labels=self.reduce_labels, source=str(label_path))


class HFSegmentationDataset:
    """A Hugging Face dataset (or a sequence of dicts) read as samples.

    annotation: "semantic" (a class-id map) or "instance" (R = class id, G = instance id; instance 0 is
    background). thing_ids: classes that are things (instance format: every class by default).
    """

    def __init__(self, dataset: Sequence[Mapping[str, Any]], *, id2label: Mapping[int, str],
                 image_column: str = "image", annotation_column: str = "annotation", annotation: str = "semantic",
                 ignore_index: int = 255, reduce_labels: bool = False, thing_ids: Sequence[int] | None = None) -> None:
        if annotation not in ("semantic", "instance"):
            raise ValueError(f"annotation must be 'semantic' or 'instance', got {annotation!r}")
        self.dataset, self.image_column, self.annotation_column = dataset, image_column, annotation_column
        self.annotation, self.ignore_index, self.reduce_labels = annotation, ignore_index, reduce_labels
        self.id2label = {int(k): str(v) for k, v in id2label.items()}
        default = range(len(self.id2label)) if annotation == "instance" else ()
        self.thing_ids = frozenset(thing_ids if thing_ids is not None else default)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        from ..processing.io import to_rgb_tensor

        row = self.dataset[index]
        source = f"row {index}"
        for column in (self.image_column, self.annotation_column):
            if column not in row:
                raise SampleError(f"{source}: no column {column!r} (columns: {sorted(row)})")
        try:
            image = to_rgb_tensor(row[self.image_column])
        except (ValueError, TypeError, OSError) as exc:
            raise SampleError(f"{source}: unreadable image ({exc})") from exc
        image = image if image.dtype == torch.uint8 else image.round().clamp(0, 255).to(torch.uint8)
        label = _label_array(row[self.annotation_column], source)
        if self.annotation == "semantic":
            return label_map_to_sample(image, label, num_classes=len(self.id2label), ignore_index=self.ignore_index,
                                       reduce_labels=self.reduce_labels, source=source)
        if label.ndim != 3 or label.shape[-1] < 2:
            raise SampleError(f"{source}: instance annotation must be (H, W, >=2) with R = class, G = instance; "
                              f"got shape {label.shape}")
        classes, instances = label[..., 0].astype(np.int64), label[..., 1].astype(np.int64)
        sample = label_map_to_sample(image, classes, num_classes=len(self.id2label), ignore_index=self.ignore_index,
                                     reduce_labels=self.reduce_labels, source=source)
        class_map = torch.full(classes.shape, self.ignore_index, dtype=torch.int64)
        for c, m in zip(sample["labels"].tolist(), sample["masks"]):
            class_map[m] = c
        inst = torch.from_numpy(instances)
        masks, labels = [], []
        for i in inst.unique().tolist():
            if i == 0:
                continue
            region = inst == i
            cls = class_map[region]
            cls = cls[cls != self.ignore_index]
            if cls.numel():
                masks.append(region & (class_map == cls.mode().values))
                labels.append(int(cls.mode().values))
        H, W = classes.shape
        return {"image": image, "masks": torch.stack(masks) if masks else torch.zeros(0, H, W, dtype=torch.bool),
                "labels": torch.tensor(labels, dtype=torch.int64),
                "iscrowd": torch.zeros(len(labels), dtype=torch.bool),
                "source": source}


def load_hf_dataset(name: str, split: str = "train", **kwargs: Any) -> Any:
    """``datasets.load_dataset(name, split=split, **kwargs)``; needs ``pip install datasets``."""
    try:
        import datasets
    except ImportError as exc:
        raise ImportError("loading a Hugging Face dataset needs the datasets package: pip install datasets") from exc
    return datasets.load_dataset(name, split=split, **kwargs)
