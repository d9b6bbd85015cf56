"""OneFormer post-processing (``model="oneformer"``) against transformers' OneFormerImageProcessor, its
padded-batch geometry (where transformers differs on purpose), and Mask2Former parity across the chunk
boundaries of the memory-bounded implementation (more than ``resample.CHUNK`` classes and kept queries).

Maps, ids and labels are compared exactly; scores at float32 rounding (tolerances.py).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from maskformers.processing import post_process_instance, post_process_panoptic, post_process_semantic
from maskformers.processing.resample import CHUNK
from tolerances import assert_float32_rounding, assert_segments_info_match

transformers = pytest.importorskip("transformers")
pytest.importorskip("torchvision")

MASK = (32, 48)
INPUT = (128, 192)  # unpadded: the mask grid covers exactly the input
TARGETS = [[(300, 400), (97, 55)], [MASK, MASK]]  # resized (up and down), and not resized
THINGS = [1, 3, 4]


def _structured(seed, batch=2, queries=24, classes=5, size=MASK, peak=6.0):
    g = torch.Generator().manual_seed(seed)
    h, w = size
    masks = torch.randn(batch, queries, h, w, generator=g) - 6
    for b in range(batch):
        for q in range(queries):
            y0, x0 = torch.randint(0, h - 6, (2,), generator=g).tolist()
            dy, dx = torch.randint(3, h // 2, (2,), generator=g).tolist()
            masks[b, q, y0 : y0 + dy, x0 : x0 + dx] += 12
    class_logits = torch.randn(batch, queries, classes + 1, generator=g)
    class_logits.scatter_(2, torch.randint(0, classes + 1, (batch, queries, 1), generator=g), peak)
    return class_logits, masks


def _random(seed, batch=2, queries=16, classes=7):
    g = torch.Generator().manual_seed(seed)
    class_logits = torch.randn(batch, queries, classes + 1, generator=g) * 3
    return class_logits, torch.randn(batch, queries, *MASK, generator=g) * 4


def _outputs(class_logits, mask_logits):
    return SimpleNamespace(class_queries_logits=class_logits, masks_queries_logits=mask_logits)


@pytest.fixture(scope="module")
def reference():
    processor = transformers.OneFormerImageProcessor()
    # the class metadata transformers would download from shi-labs/oneformer_demo; a non-ADE20K file name
    # keeps its ADE20K-only label remapping out of the way
    processor.metadata, processor.class_info_file = {"thing_ids": THINGS}, "coco_panoptic.json"
    return processor


def _assert_same_segments(got, ref):
    assert got["segmentation"].dtype == torch.int32
    if ref["segments_info"] or ref["segmentation"].dtype != torch.float32:
        assert torch.equal(got["segmentation"], ref["segmentation"])
    else:  # transformers fills -1 (float) when no query passes; ours keeps "0 = none"
        assert (got["segmentation"] == 0).all() and (ref["segmentation"] == -1).all()
        assert got["segmentation"].shape == ref["segmentation"].shape
    assert_segments_info_match(got["segments_info"], ref["segments_info"])


@pytest.mark.parametrize("make", [_random, _structured])
@pytest.mark.parametrize("targets", TARGETS, ids=["resized", "mask-size"])
def test_semantic_matches_transformers(reference, make, targets):
    for seed in range(2):
        class_logits, mask_logits = make(seed)
        ref = reference.post_process_semantic_segmentation(
            _outputs(class_logits, mask_logits), target_sizes=targets, return_segmentation_scores=True
        )
        got = post_process_semantic(
            class_logits, mask_logits, input_size=INPUT, target_sizes=targets, return_scores=True, model="oneformer"
        )
        for r, o in zip(ref, got):
            assert torch.equal(o["segmentation"], r.segmentation)
            assert_float32_rounding(o["scores"], r.segmentation_scores, what="semantic scores")


@pytest.mark.parametrize("task", ["instance", "panoptic"])
@pytest.mark.parametrize("threshold", [0.3, 0.7, None], ids=["0.3", "0.7", "not-demo"])
@pytest.mark.parametrize("targets", TARGETS, ids=["resized", "mask-size"])
def test_instance_matches_transformers(reference, task, threshold, targets):
    """transformers' OneFormer instance rule: segments from the raw mask logits of the top-k pairs; for a
    panoptic-task prediction only thing classes (``thing_ids``). ``threshold=None`` is ``is_demo=False``."""
    segments = 0
    for seed in range(3):
        class_logits, mask_logits = _structured(seed)
        ref = reference.post_process_instance_segmentation(
            _outputs(class_logits, mask_logits), task_type=task, is_demo=threshold is not None,
            threshold=threshold or 0.5, target_sizes=targets,
        )
        got = post_process_instance(
            class_logits, mask_logits, input_size=INPUT, target_sizes=targets, threshold=threshold,
            model="oneformer", thing_ids=THINGS if task == "panoptic" else None,
        )
        for r, o in zip(ref, got):
            _assert_same_segments(o, r)
            segments += len(o["segments_info"])
            if task == "panoptic":
                assert {e["label_id"] for e in o["segments_info"]} <= set(THINGS)
    assert segments > 5


@pytest.mark.parametrize("targets", TARGETS, ids=["resized", "mask-size"])
@pytest.mark.parametrize("thresholds", [(0.5, 0.5, 0.8), (0.3, 0.5, 0.5), (0.2, 0.8, 0.3)], ids=str)
def test_panoptic_matches_transformers(reference, targets, thresholds):
    threshold, mask_threshold, overlap = thresholds
    kwargs = dict(threshold=threshold, mask_threshold=mask_threshold, overlap_mask_area_threshold=overlap)
    segments = 0
    for seed in range(2):
        class_logits, mask_logits = _structured(seed)
        ref = reference.post_process_panoptic_segmentation(
            _outputs(class_logits, mask_logits), target_sizes=targets, label_ids_to_fuse=set(), **kwargs
        )
        got = post_process_panoptic(class_logits, mask_logits, input_size=INPUT, target_sizes=targets,
                                    model="oneformer", **kwargs)
        for r, o in zip(ref, got):
            _assert_same_segments(o, r)
            segments += len(o["segments_info"])
    assert segments > 10


def test_instance_masks_are_the_segments():
    class_logits, mask_logits = _structured(4)
    for result in post_process_instance(class_logits, mask_logits, input_size=INPUT, threshold=0.3,
                                        model="oneformer", return_masks=True):
        ids = [e["id"] for e in result["segments_info"]]
        assert result["masks"].shape == (len(ids), *INPUT) and len(ids) > 1
        for mask, segment_id in zip(result["masks"], ids):
            assert torch.equal(mask, result["segmentation"] == segment_id)
        assert result["masks"].sum(0).max() <= 1  # no overlap


def _padded_rectangles():
    """Image 0 fills the canvas, image 1 its top-left half; query 0 (class 1) covers the right half of the
    lower half of each image, query 1 (class 0) the rest of it; the padding holds logit -10."""
    valid = [INPUT, (64, 96)]
    mask_logits = torch.full((2, 2, *MASK), -10.0)
    for b, (h, w) in enumerate(valid):
        ch, cw = h // 4, w // 4
        rect = torch.zeros(ch, cw, dtype=torch.bool)
        rect[ch // 2 :, cw // 2 :] = True
        mask_logits[b, 0, :ch, :cw] = torch.where(rect, 10.0, -10.0)
        mask_logits[b, 1, :ch, :cw] = torch.where(rect, -10.0, 10.0)
    class_logits = torch.full((2, 2, 3), -10.0)
    class_logits[:, 0, 1], class_logits[:, 1, 0] = 10.0, 10.0
    return class_logits, mask_logits, valid


def _rect_iou(found, size):
    h, w = size
    want = torch.zeros(size, dtype=torch.bool)
    want[h // 2 :, w // 2 :] = True
    return float((found & want).sum()) / float((found | want).sum())


def test_padded_batches_map_each_image_not_the_canvas(reference):
    """transformers resizes the whole mask grid, padding included, onto each target: the half-size image's
    rectangle lands in the wrong place. Ours resizes the part of the grid that covers the image."""
    class_logits, mask_logits, valid = _padded_rectangles()
    targets = [(240, 360), (150, 200)]
    kwargs = dict(input_size=INPUT, image_sizes=valid, target_sizes=targets, model="oneformer")
    semantic = post_process_semantic(class_logits, mask_logits, **kwargs)
    panoptic = post_process_panoptic(class_logits, mask_logits, **kwargs)
    instance = post_process_instance(class_logits, mask_logits, **kwargs)
    for i, target in enumerate(targets):
        assert _rect_iou(semantic[i] == 1, target) > 0.97
        for result in (panoptic[i], instance[i]):
            rect_id = next(e["id"] for e in result["segments_info"] if e["label_id"] == 1)
            assert _rect_iou(result["segmentation"] == rect_id, target) > 0.97
    ref = reference.post_process_semantic_segmentation(_outputs(class_logits, mask_logits), target_sizes=targets)
    assert torch.equal(ref[0], semantic[0])  # the unpadded image: the same computation
    assert _rect_iou(ref[1] == 1, targets[1]) < 0.5  # the padded one: transformers misplaces it


def test_mask2former_parity_across_chunks():
    """More classes and kept queries than one chunk, targets shrunk on both sides (the CPU kernel then
    vectorises across channels) and enlarged: still transformers' results exactly."""
    processor = transformers.Mask2FormerImageProcessor()
    class_logits, mask_logits = _structured(9, queries=3 * CHUNK + 5, classes=2 * CHUNK + 7, size=(96, 96), peak=9.0)
    outputs = _outputs(class_logits, mask_logits)
    targets = [(97, 55), (500, 301)]
    kwargs = dict(input_size=(384, 384), target_sizes=targets)
    ref = processor.post_process_semantic_segmentation(outputs, target_sizes=targets, return_segmentation_scores=True)
    got = post_process_semantic(class_logits, mask_logits, return_scores=True, **kwargs)
    for r, o in zip(ref, got):
        assert torch.equal(o["segmentation"], r.segmentation)
        assert_float32_rounding(o["scores"], r.segmentation_scores, what="semantic scores")
    ref = processor.post_process_panoptic_segmentation(outputs, target_sizes=targets, label_ids_to_fuse=set(),
                                                       overlap_mask_area_threshold=0.3)
    got = post_process_panoptic(class_logits, mask_logits, overlap_mask_area_threshold=0.3, **kwargs)
    kept = (class_logits.softmax(-1).max(-1).values > 0.5).sum(1)
    assert (kept > 2 * CHUNK).all()
    for r, o in zip(ref, got):
        _assert_same_segments(o, r)
    ref = processor.post_process_instance_segmentation(outputs, threshold=0.2, target_sizes=targets)
    got = post_process_instance(class_logits, mask_logits, threshold=0.2, **kwargs)
    for r, o in zip(ref, got):
        assert len(o["segments_info"]) > CHUNK
        assert torch.equal(o["segmentation"], r["segmentation"].to(torch.int32))
        assert_segments_info_match(o["segments_info"], r["segments_info"])


def test_bad_model_and_threshold():
    class_logits, mask_logits = _random(0)
    for fn in (post_process_semantic, post_process_instance, post_process_panoptic):
        with pytest.raises(ValueError, match=r"model must be one of \('mask2former', 'oneformer'\), got 'maskformer'"):
            fn(class_logits, mask_logits, input_size=INPUT, model="maskformer")
    with pytest.raises(ValueError, match="threshold=None"):
        post_process_instance(class_logits, mask_logits, input_size=INPUT, threshold=None)
