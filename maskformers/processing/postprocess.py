"""Semantic, instance and panoptic segmentation from the raw head outputs of Mask2Former and OneFormer.

Inputs are plain tensors: ``class_logits`` (B, Q, K+1) (last column = "no object") and ``mask_logits``
(B, Q, h, w) at 1/4 of the padded input size ``input_size`` = (H, W); image i fills the top-left
``image_sizes[i]`` of the input and is wanted at ``target_sizes[i]`` (default: its valid size);
float16/bfloat16 logits are processed in float32. ``model`` picks the rules of one model family:

- ``"mask2former"``: the geometry of the original detectron2 code (``resample.MapGeometry`` with
  ``at_input``): mask logits upsampled to the padded input, the image cropped, resized to the target.
  transformers instead upsamples to a hard-coded 384x384 and resizes that canvas, padding included; for a
  384x384 input with no padding both are the same computation, which is how the parity tests check it.
- ``"oneformer"``: transformers' OneFormer rules: no upsampling to the input (no 384 step); sigmoid and the
  semantic class mixture at mask resolution, then one antialiased bilinear resize to the target, of the part
  of the mask grid covering the image (transformers resizes the whole grid: padded batches differ on
  purpose, unpadded images are the same call). Instance segmentation is its own algorithm (below).

The rules per task (both models unless said):

- semantic: per-pixel class scores ``sum_q softmax(class)[q, :K] * sigmoid(mask)[q]``, resized, argmax;
- instance, Mask2Former: the top-Q (query, class) pairs by class probability; score = class probability x
  mean mask probability inside the mask (logit > 0); kept when score >= ``threshold``; masks binarized, then
  nearest-resized; ids 0, 1, ... in top-k order, -1 = no instance, later instances drawn over earlier ones;
- instance, OneFormer: the top-Q (query, class) pairs, kept when the class probability > ``threshold``
  (``None``: all, transformers' ``is_demo=False``), then segments decided as in panoptic but from the raw
  mask *logits* weighted by the class probability (transformers' rule); ids from 1, 0 = none;
- panoptic: queries whose best class is an object with probability > ``threshold``; mask probabilities
  resized to the target, weighted by the class probability, argmax over queries; a query becomes a segment
  when it wins some pixels and those are > ``overlap_mask_area_threshold`` of its own weighted-probability
  >= ``mask_threshold`` area. Segment ids from 1; 0 = unassigned (also when nothing is kept, where
  transformers fills -1); fused labels share one id and one entry (transformers can reuse ids there).

``thing_ids`` (instance) keeps only pairs with those labels: transformers' OneFormer filter when instances
are read from a panoptic-task prediction (``ClassInfo.thing_ids``, see ``processing.class_info``).

Memory grows with the target only through the maps returned and a few target-size buffers: everything that
reaches target size is resized and reduced ``resample.CHUNK`` queries or classes at a time.

On a GPU the work stays on the device and the host waits for it at most twice per call, whatever the batch
size: once for how many candidates each image keeps (instance and panoptic; the kept ones are then gathered
with indices computed on the device), once at the end for the segment lists. Semantic segmentation never
waits. Segment ids and fusion are decided on the device too.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from .resample import MapGeometry, RunningArgmax, chunks, valid_region_logits

__all__ = ["post_process_instance", "post_process_panoptic", "post_process_semantic", "valid_region_logits"]

Sizes = Sequence[Sequence[int]] | torch.Tensor
MODELS = ("mask2former", "oneformer")


def _size_list(name: str, sizes: Sizes, batch: int) -> list[tuple[int, int]]:
    if isinstance(sizes, torch.Tensor):
        if sizes.dim() != 2 or sizes.shape[1] != 2:
            raise ValueError(f"expected {name} ({batch}, 2), got shape {tuple(sizes.shape)}")
        sizes = sizes.tolist()
    try:
        sizes = [tuple(int(v) for v in s) for s in sizes]
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be (height, width) pairs of ints, got {sizes!r}") from None
    if len(sizes) != batch:
        raise ValueError(f"expected {batch} {name} (one per image), got {len(sizes)}")
    if any(len(s) != 2 or s[0] < 1 or s[1] < 1 for s in sizes):
        raise ValueError(f"{name} must be positive (height, width) pairs, got {sizes}")
    return sizes  # type: ignore[return-value]


def _check(
    class_logits: torch.Tensor,
    mask_logits: torch.Tensor,
    input_size: Sequence[int],
    image_sizes: Sizes | None,
    target_sizes: Sizes | None,
    model: str,
) -> list[MapGeometry]:
    """Validate the shared arguments; one geometry per image."""
    if not isinstance(class_logits, torch.Tensor) or class_logits.dim() != 3:
        raise ValueError(f"expected class_logits (B, Q, K+1), got {getattr(class_logits, 'shape', type(class_logits))}")
    if not isinstance(mask_logits, torch.Tensor) or mask_logits.dim() != 4:
        raise ValueError(f"expected mask_logits (B, Q, h, w), got {getattr(mask_logits, 'shape', type(mask_logits))}")
    if class_logits.shape[:2] != mask_logits.shape[:2]:
        raise ValueError(
            f"class_logits (B, Q, K+1) {tuple(class_logits.shape)} and mask_logits (B, Q, h, w) "
            f"{tuple(mask_logits.shape)} disagree on B or Q"
        )
    if class_logits.shape[2] < 2:
        raise ValueError(f"class_logits needs K >= 1 classes plus 'no object', got K+1={class_logits.shape[2]}")
    if not (class_logits.is_floating_point() and mask_logits.is_floating_point()):
        raise TypeError(f"logits must be floating point, got {class_logits.dtype} and {mask_logits.dtype}")
    if model not in MODELS:
        raise ValueError(f"model must be one of {MODELS}, got {model!r}")
    (input_size,) = _size_list("input_size", [input_size], 1)
    batch = class_logits.shape[0]
    images = [input_size] * batch if image_sizes is None else _size_list("image_sizes", image_sizes, batch)
    outside = [s for s in images if s[0] > input_size[0] or s[1] > input_size[1]]
    if outside:
        raise ValueError(f"image_sizes {outside} exceed the padded input_size {input_size}")
    targets = images if target_sizes is None else _size_list("target_sizes", target_sizes, batch)
    return [
        MapGeometry(input_size=input_size, image_size=image, target=target, at_input=model == "mask2former")
        for image, target in zip(images, targets)
    ]


def _at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """float16/bfloat16 -> float32: thresholds, areas and argmaxes should not hinge on 8-bit mantissas."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def post_process_semantic(
    class_logits: torch.Tensor,
    mask_logits: torch.Tensor,
    *,
    input_size: Sequence[int],
    image_sizes: Sizes | None = None,
    target_sizes: Sizes | None = None,
    return_scores: bool = False,
    model: str = "mask2former",
) -> list[torch.Tensor] | list[dict[str, torch.Tensor]]:
    """Per image a (H_t, W_t) int64 class map; with ``return_scores`` a dict with it as ``segmentation``
    and the (K, H_t, W_t) class scores as ``scores``."""
    geometries = _check(class_logits, mask_logits, input_size, image_sizes, target_sizes, model)
    class_logits, mask_logits = _at_least_float32(class_logits), _at_least_float32(mask_logits)
    class_probs = class_logits.softmax(dim=-1)[..., :-1]  # (B, Q, K)
    num_classes = class_probs.shape[-1]
    results: list[Any] = []
    for i, geometry in enumerate(geometries):
        mask_probs = geometry.working(mask_logits[i]).sigmoid()  # (Q, h', w')
        scores = torch.einsum("qc,qhw->chw", class_probs[i], mask_probs)  # (K, h', w')
        del mask_probs
        all_scores = torch.empty((num_classes, *geometry.target), device=scores.device) if return_scores else None
        argmax = RunningArgmax()
        for part, resized in geometry.chunked(num_classes, lambda part: scores[part]):
            if all_scores is not None:
                all_scores[part] = resized
            argmax.update(resized, part.start)
            del resized  # before the next chunk is made
        segmentation = argmax.index
        results.append({"segmentation": segmentation, "scores": all_scores} if return_scores else segmentation)
    return results


def _to_host(tensors: Sequence[torch.Tensor]) -> list[list[float]]:
    """The values of several small tensors as Python lists, in one device-to-host copy (one wait for the GPU).

    Every value is carried as float64: exact for the float32 scores, the labels and the counts here."""
    if not tensors:
        return []
    flat = torch.cat([t.flatten().to(torch.float64) for t in tensors]).tolist()
    out, start = [], 0
    for t in tensors:
        out.append(flat[start : start + t.numel()])
        start += t.numel()
    return out


def _kept_first(keep: torch.Tensor) -> torch.Tensor:
    """A permutation of 0 .. n-1 that lists the True entries of ``keep`` (n,) first, each part in order: with
    the count of True entries known, its head is ``nonzero()`` computed without the host waiting for it."""
    return torch.argsort(keep.logical_not().to(torch.uint8), stable=True)


def _label_table(labels: Iterable[int] | None, num_classes: int, device: torch.device) -> torch.Tensor | None:
    """(K+1,) bool lookup table of a label set (labels outside [0, K] never match), or None for no set."""
    if labels is None:
        return None
    table = torch.zeros(num_classes + 1, dtype=torch.bool)
    table[[label for label in labels if 0 <= label <= num_classes]] = True
    return table.to(device, non_blocking=True)


def _count_at_least(maps: torch.Tensor, threshold: float, buffer: torch.Tensor) -> torch.Tensor:
    """(c, H, W) -> (c,) int64 counts of values >= threshold, one plane at a time through ``buffer`` (H, W)
    bool: a (c, H, W) comparison summed at once would make a (c, H, W) int64 copy."""
    return torch.stack([torch.count_nonzero(torch.ge(plane, threshold, out=buffer)) for plane in maps])


def _occurrences(index: torch.Tensor, count: int) -> torch.Tensor:
    """(count,) int64: how often each of 0 .. count-1 occurs in ``index`` (CUDA's ``bincount`` would first
    read the maximum on the host)."""
    flat = index.flatten()
    ones = torch.ones((), dtype=torch.int64, device=index.device).expand(flat.shape)
    return torch.zeros(count, dtype=torch.int64, device=index.device).scatter_add_(0, flat, ones)


def _segments(
    geometry: MapGeometry,
    make_maps: Callable[[slice], torch.Tensor],
    scores: torch.Tensor,
    labels: torch.Tensor,
    *,
    mask_threshold: float,
    overlap_mask_area_threshold: float,
    fuse: torch.Tensor | None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Non-overlapping segments from N candidate maps (``make_maps(part)`` -> fresh working-resolution maps
    of candidates ``part``): each pixel goes to the candidate with the largest score-weighted map; a
    candidate becomes a segment when it keeps > ``overlap_mask_area_threshold`` of its own weighted map >=
    ``mask_threshold``. Candidates whose label is in the ``fuse`` table share the id of the first segment
    of their label. Returns the (H_t, W_t) int32 map (ids from 1, 0 = none) and, per candidate, on the
    device: ``labels``, ``scores``, ``new`` (it opens a segment entry) and ``fused`` (its label is fused)."""
    n = len(scores)
    argmax = RunningArgmax()
    own_area = torch.empty(n, dtype=torch.int64, device=scores.device)
    above = torch.empty(geometry.target, dtype=torch.bool, device=scores.device)  # reused for every plane
    for part, weighted in geometry.chunked(n, make_maps):  # (c, H_t, W_t)
        weighted *= scores[part, None, None]
        own_area[part] = _count_at_least(weighted, mask_threshold, above)
        argmax.update(weighted, part.start)
        del weighted
    winner = argmax.index  # (H_t, W_t) index into the candidates
    area = _occurrences(winner, n)
    ratio = torch.true_divide(area, own_area).double()  # float32 ratio compared in float64, as a Python float
    is_segment = (area > 0) & (own_area > 0) & (ratio > overlap_mask_area_threshold)

    # ids in candidate order; a fused candidate takes the id of the first segment with its label
    fused = fuse[labels] if fuse is not None else torch.zeros_like(is_segment)
    same_label = (labels[:, None] == labels[None, :]) & is_segment[None, :]  # (N, N): j is a segment of k's label
    first = same_label.to(torch.uint8).argmax(dim=1)  # the first such j (k itself when k is a segment)
    new = is_segment & (fused.logical_not() | (first == torch.arange(n, device=first.device)))
    entry = torch.cumsum(new, dim=0)  # the id of a new entry
    segment_of = torch.where(fused, entry[first], entry).masked_fill_(is_segment.logical_not(), 0)
    decided = {"labels": labels, "scores": scores, "new": new, "fused": fused}
    return segment_of.to(torch.int32)[winner], decided


_DECIDED = ("labels", "scores", "new", "fused")


def _segment_infos(values: Sequence[list[float]]) -> list[dict[str, Any]]:
    """Segment entries from the host copy of ``_segments``' decisions (lists in ``_DECIDED`` order)."""
    info: list[dict[str, Any]] = []
    for label, score, new, fused in zip(*values):
        if new:
            info.append({"id": len(info) + 1, "label_id": int(label), "was_fused": bool(fused),
                         "score": round(score, 6)})
    return info


def post_process_panoptic(
    class_logits: torch.Tensor,
    mask_logits: torch.Tensor,
    *,
    input_size: Sequence[int],
    image_sizes: Sizes | None = None,
    target_sizes: Sizes | None = None,
    threshold: float = 0.5,
    mask_threshold: float = 0.5,
    overlap_mask_area_threshold: float = 0.8,
    label_ids_to_fuse: Iterable[int] | None = None,
    model: str = "mask2former",
) -> list[dict[str, Any]]:
    """Per image ``{"segmentation": (H_t, W_t) int32 segment ids (0 = unassigned), "segments_info":
    [{"id", "label_id", "was_fused", "score"}]}``; all segments of a label in ``label_ids_to_fuse`` share
    one id (and one entry, with the first segment's score). OneFormer's original code fuses every stuff
    class (``ClassInfo.stuff_ids``)."""
    geometries = _check(class_logits, mask_logits, input_size, image_sizes, target_sizes, model)
    class_logits, mask_logits = _at_least_float32(class_logits), _at_least_float32(mask_logits)
    num_classes = class_logits.shape[2] - 1
    fuse = _label_table(() if label_ids_to_fuse is None else [int(v) for v in label_ids_to_fuse], num_classes,
                        mask_logits.device)
    all_scores, all_labels = class_logits.softmax(dim=-1).max(dim=-1)  # (B, Q) each
    keep = (all_labels != num_classes) & (all_scores > threshold)  # (B, Q)
    (counts,) = _to_host([keep.sum(dim=1)])  # the one wait before the maps
    segmentations, decisions = [], []
    for i, geometry in enumerate(geometries):
        if not counts[i]:
            segmentations.append(torch.zeros(geometry.target, dtype=torch.int32, device=mask_logits.device))
            continue
        kept = _kept_first(keep[i])[: int(counts[i])]
        kept_logits = mask_logits[i].index_select(0, kept)  # (N, h, w)
        segmentation, decided = _segments(
            geometry, lambda part: geometry.working(kept_logits[part]).sigmoid(), all_scores[i, kept],
            all_labels[i, kept], mask_threshold=mask_threshold,
            overlap_mask_area_threshold=overlap_mask_area_threshold, fuse=fuse,
        )
        segmentations.append(segmentation)
        decisions.append(decided)
    values = iter(_to_host([d[name] for d in decisions for name in _DECIDED]))  # the one wait after
    return [
        {"segmentation": segmentation,
         "segments_info": _segment_infos([next(values) for _ in _DECIDED]) if counts[i] else []}
        for i, segmentation in enumerate(segmentations)
    ]


def _top_pairs(class_logits: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """One image's top-Q (query, class) pairs by class probability, in ``topk(sorted=False)`` order as
    transformers takes them: (scores, labels, queries)."""
    num_queries, num_classes = class_logits.shape[0], class_logits.shape[1] - 1
    class_probs = class_logits.softmax(dim=-1)[:, :-1]  # (Q, K)
    scores, index = class_probs.flatten().topk(num_queries, sorted=False)
    return scores, index % num_classes, index // num_classes


def post_process_instance(
    class_logits: torch.Tensor,
    mask_logits: torch.Tensor,
    *,
    input_size: Sequence[int],
    image_sizes: Sizes | None = None,
    target_sizes: Sizes | None = None,
    threshold: float | None = 0.5,
    return_masks: bool = False,
    model: str = "mask2former",
    thing_ids: Iterable[int] | None = None,
    mask_threshold: float = 0.5,
    overlap_mask_area_threshold: float = 0.8,
) -> list[dict[str, Any]]:
    """Per image ``{"segmentation": (H_t, W_t) int32 instance ids, "segments_info": [{"id", "label_id",
    "was_fused", "score"}], "masks": (N, H_t, W_t) bool (with return_masks)}``. Mask2Former: ids from 0,
    -1 = none, masks may overlap. OneFormer: ids from 1, 0 = none, masks are the segments (no overlap);
    ``mask_threshold`` and ``overlap_mask_area_threshold`` apply to OneFormer only."""
    geometries = _check(class_logits, mask_logits, input_size, image_sizes, target_sizes, model)
    class_logits, mask_logits = _at_least_float32(class_logits), _at_least_float32(mask_logits)
    if threshold is None and model == "mask2former":
        raise ValueError("threshold=None (keep every top-k pair) is OneFormer's is_demo=False; use threshold=0.0")
    things = _label_table(None if thing_ids is None else [int(v) for v in thing_ids], class_logits.shape[2] - 1,
                          mask_logits.device)
    if model == "oneformer":
        return _instance_oneformer(class_logits, mask_logits, geometries, threshold, things, mask_threshold,
                                   overlap_mask_area_threshold, return_masks)
    return _instance_mask2former(class_logits, mask_logits, geometries, threshold, things, return_masks)


def _kept_candidates(image_candidates, batch: int, things) -> tuple[list[tuple[torch.Tensor, ...]], list[float]]:
    """Per image, ``image_candidates(i)`` -> (scores, labels, queries, keep) of its top pairs; pairs whose
    label is not in ``things`` (when given) are dropped too. Returns each image's (scores, labels, queries)
    with the kept pairs first, in order, and how many are kept, read with one wait for all images."""
    pairs, kept = [], []
    for i in range(batch):
        scores, labels, queries, keep = image_candidates(i)
        if things is not None:
            keep = keep & things[labels]
        order = _kept_first(keep)
        pairs.append((scores[order], labels[order], queries[order]))
        kept.append(keep.sum())
    counts = _to_host([torch.stack(kept)])[0] if kept else []
    return pairs, counts


def _instance_oneformer(class_logits, mask_logits, geometries, threshold, things, mask_threshold, overlap,
                        return_masks):
    def image_candidates(i):
        scores, labels, queries = _top_pairs(class_logits[i])
        keep = torch.ones_like(scores, dtype=torch.bool) if threshold is None else scores > threshold
        return scores, labels, queries, keep

    pairs, counts = _kept_candidates(image_candidates, len(geometries), things)
    segmentations, decisions = [], []
    for i, geometry in enumerate(geometries):
        n = int(counts[i])
        if not n:
            segmentations.append(torch.zeros(geometry.target, dtype=torch.int32, device=mask_logits.device))
            continue
        scores, labels, queries = (t[:n] for t in pairs[i])
        image_logits = mask_logits[i]
        segmentation, decided = _segments(
            geometry, lambda part: geometry.working(image_logits.index_select(0, queries[part])), scores, labels,
            mask_threshold=mask_threshold, overlap_mask_area_threshold=overlap, fuse=None,
        )
        segmentations.append(segmentation)
        decisions.append(decided)
    values = iter(_to_host([d[name] for d in decisions for name in _DECIDED]))  # the one wait after
    results = []
    for i, segmentation in enumerate(segmentations):
        info = _segment_infos([next(values) for _ in _DECIDED]) if counts[i] else []
        result = {"segmentation": segmentation, "segments_info": info}
        if return_masks:
            ids = torch.arange(1, len(info) + 1, dtype=torch.int32, device=segmentation.device)
            result["masks"] = segmentation[None] == ids[:, None, None]
        results.append(result)
    return results


def _draw_instances(
    geometry: MapGeometry, binary: torch.Tensor, keep_masks: bool
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Draw N binary masks (N, h_i, w_i), nearest-resized to the target, later over earlier, with ids
    0, 1, ... counting only the masks still present at the target size (a tiny mask can vanish when shrunk).
    Returns the (H_t, W_t) int32 map (-1 = none), the (N,) present flags and, if asked, the resized masks."""
    target = geometry.target
    segmentation = torch.full(target, -1, dtype=torch.int32, device=binary.device)
    drawn = torch.zeros((), dtype=torch.int32, device=binary.device)  # masks present so far
    present_parts, mask_parts = [], []
    for part in chunks(len(binary)):
        masks = binary[part]
        if tuple(masks.shape[-2:]) != target:
            masks = F.interpolate(masks.unsqueeze(0).to(torch.uint8), size=target, mode="nearest")[0].bool()
        present = masks.flatten(1).any(1)
        ids = drawn + torch.cumsum(present, 0, dtype=torch.int32) - 1  # an absent mask draws nothing
        for k, mask in enumerate(masks):
            torch.where(mask, ids[k], segmentation, out=segmentation)
        drawn = drawn + present.sum(dtype=torch.int32)
        present_parts.append(present)
        if keep_masks:
            mask_parts.append(masks)
    present = torch.cat(present_parts) if present_parts else torch.zeros(0, dtype=torch.bool, device=binary.device)
    return segmentation, present, mask_parts


def _instance_mask2former(class_logits, mask_logits, geometries, threshold, things, return_masks):
    def image_candidates(i):  # score = class probability x mean mask probability inside the mask
        top_scores, labels, queries = _top_pairs(class_logits[i])
        logits = geometries[i].working(mask_logits[i])  # (Q, h_i, w_i) at input resolution
        binary = logits > 0
        mask_probs = logits.sigmoid_().flatten(1).mul_(binary.flatten(1))  # logits no longer needed: in place
        mask_scores = mask_probs.sum(1) / (binary.flatten(1).sum(1) + 1e-6)  # (Q,)
        scores = top_scores * mask_scores[queries]
        return scores, labels, queries, scores.double() >= threshold  # compared as Python floats, like transformers

    pairs, counts = _kept_candidates(image_candidates, len(geometries), things)
    drawn = []
    for i, geometry in enumerate(geometries):
        n = int(counts[i])
        scores, labels, queries = (t[:n] for t in pairs[i])
        # the kept masks only, at input resolution again (each query's map does not depend on the others)
        if n:
            binary = geometry.working(mask_logits[i].index_select(0, queries)) > 0  # (N, h_i, w_i)
        else:
            binary = torch.zeros((0, *geometry.image_size), dtype=torch.bool, device=mask_logits.device)
        drawn.append((scores, labels, *_draw_instances(geometry, binary, return_masks)))
    values = iter(_to_host([t for scores, labels, _, present, _ in drawn for t in (present, labels, scores)]))
    results = []
    for scores, labels, segmentation, present, mask_parts in drawn:
        flags, label_values, score_values = next(values), next(values), next(values)
        info = [
            {"id": n, "label_id": int(label), "was_fused": False, "score": round(score, 6)}
            for n, (label, score) in enumerate(
                (label, score) for flag, label, score in zip(flags, label_values, score_values) if flag
            )
        ]
        result = {"segmentation": segmentation, "segments_info": info}
        if return_masks:
            masks = torch.cat(mask_parts) if mask_parts else present.new_zeros((0, *segmentation.shape))
            result["masks"] = masks.index_select(0, _kept_first(present)[: len(info)])
        results.append(result)
    return results
