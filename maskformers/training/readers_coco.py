"""COCO readers: panoptic (PNG + JSON) and instance (JSON with polygons or RLE) annotations.

Both give samples in the common format of :mod:`maskformers.training.data`, with COCO category ids
mapped to contiguous class ids in the order of the JSON's ``categories`` sorted by id (``category_ids``
keeps the mapping back). Problems are reported as :class:`SampleError` naming the file: an unreadable
image or PNG, an annotation whose size differs from the image's, a category id the JSON does not list, a
malformed segmentation (an empty polygon list, a polygon of fewer than three points). Segments that cover
no pixel are left out and described in the sample's ``"empty_segments"`` (``maskformers check-data``
reports them).

Instance masks (polygons, uncompressed or compressed RLE) are decoded with pycocotools, an optional
dependency (``pip install pycocotools``) imported only when an instance dataset is read.
"""

from __future__ import annotations

import json
import os
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .data import SampleError

__all__ = ["CocoPanoptic", "CocoInstances", "read_image", "PYCOCOTOOLS_HINT"]

PYCOCOTOOLS_HINT = 'pip install "maskformers[train]" (or pip install pycocotools)'


def read_image(path: str | os.PathLike) -> torch.Tensor:
    """(3, H, W) uint8 RGB of an image file; :class:`SampleError` naming the file when it cannot be read."""
    from ..processing.io import ImageLoadError, to_rgb_tensor

    try:
        image = to_rgb_tensor(path)
    except (ImageLoadError, OSError) as exc:
        raise SampleError(f"{os.fspath(path)}: unreadable image ({exc})") from exc
    if image.dtype != torch.uint8:  # 16-bit and float sources come back as float32 on the 0..255 scale
        image = image.round().clamp(0, 255).to(torch.uint8)
    return image


def _read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read annotation file {path}: {exc}") from exc


class _CocoBase:
    def __init__(self, images_dir: str | os.PathLike, annotation_file: str | os.PathLike) -> None:
        self.images_dir = Path(images_dir)
        self.annotation_file = Path(annotation_file)
        data = _read_json(self.annotation_file)
        for key in ("images", "annotations", "categories"):
            if key not in data:
                raise ValueError(f"{self.annotation_file}: no {key!r} list; is this a COCO annotation file?")
        categories = sorted(data["categories"], key=lambda c: c["id"])
        self.category_ids = [int(c["id"]) for c in categories]  # contiguous id -> COCO id
        self.contiguous = {cid: i for i, cid in enumerate(self.category_ids)}
        self.id2label = {i: str(c.get("name", c["id"])) for i, c in enumerate(categories)}
        self.thing_ids = frozenset(i for i, c in enumerate(categories) if c.get("isthing", 1))
        self.images = sorted(data["images"], key=lambda im: im["id"])
        self._data = data

    def __len__(self) -> int:
        return len(self.images)

    def _label(self, category_id: int, source: str) -> int:
        if int(category_id) not in self.contiguous:
            raise SampleError(f"{source}: unknown category_id {category_id} (the JSON lists {self.category_ids[:10]}"
                              f"{'...' if len(self.category_ids) > 10 else ''})")
        return self.contiguous[int(category_id)]

    def _image(self, info: dict[str, Any]) -> tuple[torch.Tensor, str]:
        path = self.images_dir / info["file_name"]
        image = read_image(path)
        expected = (info.get("height"), info.get("width"))
        if None not in expected and tuple(image.shape[1:]) != tuple(expected):
            raise SampleError(f"{path}: image size {tuple(image.shape[1:])} differs from the annotation's "
                              f"{expected} in {self.annotation_file}")
        return image, str(path)


class CocoPanoptic(_CocoBase):
    """COCO panoptic: ``images_dir`` (JPEGs), ``panoptic_dir`` (PNGs, id = R + 256 G + 256^2 B) and the JSON.

    A segment listed in ``segments_info`` becomes one mask (empty ones are dropped); pixels of ids not
    listed are void.
    """

    def __init__(self, images_dir: str | os.PathLike, panoptic_dir: str | os.PathLike,
                 annotation_file: str | os.PathLike) -> None:
        super().__init__(images_dir, annotation_file)
        self.panoptic_dir = Path(panoptic_dir)
        self._annotations = {a["image_id"]: a for a in self._data["annotations"]}

    def __getitem__(self, index: int) -> dict[str, Any]:
        info = self.images[index]
        image, source = self._image(info)
        ann = self._annotations.get(info["id"])
        if ann is None:
            raise SampleError(f"{source}: no panoptic annotation for image id {info['id']} in {self.annotation_file}")
        png_path = self.panoptic_dir / ann["file_name"]
        png = read_image(png_path).to(torch.int64)
        if tuple(png.shape[1:]) != tuple(image.shape[1:]):
            raise SampleError(f"{png_path}: annotation size {tuple(png.shape[1:])} does not match the image size "
                              f"{tuple(image.shape[1:])} of {source}")
        ids = png[0] + 256 * png[1] + 256 * 256 * png[2]  # (H, W)
        masks, labels, crowd, empty = [], [], [], []
        for seg in ann["segments_info"]:
            label = self._label(seg["category_id"], str(png_path))
            mask = ids == int(seg["id"])
            if mask.any():
                masks.append(mask)
                labels.append(label)
                crowd.append(bool(seg.get("iscrowd", 0)))
            else:
                empty.append(f"segment {seg['id']} ({self.id2label[label]}) of {png_path.name} covers no pixel")
        H, W = image.shape[1:]
        return {"image": image, "masks": torch.stack(masks) if masks else torch.zeros(0, H, W, dtype=torch.bool),
                "labels": torch.tensor(labels, dtype=torch.int64), "iscrowd": torch.tensor(crowd, dtype=torch.bool),
                "source": source, "empty_segments": empty}


def decode_coco_segmentation(segmentation: Any, height: int, width: int) -> np.ndarray:
    """(H, W) bool of a COCO ``segmentation``: polygons, uncompressed RLE or compressed RLE (pycocotools)."""
    try:
        from pycocotools import mask as mask_utils
    except ImportError as exc:
        raise ImportError(f"reading COCO instance masks needs pycocotools: {PYCOCOTOOLS_HINT}") from exc
    if isinstance(segmentation, list):  # polygons [[x0, y0, x1, y1, ...], ...]
        if not segmentation:
            raise ValueError("empty polygon list")
        for polygon in segmentation:
            if (not isinstance(polygon, list) or len(polygon) < 6 or len(polygon) % 2
                    or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in polygon)):
                shown = repr(polygon) if len(repr(polygon)) < 60 else repr(polygon)[:57] + "..."
                raise ValueError(f"a polygon must be a list of x, y numbers with at least three points, got {shown}")
        rles = mask_utils.frPyObjects(segmentation, height, width)
        rle = mask_utils.merge(rles)
    elif isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), list):
        rle = mask_utils.frPyObjects(segmentation, height, width)  # uncompressed RLE
    elif isinstance(segmentation, dict):
        rle = dict(segmentation)
        if isinstance(rle["counts"], str):
            rle["counts"] = rle["counts"].encode("ascii")
    else:
        raise ValueError(f"unsupported segmentation of type {type(segmentation).__name__}")
    with warnings.catch_warnings():  # pycocotools' own numpy-2 DeprecationWarning about __array__(copy=)
        warnings.simplefilter("ignore", DeprecationWarning)
        return mask_utils.decode(rle).astype(bool)


class CocoInstances(_CocoBase):
    """COCO instance segmentation: ``images_dir`` and the instances JSON; every category is a thing.
    Instances may overlap (each is its own mask); ``iscrowd`` regions are kept and flagged."""

    def __init__(self, images_dir: str | os.PathLike, annotation_file: str | os.PathLike) -> None:
        super().__init__(images_dir, annotation_file)
        self.thing_ids = frozenset(range(len(self.category_ids)))
        self._annotations: dict[int, list[dict[str, Any]]] = defaultdict(list)
        for a in self._data["annotations"]:
            self._annotations[a["image_id"]].append(a)

    def __getitem__(self, index: int) -> dict[str, Any]:
        info = self.images[index]
        image, source = self._image(info)
        H, W = image.shape[1:]
        masks, labels, crowd, empty = [], [], [], []
        for ann in self._annotations.get(info["id"], []):
            label = self._label(ann["category_id"], f"{self.annotation_file} (annotation {ann.get('id')})")
            seg = ann.get("segmentation")
            if isinstance(seg, dict) and "size" in seg and tuple(seg["size"]) != (H, W):
                raise SampleError(f"{source}: RLE size {tuple(seg['size'])} of annotation {ann.get('id')} does not "
                                  f"match the image size {(H, W)}")
            try:
                mask = torch.from_numpy(decode_coco_segmentation(seg, H, W))
            except (ValueError, KeyError, TypeError, IndexError) as exc:
                raise SampleError(f"{source}: bad segmentation in annotation {ann.get('id')} of "
                                  f"{self.annotation_file}: {exc}") from exc
            if mask.any():
                masks.append(mask)
                labels.append(label)
                crowd.append(bool(ann.get("iscrowd", 0)))
            else:
                empty.append(f"annotation {ann.get('id')} ({self.id2label[label]}) covers no pixel")
        return {"image": image, "masks": torch.stack(masks) if masks else torch.zeros(0, H, W, dtype=torch.bool),
                "labels": torch.tensor(labels, dtype=torch.int64), "iscrowd": torch.tensor(crowd, dtype=torch.bool),
                "source": source, "empty_segments": empty}
