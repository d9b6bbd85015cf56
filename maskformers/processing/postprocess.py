"""Mask2Former post-processing: semantic, instance and panoptic segmentation from the raw head outputs.

Inputs are plain tensors: ``class_logits`` (B, Q, K+1) (last column = "no object") and ``mask_logits``
(B, Q, h, w) at 1/4 of the padded input size ``input_size`` = (H, W); float16/bfloat16 logits are
processed in float32.

Geometry (that of the original detectron2 Mask2Former): the mask logits are upsampled bilinearly to the
padded input size, each image's valid region ``image_sizes[i]`` = (h_i, w_i) (top-left, the rest is padding)
is cropped, and the result is resized to ``target_sizes[i]`` (usually the original image size; default: the
valid size). transformers instead upsamples to a hard-coded 384x384 and resizes that whole canvas, padding
included; for a 384x384 input with no padding both agree exactly, which is how
tests/test_processing_postprocess.py checks parity. Within that geometry each task follows transformers'
order of operations and thresholds:

- semantic: per-pixel class scores ``sum_q softmax(class)[q, :K] * sigmoid(mask)[q]`` on the valid region,
  bilinearly resized to the target, then argmax;
- instance: the top-Q (query, class) pairs by class probability; score = class probability x mean mask
  probability inside the mask (logit > 0); masks binarized, then nearest-resized; ids 0, 1, ... in top-k
  order, -1 = no instance, later instances drawn over earlier ones;
- panoptic: queries whose best class is an object with probability > ``threshold``; mask probabilities
  resized to the target, weighted by the class probability, argmax over queries; a query becomes a segment
  when it wins some pixels and those are > ``overlap_mask_area_threshold`` of its own weighted-probability
  >= ``mask_threshold`` area. Segment ids from 1; 0 = unassigned.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["post_process_instance", "post_process_panoptic", "post_process_semantic", "valid_region_logits"]

Sizes = Sequence[Sequence[int]] | torch.Tensor


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
) -> tuple[tuple[int, int], list[tuple[int, int]], list[tuple[int, int]]]:
    """Validate the shared arguments; returns (input_size, image_sizes, target_sizes) as int tuples.
    Half-precision logits are computed on in float32 by the callers (``_at_least_float32``)."""
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
    (input_size,) = _size_list("input_size", [input_size], 1)
    batch = class_logits.shape[0]
    images = [input_size] * batch if image_sizes is None else _size_list("image_sizes", image_sizes, batch)
    outside = [s for s in images if s[0] > input_size[0] or s[1] > input_size[1]]
    if outside:
        raise ValueError(f"image_sizes {outside} exceed the padded input_size {input_size}")
    targets = images if target_sizes is None else _size_list("target_sizes", target_sizes, batch)
    return input_size, images, targets


def _at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """float16/bfloat16 -> float32: thresholds, areas and argmaxes should not hinge on 8-bit mantissas."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def valid_region_logits(
    mask_logits: torch.Tensor, input_size: Sequence[int], image_size: Sequence[int]
) -> torch.Tensor:
    """One image's mask logits (Q, h, w) -> (Q, h_i, w_i): bilinear upsample to the padded ``input_size``,
    then crop the valid top-left ``image_size``.

    The whole canvas is interpolated even when the crop is small: interpolating only the needed rows and
    columns gives the same values up to 1 ulp (the CPU kernel's vector/tail split moves with the output
    size), and bit-identical results are worth more here than the memory."""
    (h, w) = image_size
    up = F.interpolate(mask_logits.unsqueeze(0), size=tuple(input_size), mode="bilinear", align_corners=False)
    return up[0, :, :h, :w]


def _resize_bilinear(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(N, h, w) -> (N, *size); a no-op at the same size (bilinear at scale 1 is the identity)."""
    if tuple(x.shape[-2:]) == size:
        return x
    return F.interpolate(x.unsqueeze(0), size=size, mode="bilinear", align_corners=False)[0]


def post_process_semantic(
    class_logits: torch.Tensor,
    mask_logits: torch.Tensor,
    *,
    input_size: Sequence[int],
    image_sizes: Sizes | None = None,
    target_sizes: Sizes | None = None,
    return_scores: bool = False,
) -> list[torch.Tensor] | list[dict[str, torch.Tensor]]:
    """Per image a (H_t, W_t) int64 class map; with ``return_scores`` a dict with it as ``segmentation``
    and the (K, H_t, W_t) class scores as ``scores``."""
    input_size, image_sizes, target_sizes = _check(class_logits, mask_logits, input_size, image_sizes, target_sizes)
    class_logits, mask_logits = _at_least_float32(class_logits), _at_least_float32(mask_logits)
    class_probs = class_logits.softmax(dim=-1)[..., :-1]  # (B, Q, K)
    results: list[Any] = []
    for i, (image_size, target) in enumerate(zip(image_sizes, target_sizes)):
        mask_probs = valid_region_logits(mask_logits[i], input_size, image_size).sigmoid()  # (Q, h_i, w_i)
        scores = torch.einsum("qc,qhw->chw", class_probs[i], mask_probs)  # (K, h_i, w_i)
        scores = _resize_bilinear(scores, target)
        segmentation = scores.argmax(dim=0)
        results.append({"segmentation": segmentation, "scores": scores} if return_scores else segmentation)
    return results


def post_process_instance(
    class_logits: torch.Tensor,
    mask_logits: torch.Tensor,
    *,
    input_size: Sequence[int],
    image_sizes: Sizes | None = None,
    target_sizes: Sizes | None = None,
    threshold: float = 0.5,
    return_masks: bool = False,
) -> list[dict[str, Any]]:
    """Per image ``{"segmentation": (H_t, W_t) int32 instance ids (-1 none), "segments_info": [{"id",
    "label_id", "was_fused", "score"}], "masks": (N, H_t, W_t) bool (with return_masks; may overlap)}``."""
    input_size, image_sizes, target_sizes = _check(class_logits, mask_logits, input_size, image_sizes, target_sizes)
    class_logits, mask_logits = _at_least_float32(class_logits), _at_least_float32(mask_logits)
    num_queries, num_classes = class_logits.shape[1], class_logits.shape[2] - 1
    results = []
    for i, (image_size, target) in enumerate(zip(image_sizes, target_sizes)):
        logits = valid_region_logits(mask_logits[i], input_size, image_size)  # (Q, h_i, w_i)
        class_probs = class_logits[i].softmax(dim=-1)[:, :-1]  # (Q, K)
        top_scores, top_index = class_probs.flatten().topk(num_queries, sorted=False)
        labels, queries = top_index % num_classes, top_index // num_classes
        binary = (logits > 0).flatten(1)  # (Q, h_i * w_i)
        mask_scores = (logits.sigmoid().flatten(1) * binary).sum(1) / (binary.sum(1) + 1e-6)  # (Q,)
        scores = top_scores * mask_scores[queries]
        keep = (scores.double() >= threshold).nonzero().flatten()  # compared as Python floats, like transformers
        masks = binary[queries[keep]].view(-1, *image_size)
        if tuple(masks.shape[-2:]) != target and len(keep):
            masks = F.interpolate(masks.unsqueeze(0).to(torch.uint8), size=target, mode="nearest")[0].bool()
        nonempty = masks.flatten(1).any(1)
        keep, masks = keep[nonempty], masks[nonempty]  # (N,), (N, H_t, W_t)
        segmentation = torch.full(target, -1, dtype=torch.int32, device=logits.device)
        if len(keep):
            # the last instance covering a pixel wins: argmax over the flipped stack finds it
            last = len(keep) - 1 - masks.flip(0).to(torch.uint8).argmax(dim=0)
            segmentation = torch.where(masks.any(0), last.to(torch.int32), segmentation)
        info = [
            {"id": n, "label_id": int(label), "was_fused": False, "score": round(float(score), 6)}
            for n, (label, score) in enumerate(zip(labels[keep].tolist(), scores[keep].tolist()))
        ]
        result = {"segmentation": segmentation, "segments_info": info}
        if return_masks:
            result["masks"] = masks
        results.append(result)
    return results


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
) -> list[dict[str, Any]]:
    """Per image ``{"segmentation": (H_t, W_t) int32 segment ids (0 = unassigned), "segments_info":
    [{"id", "label_id", "was_fused", "score"}]}``; all segments of a label in ``label_ids_to_fuse`` share
    one id (and one entry, with the first segment's score)."""
    input_size, image_sizes, target_sizes = _check(class_logits, mask_logits, input_size, image_sizes, target_sizes)
    class_logits, mask_logits = _at_least_float32(class_logits), _at_least_float32(mask_logits)
    fuse = set() if label_ids_to_fuse is None else {int(label) for label in label_ids_to_fuse}
    num_classes = class_logits.shape[2] - 1
    all_scores, all_labels = class_logits.softmax(dim=-1).max(dim=-1)  # (B, Q) each
    results = []
    for i, (image_size, target) in enumerate(zip(image_sizes, target_sizes)):
        keep = (all_labels[i] != num_classes) & (all_scores[i] > threshold)
        segmentation = torch.zeros(target, dtype=torch.int32, device=mask_logits.device)
        if not bool(keep.any()):
            results.append({"segmentation": segmentation, "segments_info": []})
            continue
        scores, labels = all_scores[i][keep], all_labels[i][keep]  # (N,)
        probs = valid_region_logits(mask_logits[i][keep], input_size, image_size).sigmoid()  # (N, h_i, w_i)
        weighted = _resize_bilinear(probs, target) * scores[:, None, None]  # (N, H_t, W_t)
        winner = weighted.argmax(dim=0)  # (H_t, W_t) index into the kept queries
        area = torch.bincount(winner.flatten(), minlength=len(scores))
        own_area = (weighted >= mask_threshold).flatten(1).sum(1)
        ratio = torch.true_divide(area, own_area).double()  # float32 ratio compared as a Python float
        is_segment = ((area > 0) & (own_area > 0) & (ratio > overlap_mask_area_threshold)).tolist()

        segment_of_query = [0] * len(scores)
        info: list[dict[str, Any]] = []
        fused_ids: dict[int, int] = {}
        for k, (label, score) in enumerate(zip(labels.tolist(), scores.tolist())):
            if not is_segment[k]:
                continue
            if label in fused_ids:
                segment_of_query[k] = fused_ids[label]
                continue
            segment_of_query[k] = len(info) + 1
            info.append({"id": len(info) + 1, "label_id": label, "was_fused": label in fuse, "score": round(score, 6)})
            if label in fuse:
                fused_ids[label] = segment_of_query[k]
        lookup = torch.tensor(segment_of_query, dtype=torch.int32, device=segmentation.device)
        results.append({"segmentation": lookup[winner], "segments_info": info})
    return results
