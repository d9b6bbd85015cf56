"""Synthetic scenes written to disk in the layouts users bring: a semantic folder, COCO panoptic, COCO instances.

For trying a pipeline end to end before real data is at hand (the examples and the README's walkthrough use
them): the scenes of :class:`~maskformers.training.synthetic.SyntheticScenes` are learnable in minutes, and the
files are exactly what the readers of those formats expect.

* :func:`write_semantic_folder`: ``images/scene-{i}.jpg`` + ``labels/scene-{i}.png`` (one class id per pixel, of
  :data:`SEMANTIC_CLASSES`), with :func:`write_id2label` for the ``id2label.json`` beside them;
* :func:`write_coco_panoptic`: JPEGs, panoptic PNGs (segment id = R + 256 G + 256^2 B) and the JSON;
* :func:`write_coco_instances`: JPEGs and an instances JSON with compressed RLE masks (needs pycocotools).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import PIL.Image

from .synthetic import SYNTHETIC_CLASSES, SYNTHETIC_THING_IDS, SyntheticScenes

__all__ = ["SEMANTIC_CLASSES", "COCO_IDS", "write_semantic_folder", "write_id2label", "write_coco_panoptic",
           "write_coco_instances"]

# the semantic layout merges the four shapes into one class: other classes than the built-in model's
SEMANTIC_CLASSES = ("shape", "sky", "grass", "water", "sand")
COCO_IDS = (1, 2, 3, 4, 10, 11, 12, 13)  # COCO category ids of the synthetic classes (things 1-4, stuff 10-13)


def _save(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    PIL.Image.fromarray(np.ascontiguousarray(array)).save(path)


def _scenes(n: int, size: tuple[int, int], seed: int):
    scenes = SyntheticScenes(n, size=size, seed=seed)
    for i in range(n):
        yield i, scenes[i]


def write_semantic_folder(images: str | Path, labels: str | Path, *, n: int, size=(96, 128), seed: int = 7) -> None:
    """``images/scene-{i}.jpg`` + ``labels/scene-{i}.png`` (class ids of :data:`SEMANTIC_CLASSES`)."""
    images, labels = Path(images), Path(labels)
    for i, scene in _scenes(n, size, seed):
        label = np.zeros(size, dtype=np.uint8)
        for c, m in zip(scene["labels"].tolist(), scene["masks"]):
            label[m.numpy()] = 0 if c in SYNTHETIC_THING_IDS else c - 3
        _save(images / f"scene-{i}.jpg", scene["image"].permute(1, 2, 0).numpy())
        _save(labels / f"scene-{i}.png", label)


def write_id2label(path: str | Path, names=SEMANTIC_CLASSES) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({str(i): name for i, name in enumerate(names)}))


def write_coco_panoptic(images: str | Path, panoptic_dir: str | Path, annotations: str | Path, *, n: int,
                        size=(96, 128), seed: int = 11) -> None:
    """COCO panoptic: JPEGs, PNGs with id = R + 256 G + 256^2 B, and the JSON (the synthetic classes)."""
    images, panoptic_dir, annotations = Path(images), Path(panoptic_dir), Path(annotations)
    records, anns = [], []
    for i, scene in _scenes(n, size, seed):
        ids = np.zeros((*size, 3), dtype=np.uint8)
        segments = []
        for k, (c, m) in enumerate(zip(scene["labels"].tolist(), scene["masks"])):
            segment_id = 1000 * (k + 1) + 7
            ids[m.numpy()] = (segment_id % 256, segment_id // 256 % 256, segment_id // 65536)
            segments.append({"id": segment_id, "category_id": COCO_IDS[c], "iscrowd": 0})
        _save(images / f"{i:012d}.jpg", scene["image"].permute(1, 2, 0).numpy())
        _save(panoptic_dir / f"{i:012d}.png", ids)
        records.append({"id": i + 1, "file_name": f"{i:012d}.jpg", "height": size[0], "width": size[1]})
        anns.append({"image_id": i + 1, "file_name": f"{i:012d}.png", "segments_info": segments})
    categories = [{"id": cid, "name": name, "isthing": int(c in SYNTHETIC_THING_IDS)}
                  for c, (cid, name) in enumerate(zip(COCO_IDS, SYNTHETIC_CLASSES))]
    annotations.parent.mkdir(parents=True, exist_ok=True)
    annotations.write_text(json.dumps({"images": records, "annotations": anns, "categories": categories}))


def write_coco_instances(images: str | Path, annotations: str | Path, *, n: int, size=(64, 64), seed: int = 5,
                         empty_polygon_in: tuple[int, ...] = ()) -> None:
    """COCO instances of the synthetic things (compressed RLE); images listed in ``empty_polygon_in`` get an
    annotation whose ``segmentation`` is an empty polygon list."""
    images, annotations = Path(images), Path(annotations)
    from pycocotools import mask as mask_utils

    records, anns = [], []
    for i, scene in _scenes(n, size, seed):
        _save(images / f"{i}.jpg", scene["image"].permute(1, 2, 0).numpy())
        records.append({"id": i + 1, "file_name": f"{i}.jpg", "height": size[0], "width": size[1]})
        for c, m in zip(scene["labels"].tolist(), scene["masks"]):
            if c not in SYNTHETIC_THING_IDS:
                continue
            rle = mask_utils.encode(np.asfortranarray(m.numpy().astype(np.uint8)))
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": COCO_IDS[c], "iscrowd": 0,
                         "segmentation": {"size": list(size), "counts": rle["counts"].decode("ascii")}})
        if i in empty_polygon_in:
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": 1, "iscrowd": 0, "segmentation": []})
    categories = [{"id": cid, "name": name} for c, (cid, name) in enumerate(zip(COCO_IDS, SYNTHETIC_CLASSES))
                  if c in SYNTHETIC_THING_IDS]
    annotations.parent.mkdir(parents=True, exist_ok=True)
    annotations.write_text(json.dumps({"images": records, "annotations": anns, "categories": categories}))
