"""Post-processing: parity with transformers 5.23 at 384x384 inputs, the valid-region geometry for padded
batches, panoptic fusion, and bad inputs.

transformers always upsamples mask logits to 384x384 and treats that canvas as the image; ours upsamples to
the padded input size and crops each image's valid region. For a 384x384 input with no padding the two are
the same computation: segmentation maps, ids and labels are compared exactly, scores at float32 rounding
(see tolerances.py: transformers' reductions may change their summation order between releases).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from maskformers.processing import post_process_instance, post_process_panoptic, post_process_semantic
from tolerances import assert_float32_rounding, assert_segments_info_match

transformers = pytest.importorskip("transformers")
pytest.importorskip("torchvision")
from transformers import Mask2FormerImageProcessor  # noqa: E402

HF = Mask2FormerImageProcessor()
INPUT = (384, 384)
TARGETS = [None, [(300, 400), (97, 55)], [(384, 384), (384, 384)]]  # last: resizing to the same size
TARGET_IDS = ["no-target", "targets", "same-size"]


def _random(seed: int, batch: int = 2, queries: int = 16, classes: int = 7):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, queries, classes + 1, generator=g) * 3, torch.randn(batch, queries, 96, 96, generator=g) * 4


def _structured(seed: int, batch: int = 2, queries: int = 24, classes: int = 5, size=(96, 96)):
    """Confident rectangles (so panoptic segments survive the overlap test) with peaked class logits."""
    g = torch.Generator().manual_seed(seed)
    h, w = size
    masks = torch.randn(batch, queries, h, w, generator=g) - 6
    for b in range(batch):
        for q in range(queries):
            y0, x0 = torch.randint(0, h - 8, (2,), generator=g).tolist()
            dy, dx = torch.randint(4, h // 2, (2,), generator=g).tolist()
            masks[b, q, y0 : y0 + dy, x0 : x0 + dx] += 12
    class_logits = torch.randn(batch, queries, classes + 1, generator=g)
    class_logits.scatter_(2, torch.randint(0, classes + 1, (batch, queries, 1), generator=g), 6.0)
    return class_logits, masks


def _outputs(class_logits, mask_logits):
    return SimpleNamespace(class_queries_logits=class_logits, masks_queries_logits=mask_logits)


# ----------------------------------------------------------------------------- parity at 384x384
@pytest.mark.parametrize("make", [_random, _structured])
@pytest.mark.parametrize("targets", TARGETS, ids=TARGET_IDS)
def test_semantic_matches_transformers(make, targets):
    for seed in range(2):
        class_logits, mask_logits = make(seed)
        ref = HF.post_process_semantic_segmentation(
            _outputs(class_logits, mask_logits), target_sizes=targets, return_segmentation_scores=True
        )
        ours = post_process_semantic(class_logits, mask_logits, input_size=INPUT, target_sizes=targets, return_scores=True)
        for r, o in zip(ref, ours):
            assert o["segmentation"].dtype == torch.int64
            assert torch.equal(o["segmentation"], r.segmentation)
            assert_float32_rounding(o["scores"], r.segmentation_scores, what="semantic scores")
        plain = post_process_semantic(class_logits, mask_logits, input_size=INPUT, target_sizes=targets)
        assert all(torch.equal(p, o["segmentation"]) for p, o in zip(plain, ours))


@pytest.mark.parametrize("make", [_random, _structured])
@pytest.mark.parametrize("targets", TARGETS[:2], ids=TARGET_IDS[:2])
@pytest.mark.parametrize("threshold", [0.0, 0.3, 0.8])
def test_instance_matches_transformers(make, targets, threshold):
    for seed in range(2):
        class_logits, mask_logits = make(seed)
        ref = HF.post_process_instance_segmentation(
            _outputs(class_logits, mask_logits), threshold=threshold, target_sizes=targets
        )
        ours = post_process_instance(class_logits, mask_logits, input_size=INPUT, target_sizes=targets, threshold=threshold)
        for r, o in zip(ref, ours):
            assert o["segmentation"].dtype == torch.int32 and "masks" not in o
            assert torch.equal(o["segmentation"], r["segmentation"].to(torch.int32))
            assert_segments_info_match(o["segments_info"], r["segments_info"])


@pytest.mark.parametrize("targets", TARGETS[:2], ids=TARGET_IDS[:2])
def test_instance_masks_match_transformers_binary_maps(targets):
    class_logits, mask_logits = _structured(5)
    ref = HF.post_process_instance_segmentation(
        _outputs(class_logits, mask_logits), threshold=0.3, target_sizes=targets, return_binary_maps=True
    )
    ours = post_process_instance(
        class_logits, mask_logits, input_size=INPUT, target_sizes=targets, threshold=0.3, return_masks=True
    )
    for r, o in zip(ref, ours):
        assert len(o["segments_info"]) > 1 and o["masks"].dtype == torch.bool
        assert torch.equal(o["masks"], r["segmentation"].bool())  # (N, H, W), overlaps kept
    empty = post_process_instance(class_logits, mask_logits, input_size=INPUT, threshold=1.1, return_masks=True)
    assert all(o["masks"].shape == (0, *INPUT) and (o["segmentation"] == -1).all() for o in empty)


@pytest.mark.parametrize("targets", TARGETS, ids=TARGET_IDS)
@pytest.mark.parametrize(
    "thresholds", [(0.5, 0.5, 0.8), (0.3, 0.5, 0.5), (0.2, 0.8, 0.3)], ids=lambda t: str(t)
)
def test_panoptic_matches_transformers(targets, thresholds):
    threshold, mask_threshold, overlap = thresholds
    segments = 0
    for seed in range(2):
        class_logits, mask_logits = _structured(seed)
        kwargs = dict(threshold=threshold, mask_threshold=mask_threshold, overlap_mask_area_threshold=overlap)
        ref = HF.post_process_panoptic_segmentation(
            _outputs(class_logits, mask_logits), target_sizes=targets, label_ids_to_fuse=set(), **kwargs
        )
        ours = post_process_panoptic(class_logits, mask_logits, input_size=INPUT, target_sizes=targets, **kwargs)
        for r, o in zip(ref, ours):
            assert o["segmentation"].dtype == torch.int32
            if r["segments_info"]:
                assert torch.equal(o["segmentation"], r["segmentation"])
            else:  # transformers fills -1 when no query passes; ours keeps "0 = unassigned"
                assert (o["segmentation"] == 0).all() and r["segmentation"].shape == o["segmentation"].shape
            assert_segments_info_match(o["segments_info"], r["segments_info"])
            segments += len(o["segments_info"])
    assert segments > 10  # the data must exercise real segments


def test_panoptic_fusion_matches_transformers_when_its_counter_is_not_reset():
    """transformers restarts its id counter at a fused id (so a later new segment can reuse an id that is
    taken) and lists a fused segment once per query. With the fused label's queries last among the kept
    ones neither issue arises: maps must agree, and its entries deduplicated by id must equal ours."""
    class_logits, mask_logits = _structured(7, batch=1, queries=12)
    class_logits[:] = -5.0
    labels = [0, 1, 2, 0, 1, 3, 3, 3, 3, 3, 3, 3]  # label 3 (fused) only at the end
    for q, label in enumerate(labels):
        class_logits[0, q, label] = 5.0
    ref = HF.post_process_panoptic_segmentation(
        _outputs(class_logits, mask_logits), label_ids_to_fuse={3}, overlap_mask_area_threshold=0.3
    )[0]
    ours = post_process_panoptic(
        class_logits, mask_logits, input_size=INPUT, label_ids_to_fuse={3}, overlap_mask_area_threshold=0.3
    )[0]
    first_by_id: dict[int, dict] = {}
    for entry in ref["segments_info"]:
        first_by_id.setdefault(entry["id"], entry)
    assert sum(e["label_id"] == 3 for e in ref["segments_info"]) >= 2  # fusion really happened
    assert torch.equal(ours["segmentation"], ref["segmentation"])
    assert_segments_info_match(ours["segments_info"], list(first_by_id.values()))


def _panoptic_reference(class_logits, mask_logits, fuse, threshold=0.5, mask_threshold=0.5, overlap=0.8):
    """Plain per-query loop over boolean masks (one image, no resizing), ids unique, fused labels share one."""
    probs = F.interpolate(mask_logits, size=INPUT, mode="bilinear", align_corners=False)[0].sigmoid()
    scores, labels = class_logits[0].softmax(-1).max(-1)
    keep = [q for q in range(len(scores)) if labels[q] != class_logits.shape[-1] - 1 and scores[q] > threshold]
    weighted = probs[keep] * scores[keep][:, None, None]
    winner = weighted.argmax(0)
    segmentation = torch.zeros(INPUT, dtype=torch.int32)
    info, fused = [], {}
    for k, q in enumerate(keep):
        mine = winner == k
        own = (weighted[k] >= mask_threshold).sum()
        if not (mine.sum() > 0 and own > 0 and (mine.sum() / own).item() > overlap):
            continue
        label = int(labels[q])
        if label in fused:
            segmentation[mine] = fused[label]
            continue
        info.append({"id": len(info) + 1, "label_id": label, "was_fused": label in fuse, "score": round(float(scores[q]), 6)})
        segmentation[mine] = len(info)
        if label in fuse:
            fused[label] = len(info)
    return segmentation, info


@pytest.mark.parametrize("seed", range(4))
def test_panoptic_fusion_gives_unique_ids(seed):
    class_logits, mask_logits = _structured(seed, batch=1, queries=30, classes=4)
    fuse = {1, 3}
    ours = post_process_panoptic(class_logits, mask_logits, input_size=INPUT, label_ids_to_fuse=fuse)[0]
    segmentation, info = _panoptic_reference(class_logits, mask_logits, fuse)
    assert torch.equal(ours["segmentation"], segmentation) and ours["segments_info"] == info
    ids = [e["id"] for e in info]
    assert ids == list(range(1, len(ids) + 1))
    assert set(ours["segmentation"].unique().tolist()) <= {0, *ids}
    assert len({e["label_id"] for e in info if e["was_fused"]}) == sum(e["was_fused"] for e in info)


def test_instance_score_is_class_probability_times_mean_mask_probability():
    class_logits, mask_logits = _structured(3, batch=1, queries=6, classes=3)
    out = post_process_instance(class_logits, mask_logits, input_size=INPUT, threshold=0.0)[0]
    logits = F.interpolate(mask_logits.double(), size=INPUT, mode="bilinear", align_corners=False)[0]
    class_probs = class_logits[0].double().softmax(-1)[:, :-1]
    expected = set()
    for q in range(6):
        inside = logits[q] > 0
        if inside.any():
            mean_prob = logits[q].sigmoid()[inside].mean()
            for c in range(3):
                expected.add((c, round(float(class_probs[q, c] * mean_prob), 4)))
    got = {(e["label_id"], round(e["score"], 4)) for e in out["segments_info"]}
    assert len(out["segments_info"]) == 6 and got <= expected


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_logits_are_processed_in_float32(dtype):
    class_logits, mask_logits = (t.to(dtype) for t in _structured(2, batch=1, queries=10))
    exact = (class_logits.float(), mask_logits.float())
    kwargs = dict(input_size=INPUT, target_sizes=[(200, 300)])
    for fn in (post_process_semantic, post_process_instance, post_process_panoptic):
        half, full = fn(class_logits, mask_logits, **kwargs)[0], fn(*exact, **kwargs)[0]
        if isinstance(half, torch.Tensor):
            assert torch.equal(half, full)
        else:
            assert torch.equal(half["segmentation"], full["segmentation"])
            assert half["segments_info"] == full["segments_info"]


# ----------------------------------------------------------------------------- geometry of padded batches
CANVAS = (128, 192)  # padded input; mask logits are (32, 48)
VALID = [(128, 192), (64, 96)]  # resized sizes inside the canvas
ORIGINAL = [(256, 384), (100, 150)]
RECT = (0.25, 0.75, 0.5, 1.0)  # rows [top, bottom), cols [left, right) as fractions of the image


def _rectangle_outputs():
    """Query 0 (class 1) covers RECT of each image's valid region, query 1 (class 0) the rest of it. The
    padding holds logit 0 for both (undecided), so the upsampling blends it into the border pixels without
    flipping any decision."""
    mask_logits = torch.zeros((2, 2, 32, 48))
    for b, (h, w) in enumerate(VALID):
        ch, cw = h // 4, w // 4
        rect = torch.zeros(ch, cw, dtype=torch.bool)
        rect[int(RECT[0] * ch) : int(RECT[1] * ch), int(RECT[2] * cw) : int(RECT[3] * cw)] = True
        mask_logits[b, 0, :ch, :cw] = torch.where(rect, 10.0, -10.0)
        mask_logits[b, 1, :ch, :cw] = torch.where(rect, -10.0, 10.0)
    class_logits = torch.full((2, 2, 3), -10.0)
    class_logits[:, 0, 1] = 10.0
    class_logits[:, 1, 0] = 10.0
    return class_logits, mask_logits


def _expected_rectangle(size):
    h, w = size
    out = torch.zeros(size, dtype=torch.bool)
    out[round(RECT[0] * h) : round(RECT[1] * h), round(RECT[2] * w) : round(RECT[3] * w)] = True
    return out


def _assert_rectangle(found: torch.Tensor, size) -> None:
    expected = _expected_rectangle(size)
    # straight edges land on the boundary; bilinear interpolation rounds the corners off by a few pixels:
    # compare everywhere except within 3 pixels of the rectangle's outline
    grown = F.max_pool2d(expected[None, None].float(), 7, 1, 3)[0, 0]
    shrunk = -F.max_pool2d(-expected[None, None].float(), 7, 1, 3)[0, 0]
    near_edge = grown != shrunk
    assert (~near_edge).sum() > 0.8 * expected.numel()
    assert torch.equal(found[~near_edge], expected[~near_edge]), size


def _iou(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a & b).sum()) / float((a | b).sum())


def test_semantic_geometry_uses_each_valid_region():
    class_logits, mask_logits = _rectangle_outputs()
    maps = post_process_semantic(class_logits, mask_logits, input_size=CANVAS, image_sizes=VALID, target_sizes=ORIGINAL)
    for m, size in zip(maps, ORIGINAL):
        assert m.shape == size
        _assert_rectangle(m == 1, size)
    # the transformers way (resize the whole padded canvas) puts the small image's rectangle elsewhere
    canvas_scores = torch.einsum(
        "qc,qhw->chw", class_logits[1].softmax(-1)[:, :-1],
        F.interpolate(mask_logits[1:], size=CANVAS, mode="bilinear", align_corners=False)[0].sigmoid(),
    )
    naive = F.interpolate(canvas_scores[None], size=ORIGINAL[1], mode="bilinear", align_corners=False)[0].argmax(0)
    assert _iou(naive == 1, _expected_rectangle(ORIGINAL[1])) < 0.5


def test_instance_and_panoptic_geometry_use_each_valid_region():
    class_logits, mask_logits = _rectangle_outputs()
    kwargs = dict(input_size=CANVAS, image_sizes=VALID, target_sizes=ORIGINAL)
    for result, size in zip(post_process_instance(class_logits, mask_logits, threshold=0.5, **kwargs), ORIGINAL):
        labels = {e["id"]: e["label_id"] for e in result["segments_info"]}
        assert sorted(labels.values()) == [0, 1]
        rect_id = next(i for i, label in labels.items() if label == 1)
        _assert_rectangle(result["segmentation"] == rect_id, size)
        assert (result["segmentation"] >= 0).all()  # the two queries tile the image
    for result, size in zip(post_process_panoptic(class_logits, mask_logits, **kwargs), ORIGINAL):
        labels = {e["id"]: e["label_id"] for e in result["segments_info"]}
        assert sorted(labels.values()) == [0, 1]
        rect_id = next(i for i, label in labels.items() if label == 1)
        _assert_rectangle(result["segmentation"] == rect_id, size)
        assert (result["segmentation"] > 0).all()


def test_default_target_is_the_valid_size():
    class_logits, mask_logits = _rectangle_outputs()
    kwargs = dict(input_size=CANVAS, image_sizes=torch.tensor(VALID))
    for fn in (post_process_semantic, post_process_instance, post_process_panoptic):
        results = fn(class_logits, mask_logits, **kwargs)
        shapes = [tuple((r if isinstance(r, torch.Tensor) else r["segmentation"]).shape) for r in results]
        assert shapes == VALID, fn.__name__
    full = post_process_semantic(class_logits, mask_logits, input_size=CANVAS)
    assert [tuple(m.shape) for m in full] == [CANVAS, CANVAS]


def test_processor_and_post_processing_round_trip_a_drawn_rectangle():
    """Images of different sizes and aspect ratios, each with a white rectangle on black, go through the
    ImageProcessor; "mask logits" made by pooling pixel_values to 1/4 must map the rectangle back onto the
    same pixels of every original image."""
    import numpy as np

    from maskformers.processing import ImageProcessor

    originals = [(240, 320), (300, 140), (90, 200)]
    boxes = [(60, 180, 100, 300), (30, 120, 20, 100), (45, 90, 0, 80)]  # top, bottom, left, right
    images, expected = [], []
    for (h, w), (top, bottom, left, right) in zip(originals, boxes):
        image = np.zeros((h, w, 3), np.uint8)
        image[top:bottom, left:right] = 255
        images.append(image)
        expected.append(torch.from_numpy(image[..., 0] > 0))
    batch = ImageProcessor(size={"shortest_edge": 128, "longest_edge": 256}, size_divisor=32)(images)
    assert len(set(map(tuple, batch["image_sizes"].tolist()))) == 3  # three different valid regions
    pooled = F.avg_pool2d(batch["pixel_values"][:, :1], 4)  # (B, 1, H/4, W/4): >0 white, <0 black, 0 padding
    mask_logits = torch.cat([5 * pooled, -5 * pooled], dim=1)  # query 0: the rectangle, query 1: the rest
    class_logits = torch.tensor([[10.0, -10.0, -10.0], [-10.0, 10.0, -10.0]]).expand(3, 2, 3)  # q0 -> class 0
    kwargs = dict(
        input_size=batch["pixel_values"].shape[-2:], image_sizes=batch["image_sizes"], target_sizes=batch["original_sizes"]
    )
    semantic = post_process_semantic(class_logits, mask_logits, **kwargs)
    panoptic = post_process_panoptic(class_logits, mask_logits, **kwargs)
    for sem, pan, want in zip(semantic, panoptic, expected):
        assert sem.shape == want.shape
        rect_id = next(e["id"] for e in pan["segments_info"] if e["label_id"] == 0)
        for found in (sem == 0, pan["segmentation"] == rect_id):
            grown = F.max_pool2d(want[None, None].float(), 7, 1, 3)[0, 0].bool()
            shrunk = ~F.max_pool2d((~want)[None, None].float(), 7, 1, 3)[0, 0].bool()
            assert found[shrunk].all() and not found[~grown].any()  # right within 3 pixels of the outline
            assert _iou(found, want) > 0.95


# ----------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize("fn", [post_process_semantic, post_process_instance, post_process_panoptic])
def test_bad_inputs_raise(fn):
    cls, masks = torch.zeros(2, 5, 4), torch.zeros(2, 5, 8, 8)
    cases = [
        ((cls[0], masks), {}, r"class_logits \(B, Q, K\+1\)"),
        ((cls, masks[0]), {}, r"mask_logits \(B, Q, h, w\)"),
        ((cls[:1], masks), {}, "disagree on B or Q"),
        ((cls[:, :4], masks), {}, "disagree on B or Q"),
        ((cls[..., :1], masks), {}, "K >= 1"),
        ((cls.long(), masks), {}, "floating point"),
        ((cls, masks), {"target_sizes": [(10, 10)]}, "expected 2 target_sizes"),
        ((cls, masks), {"image_sizes": [(10, 10)] * 3}, "expected 2 image_sizes"),
        ((cls, masks), {"image_sizes": [(10, 10), (40, 10)]}, r"exceed the padded input_size \(32, 32\)"),
        ((cls, masks), {"target_sizes": [(10, 0), (3, 3)]}, "positive"),
        ((cls, masks), {"target_sizes": torch.zeros(2, 3)}, r"target_sizes \(2, 2\)"),
    ]
    for args, kwargs, message in cases:
        with pytest.raises((ValueError, TypeError), match=message):
            fn(*args, input_size=(32, 32), **kwargs)
    with pytest.raises(ValueError, match="input_size"):
        fn(cls, masks, input_size=(0, 32))
    with pytest.raises(TypeError, match="input_size"):
        fn(cls, masks, input_size=32)
    with pytest.raises(TypeError, match="image_sizes"):
        fn(cls, masks, input_size=(32, 32), image_sizes=[None, None])
