"""Data: synthetic scenes, targets for the three tasks, readers (COCO panoptic / instance, semantic folders,
Hugging Face style rows), bad samples, augmentations that keep masks on the image, collation."""

from __future__ import annotations

import json

import numpy as np
import PIL.Image
import pytest
import torch

from maskformers.training.data import SampleError, TrainingDataset, collate, panoptic_map, targets_for_task
from maskformers.training.readers_coco import CocoInstances, CocoPanoptic
from maskformers.training.readers_semantic import HFSegmentationDataset, SemanticFolder
from maskformers.training.synthetic import SyntheticScenes
from maskformers.training.transforms import lsj_augmentation, semantic_augmentation


# ---------------------------------------------------------------------------------------------- synthetic
def test_synthetic_scenes_are_seeded_and_panoptic():
    a, b = SyntheticScenes(5, size=(64, 80), seed=3), SyntheticScenes(5, size=(64, 80), seed=3)
    for i in range(5):
        x, y = a[i], b[i]
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["masks"], y["masks"])
        assert x["image"].shape == (3, 64, 80) and x["image"].dtype == torch.uint8
        assert torch.equal(x["masks"].sum(0), torch.ones(64, 80, dtype=torch.long))  # a partition: no void
        assert x["masks"].flatten(1).any(1).all()
        stuff = [c for c in x["labels"].tolist() if c >= 4]
        assert len(stuff) == len(set(stuff)) >= 1  # one segment per stuff class
    assert not torch.equal(a[0]["image"], SyntheticScenes(5, size=(64, 80), seed=4)[0]["image"])
    assert torch.equal(a[-1]["image"], a[4]["image"])
    with pytest.raises(IndexError, match="out of range"):
        a[5]


def test_targets_for_the_three_tasks():
    sample = SyntheticScenes(10, size=64, seed=1)[2]
    things = SyntheticScenes.thing_ids
    pan = targets_for_task(sample, "panoptic", things)
    ins = targets_for_task(sample, "instance", things)
    sem = targets_for_task(sample, "semantic", things)
    assert torch.equal(pan["labels"], sample["labels"])
    assert set(ins["labels"].tolist()) <= set(things) and len(ins["labels"]) == sum(
        c in things for c in sample["labels"].tolist())
    assert sem["labels"].tolist() == sorted(set(sample["labels"].tolist()))
    for c, m in zip(sem["labels"], sem["masks"]):
        assert torch.equal(m, sample["masks"][sample["labels"] == c].any(0))
    crowd = dict(sample, iscrowd=torch.ones_like(sample["iscrowd"]))
    assert len(targets_for_task(crowd, "panoptic", things)["labels"]) == 0
    assert len(targets_for_task(crowd, "semantic", things)["labels"]) == len(sem["labels"])
    with pytest.raises(ValueError, match="task must be one of"):
        targets_for_task(sample, "depth", things)


# ---------------------------------------------------------------------------------------------- COCO
def _write_rgb(path, array):
    PIL.Image.fromarray(np.asarray(array, dtype=np.uint8)).save(path)


@pytest.fixture
def coco_panoptic(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "panoptic").mkdir()
    ids = np.zeros((6, 8), dtype=np.int64)
    ids[:, :4] = 300  # stuff segment (id 300 = (44, 1, 0))
    ids[1:3, 5:7] = 7
    ids[4:, 5:] = 70000  # id using the blue channel
    png = np.stack([ids % 256, ids // 256 % 256, ids // 65536], -1)
    for name in ("a", "b"):
        _write_rgb(tmp_path / "images" / f"{name}.jpg", np.full((6, 8, 3), 100))
        _write_rgb(tmp_path / "panoptic" / f"{name}.png", png)
    cats = [{"id": 1, "name": "person", "isthing": 1}, {"id": 5, "name": "car", "isthing": 1},
            {"id": 90, "name": "grass", "isthing": 0}]
    anns = [{"image_id": i, "file_name": f"{n}.png", "segments_info": [
        {"id": 300, "category_id": 90, "iscrowd": 0}, {"id": 7, "category_id": 1, "iscrowd": 0},
        {"id": 70000, "category_id": 5, "iscrowd": 1}, {"id": 12, "category_id": 5, "iscrowd": 0}]}
        for i, n in ((1, "a"), (2, "b"))]
    images = [{"id": 1, "file_name": "a.jpg", "height": 6, "width": 8}, {"id": 2, "file_name": "b.jpg",
                                                                          "height": 6, "width": 8}]
    path = tmp_path / "panoptic.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return tmp_path, ids


def test_coco_panoptic_reader(coco_panoptic):
    root, ids = coco_panoptic
    ds = CocoPanoptic(root / "images", root / "panoptic", root / "panoptic.json")
    assert len(ds) == 2 and ds.id2label == {0: "person", 1: "car", 2: "grass"} and ds.thing_ids == {0, 1}
    s = ds[0]
    assert s["labels"].tolist() == [2, 0, 1] and s["iscrowd"].tolist() == [False, False, True]  # id 12 is absent
    for k, sid in enumerate([300, 7, 70000]):
        assert torch.equal(s["masks"][k], torch.from_numpy(ids == sid))
    assert targets_for_task(s, "panoptic", ds.thing_ids)["labels"].tolist() == [2, 0]
    seg, info = panoptic_map(s)
    assert info[2] == {"id": 3, "category_id": 1, "iscrowd": True} and int((seg == 0).sum()) == int((ids == 0).sum())


def test_coco_panoptic_bad_samples_name_the_file(coco_panoptic):
    root, _ = coco_panoptic
    _write_rgb(root / "panoptic" / "b.png", np.zeros((5, 8, 3)))
    (root / "images" / "a.jpg").write_bytes(b"not a jpeg")
    ds = CocoPanoptic(root / "images", root / "panoptic", root / "panoptic.json")
    with pytest.raises(SampleError, match=r"a\.jpg: unreadable image"):
        ds[0]
    with pytest.raises(SampleError, match=r"b\.png: annotation size \(5, 8\) does not match the image size \(6, 8\)"):
        ds[1]
    data = json.loads((root / "panoptic.json").read_text())
    data["annotations"][1]["segments_info"][0]["category_id"] = 77
    (root / "panoptic.json").write_text(json.dumps(data))
    _write_rgb(root / "panoptic" / "b.png", np.zeros((6, 8, 3)))
    with pytest.raises(SampleError, match=r"b\.png: unknown category_id 77"):
        CocoPanoptic(root / "images", root / "panoptic", root / "panoptic.json")[1]
    train = TrainingDataset(CocoPanoptic(root / "images", root / "panoptic", root / "panoptic.json"),
                            task="panoptic", on_error="skip")
    batch = collate([train[0], train[1]])
    assert len(batch["targets"]) == 0 and len(batch["skipped"]) == 2 and "a.jpg" in batch["skipped"][0]
    with pytest.raises(SampleError):
        TrainingDataset(train.reader, task="panoptic")[0]


def test_coco_instances_polygons_and_rle(tmp_path):
    mask_utils = pytest.importorskip("pycocotools.mask")
    (tmp_path / "images").mkdir()
    _write_rgb(tmp_path / "images" / "x.png", np.zeros((10, 12, 3)))
    blob = np.zeros((10, 12), dtype=np.uint8, order="F")
    blob[2:5, 3:9] = 1
    compressed = mask_utils.encode(blob)
    compressed["counts"] = compressed["counts"].decode("ascii")
    flat = blob.flatten(order="F")
    runs, current, n = [], 0, 0
    for v in flat:
        if v != current:
            runs.append(n)
            current, n = v, 0
        n += 1
    runs.append(n)
    anns = [
        {"id": 1, "image_id": 7, "category_id": 3, "iscrowd": 0, "segmentation": [[1, 1, 6, 1, 6, 6, 1, 6]]},
        {"id": 2, "image_id": 7, "category_id": 8, "iscrowd": 0, "segmentation": compressed},
        {"id": 3, "image_id": 7, "category_id": 8, "iscrowd": 1, "segmentation": {"size": [10, 12], "counts": runs}},
    ]
    data = {"images": [{"id": 7, "file_name": "x.png", "height": 10, "width": 12}], "annotations": anns,
            "categories": [{"id": 3, "name": "cat"}, {"id": 8, "name": "dog"}]}
    (tmp_path / "inst.json").write_text(json.dumps(data))
    ds = CocoInstances(tmp_path / "images", tmp_path / "inst.json")
    s = ds[0]
    assert s["labels"].tolist() == [0, 1, 1] and s["iscrowd"].tolist() == [False, False, True]
    assert torch.equal(s["masks"][1], torch.from_numpy(blob.astype(bool)))
    assert torch.equal(s["masks"][2], torch.from_numpy(blob.astype(bool)))
    poly = s["masks"][0]
    assert poly[2:6, 2:6].all() and not poly[7:].any() and not poly[:, 8:].any()  # the 5x5 square's interior
    assert targets_for_task(s, "instance", ds.thing_ids)["labels"].tolist() == [0, 1]
    anns[1]["segmentation"] = dict(compressed, size=[9, 12])
    (tmp_path / "inst.json").write_text(json.dumps(data))
    with pytest.raises(SampleError, match=r"x\.png: RLE size \(9, 12\) of annotation 2"):
        CocoInstances(tmp_path / "images", tmp_path / "inst.json")[0]


# ---------------------------------------------------------------------------------------------- semantic
def test_semantic_folder_ignore_and_ade_label_reduction(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "lab").mkdir()
    label = np.array([[0, 1, 1, 2], [3, 3, 255, 0]], dtype=np.uint8)
    _write_rgb(tmp_path / "img" / "p.jpg", np.zeros((2, 4, 3)))
    PIL.Image.fromarray(label).save(tmp_path / "lab" / "p.png")
    plain = SemanticFolder(tmp_path / "img", tmp_path / "lab", id2label={i: str(i) for i in range(4)})[0]
    assert plain["labels"].tolist() == [0, 1, 2, 3]
    assert torch.equal(plain["masks"][0], torch.from_numpy(label == 0))
    ade = SemanticFolder(tmp_path / "img", tmp_path / "lab", id2label={i: str(i) for i in range(3)},
                         reduce_labels=True)[0]
    assert ade["labels"].tolist() == [0, 1, 2]  # 0 -> ignored, 1..3 -> 0..2, 255 stays ignored
    assert torch.equal(ade["masks"][2], torch.from_numpy(label == 3))
    assert not ade["masks"].any(0)[1, 2] and not ade["masks"].any(0)[0, 0]
    with pytest.raises(SampleError, match=r"p\.png: unknown class id\(s\) \[3\]"):
        SemanticFolder(tmp_path / "img", tmp_path / "lab", id2label={i: str(i) for i in range(3)})[0]
    PIL.Image.fromarray(label[:, :3].copy()).save(tmp_path / "lab" / "p.png")
    with pytest.raises(SampleError, match=r"p\.png: annotation size \(2, 3\) does not match the image size \(2, 4\)"):
        SemanticFolder(tmp_path / "img", tmp_path / "lab", id2label={i: str(i) for i in range(4)})[0]
    _write_rgb(tmp_path / "img" / "q.jpg", np.zeros((2, 4, 3)))
    with pytest.raises(FileNotFoundError, match="have no .png label"):
        SemanticFolder(tmp_path / "img", tmp_path / "lab", id2label={0: "a"})


def test_hf_style_rows_semantic_and_instance():
    image = PIL.Image.fromarray(np.zeros((4, 5, 3), dtype=np.uint8))
    sem = np.array([[1, 1, 2, 2, 0]] * 4, dtype=np.uint8)
    rows = [{"image": image, "annotation": PIL.Image.fromarray(sem)}]
    s = HFSegmentationDataset(rows, id2label={0: "a", 1: "b"}, reduce_labels=True)[0]
    assert s["labels"].tolist() == [0, 1] and int(s["masks"].sum()) == 16
    inst = np.zeros((4, 5, 3), dtype=np.uint8)
    inst[..., 0] = 2
    inst[:2, :, 1] = 1
    inst[2:, :3, 1] = 2
    rows = [{"pixel": image, "label": PIL.Image.fromarray(inst)}]
    ds = HFSegmentationDataset(rows, id2label={0: "a", 1: "b", 2: "c"}, image_column="pixel",
                               annotation_column="label", annotation="instance")
    s = ds[0]
    assert s["labels"].tolist() == [2, 2] and s["masks"].sum((1, 2)).tolist() == [10, 6]
    with pytest.raises(SampleError, match="row 0: no column 'image'"):
        HFSegmentationDataset(rows, id2label={0: "a"})[0]


# ---------------------------------------------------------------------------------------------- augmentation
def _coded_sample():
    """An image whose red channel tells which segment a pixel is in (value 40 * (k + 1))."""
    s = SyntheticScenes(3, size=(60, 90), seed=2)[1]
    image = torch.zeros(3, 60, 90, dtype=torch.uint8)
    for k, m in enumerate(s["masks"]):
        image[0][m] = 40 * (k + 1) % 256
    return dict(s, image=image)


@pytest.mark.parametrize("make", [lambda: lsj_augmentation(64, scale_range=(0.8, 2.0), seed=1),
                                  lambda: semantic_augmentation(48, min_sizes=[50, 80, 120], max_size=200, seed=1)])
def test_augmentations_keep_masks_on_their_pixels(make):
    aug, sample = make(), _coded_sample()
    changed = 0
    for index in range(12):
        out = aug(sample, index)
        assert out["image"].shape[1:] == out["masks"].shape[1:] and out["image"].dtype == torch.uint8
        assert out["masks"].flatten(1).any(1).all() and len(out["labels"]) == len(out["masks"])
        for label, mask in zip(out["labels"].tolist(), out["masks"]):
            k = sample["labels"].tolist().index(label) if label >= 4 else None
            red = out["image"][0][mask].float()
            if k is not None and mask.sum() >= 150:  # stuff classes are unique in the scene: their code is known
                close = (red - 40 * (k + 1) % 256).abs() <= 2  # only borders are blurred by the image resize
                assert close.float().mean() > 0.5 and (red.median() - 40 * (k + 1) % 256).abs() <= 2
        assert not out["masks"].any(0)[~out["valid"]].any()  # padding belongs to no segment
        changed += out["image"].shape != sample["image"].shape or not torch.equal(out["image"], sample["image"])
    assert changed >= 10
    again = make()(sample, 5)
    assert torch.equal(again["image"], aug(sample, 5)["image"])
    aug.set_epoch(1)
    assert not torch.equal(aug(sample, 5)["image"], again["image"]) or aug(sample, 5)["image"].shape != again[
        "image"].shape


def test_collate_pads_to_the_size_divisor():
    ds = TrainingDataset(SyntheticScenes(2, size=(50, 70)), task="instance")
    batch = collate([ds[0], ds[1]], size_divisibility=32)
    assert batch["pixel_values"].shape == (2, 3, 64, 96)
    assert batch["pixel_mask"][:, :50, :70].all() and not batch["pixel_mask"][:, 50:].any()
    assert batch["pixel_values"][:, :, 50:].abs().max() == 0
    assert all(t["masks"].shape[1:] == (64, 96) and not t["masks"][:, 50:].any() for t in batch["targets"])
    assert all(set(t["labels"].tolist()) <= SyntheticScenes.thing_ids for t in batch["targets"])
