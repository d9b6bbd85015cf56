"""Small datasets written to disk in the layouts users bring (semantic folders, COCO panoptic, COCO instances),
drawn from the seeded synthetic scenes so that a model can learn them, and a tiny model config."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import PIL.Image

from maskformers.training.synthetic import SYNTHETIC_CLASSES, SYNTHETIC_THING_IDS, SyntheticScenes

TINY = {
    "backbone": {"name": "swin", "embed_dim": 16, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 2, 2], "window_size": 4},
    "num_classes": 8, "num_queries": 6, "hidden_dim": 32, "conv_dim": 32, "mask_dim": 32, "num_heads": 2,
    "encoder_layers": 1, "encoder_ffn_dim": 32, "decoder_layers": 2, "decoder_ffn_dim": 32,
}
# the semantic example merges the four shapes into one class: other classes than the built-in model's
SEMANTIC_CLASSES = ("shape", "sky", "grass", "water", "sand")
COCO_IDS = (1, 2, 3, 4, 10, 11, 12, 13)  # COCO category ids of the synthetic classes (things 1-4, stuff 10-13)


def _save(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    PIL.Image.fromarray(np.ascontiguousarray(array)).save(path)


def _scenes(n: int, size: tuple[int, int], seed: int):
    scenes = SyntheticScenes(n, size=size, seed=seed)
    for i in range(n):
        yield i, scenes[i]


def write_semantic_folder(images: Path, labels: Path, *, n: int, size=(96, 128), seed: int = 7) -> None:
    """``images/scene-{i}.jpg`` + ``labels/scene-{i}.png`` (class ids of :data:`SEMANTIC_CLASSES`)."""
    for i, scene in _scenes(n, size, seed):
        label = np.zeros(size, dtype=np.uint8)
        for c, m in zip(scene["labels"].tolist(), scene["masks"]):
            label[m.numpy()] = 0 if c in SYNTHETIC_THING_IDS else c - 3
        _save(images / f"scene-{i}.jpg", scene["image"].permute(1, 2, 0).numpy())
        _save(labels / f"scene-{i}.png", label)


def write_id2label(path: Path, names=SEMANTIC_CLASSES) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({str(i): name for i, name in enumerate(names)}))


def write_coco_panoptic(images: Path, panoptic_dir: Path, annotations: Path, *, n: int, size=(96, 128),
                        seed: int = 11) -> None:
    """COCO panoptic: JPEGs, PNGs with id = R + 256 G + 256^2 B, and the JSON (the synthetic classes)."""
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


def write_coco_instances(images: Path, annotations: Path, *, n: int, size=(64, 64), seed: int = 5,
                         empty_polygon_in: tuple[int, ...] = ()) -> None:
    """COCO instances of the synthetic things (compressed RLE); images listed in ``empty_polygon_in`` get an
    annotation whose ``segmentation`` is an empty polygon list."""
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
