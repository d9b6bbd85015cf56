"""Semantic segmentation readers: image + label-PNG folders, and Hugging Face ``datasets`` datasets.

Label maps hold class ids per pixel; ``ignore_index`` marks pixels without a class. ADE20K-style
``reduce_labels`` turns 0 ("other") into ``ignore_index`` and shifts every other id down by one (ADE20K's
150 classes are stored as 1..150). Each class present becomes one segment (a "stuff" segment: semantic
data has no instances). Class ids outside ``0..num_classes-1`` raise :class:`SampleError` naming the file;
so does a colour mask, unless a ``palette`` maps its colours to ids (see :mod:`.label_maps`). Opening a
reader reads a few label maps and refuses a dataset of binary 0/255 masks whose objects would all be
ignored (``check_labels=False`` skips that).

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
from .label_maps import check_label_values, label_to_classes, load_palette
from .readers_coco import read_image

__all__ = ["SemanticFolder", "HFSegmentationDataset", "load_hf_dataset", "label_map_to_sample"]

_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def _label_array(label: Any, source: str, *, colours: bool = False) -> np.ndarray:
    """(H, W) or (H, W, C) integer array of a label PNG path, PIL image or array. colours: read a "P" PNG
    through its colour table (for a palette) instead of as its indices."""
    import PIL.Image

    try:
        if isinstance(label, (str, os.PathLike)):
            with PIL.Image.open(label) as im:
                im.load()
                return np.asarray(im.convert("RGB") if colours and im.mode in ("P", "PA") else im)
        if isinstance(label, PIL.Image.Image):
            return np.asarray(label.convert("RGB") if colours and label.mode in ("P", "PA") else label)
        return np.asarray(label)
    except (OSError, SyntaxError, ValueError) as exc:
        raise SampleError(f"{source}: unreadable label map ({exc})") from exc


def _palette(palette: Any, id2label: Mapping[int, str], ignore_index: int, reduce_labels: bool) -> Any:
    if palette is None:
        return None
    if reduce_labels:
        raise ValueError("a palette gives the class ids themselves: it cannot be combined with reduce_labels")
    palette = load_palette(palette)
    bad = sorted({i for i in palette.values() if i not in id2label and i != ignore_index})
    if bad:
        raise ValueError(f"palette ids {bad} are neither in id2label (0..{len(id2label) - 1}) nor ignore_index "
                         f"{ignore_index}")
    return palette


def _classes(label: np.ndarray, *, ignore_index: int, reduce_labels: bool, source: str,
             palette: Mapping[tuple[int, int, int], int] | None = None) -> np.ndarray:
    """(H, W) int64 class ids of a label array (colours through ``palette``; ADE20K's reduction)."""
    classes = label_to_classes(label, source=source, palette=palette).astype(np.int64)
    if reduce_labels:
        reduced = np.where(classes == 0, ignore_index, classes - 1)
        classes = np.where(classes == ignore_index, ignore_index, reduced)  # ignore_index stays ignored
    return classes


def label_map_to_sample(image: torch.Tensor, label: np.ndarray, *, num_classes: int, ignore_index: int = 255,
                        reduce_labels: bool = False, source: str = "<unknown>",
                        palette: Mapping[tuple[int, int, int], int] | None = None) -> dict[str, Any]:
    """A sample from an image (3, H, W) uint8 and a label image (H, W) or (H, W, 3): one segment per class
    present. palette: ``{(r, g, b): id}`` for colour masks (see :func:`.label_maps.load_palette`)."""
    classes_np = _classes(label, ignore_index=ignore_index, reduce_labels=reduce_labels, source=source,
                          palette=palette)
    if classes_np.shape != tuple(image.shape[1:]):
        raise SampleError(f"{source}: annotation size {classes_np.shape} does not match the image size "
                          f"{tuple(image.shape[1:])}")
    classes = torch.from_numpy(classes_np)
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

    id2label: class names (its length is the number of classes). palette: colour masks' ``{id: [r, g, b]}``
    (a dict, list or JSON file, see :func:`.label_maps.load_palette`). Images without a label file raise at
    construction, listing a few of them, unless ``skip_missing`` (then they are left out and listed in
    ``missing``; ``unpaired_labels`` lists label files without an image). check_labels: refuse a dataset of
    binary 0/255 masks (see :func:`.label_maps.check_label_values`).
    """

    def __init__(self, images_dir: str | os.PathLike, labels_dir: str | os.PathLike, *,
                 id2label: Mapping[int, str], ignore_index: int = 255, reduce_labels: bool = False,
                 label_suffix: str = ".png", palette: Any = None, check_labels: bool = True,
                 skip_missing: bool = False) -> None:
        self.images_dir, self.labels_dir = Path(images_dir), Path(labels_dir)
        for name, folder in (("images", self.images_dir), ("labels", self.labels_dir)):
            if not folder.is_dir():
                raise FileNotFoundError(f"{name} folder {folder}: no such folder")
        self.id2label = {int(k): str(v) for k, v in id2label.items()}
        self.thing_ids: frozenset[int] = frozenset()
        self.ignore_index, self.reduce_labels = ignore_index, reduce_labels
        self.palette = _palette(palette, self.id2label, ignore_index, reduce_labels)
        images = sorted(p for p in self.images_dir.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES)
        pairs = [(p, self.labels_dir / (p.stem + label_suffix)) for p in images]
        self.missing = [p for p, lab in pairs if not lab.is_file()]
        if self.missing and not skip_missing:
            raise FileNotFoundError(f"{len(self.missing)} image(s) in {self.images_dir} have no {label_suffix} label "
                                    f"in {self.labels_dir}, e.g. {[str(p) for p in self.missing[:3]]}")
        self.pairs = [(p, lab) for p, lab in pairs if lab.is_file()]
        stems = {p.stem for p in images}
        self.unpaired_labels = sorted(p for p in self.labels_dir.iterdir() if p.name.endswith(label_suffix)
                                      and p.name[: -len(label_suffix)] not in stems)
        if check_labels:
            check_label_values(self.label_classes, len(self.pairs), num_classes=len(self.id2label),
                               ignore_index=ignore_index, where=str(self.labels_dir), names=self.id2label)

    def __len__(self) -> int:
        return len(self.pairs)

    def label_classes(self, index: int) -> tuple[str, np.ndarray]:
        """The label file of sample ``index`` and its (H, W) int64 class ids (without reading the image)."""
        label_path = self.pairs[index][1]
        label = _label_array(label_path, str(label_path), colours=self.palette is not None)
        return str(label_path), _classes(label, ignore_index=self.ignore_index, reduce_labels=self.reduce_labels,
                                         source=str(label_path), palette=self.palette)

    def __getitem__(self, index: int) -> dict[str, Any]:
        image_path, label_path = self.pairs[index]
        image = read_image(image_path)
        label = _label_array(label_path, str(label_path), colours=self.palette is not None)
        return label_map_to_sample(image, label, num_classes=len(self.id2label), ignore_index=self.ignore_index,
                                   reduce_labels=self.reduce_labels, source=str(label_path), palette=self.palette)


class HFSegmentationDataset:
    """A Hugging Face dataset (or a sequence of dicts) read as samples.

    annotation: "semantic" (a class-id map, or colours with ``palette``) or "instance" (R = class id, G =
    instance id; instance 0 is background). thing_ids: classes that are things (instance format: every class
    by default). check_labels: refuse binary 0/255 semantic masks (see :func:`.label_maps.check_label_values`).
    """

    def __init__(self, dataset: Sequence[Mapping[str, Any]], *, id2label: Mapping[int, str],
                 image_column: str = "image", annotation_column: str = "annotation", annotation: str = "semantic",
                 ignore_index: int = 255, reduce_labels: bool = False, thing_ids: Sequence[int] | None = None,
                 palette: Any = None, check_labels: bool = True) -> None:
        if annotation not in ("semantic", "instance"):
            raise ValueError(f"annotation must be 'semantic' or 'instance', got {annotation!r}")
        if palette is not None and annotation != "semantic":
            raise ValueError("a palette maps the colours of semantic masks; the instance format stores ids in R, G")
        self.dataset, self.image_column, self.annotation_column = dataset, image_column, annotation_column
        self.annotation, self.ignore_index, self.reduce_labels = annotation, ignore_index, reduce_labels
        self.id2label = {int(k): str(v) for k, v in id2label.items()}
        self.palette = _palette(palette, self.id2label, ignore_index, reduce_labels)
        default = range(len(self.id2label)) if annotation == "instance" else ()
        self.thing_ids = frozenset(thing_ids if thing_ids is not None else default)
        if check_labels and annotation == "semantic":
            check_label_values(self.label_classes, len(self.dataset), num_classes=len(self.id2label),
                               ignore_index=ignore_index, where=f"column {annotation_column!r}", names=self.id2label)

    def label_classes(self, index: int) -> tuple[str, np.ndarray]:
        """"row INDEX" and the (H, W) int64 class ids of its semantic annotation."""
        source = f"row {index}"
        row = self.dataset[index]
        if self.annotation_column not in row:
            raise SampleError(f"{source}: no column {self.annotation_column!r} (columns: {sorted(row)})")
        label = _label_array(row[self.annotation_column], source, colours=self.palette is not None)
        return source, _classes(label, ignore_index=self.ignore_index, reduce_labels=self.reduce_labels,
                                source=source, palette=self.palette)

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
        label = _label_array(row[self.annotation_column], source, colours=self.palette is not None)
        if self.annotation == "semantic":
            return label_map_to_sample(image, label, num_classes=len(self.id2label), ignore_index=self.ignore_index,
                                       reduce_labels=self.reduce_labels, source=source, palette=self.palette)
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
