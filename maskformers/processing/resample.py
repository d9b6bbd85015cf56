"""Mapping per-query maps from mask resolution to an image's target size, a few channels at a time.

Mask logits (Q, h, w) cover the padded model input ``input_size`` = (H, W); one image fills its top-left
``image_size`` = (h_i, w_i) of it; results are wanted at ``target`` (usually the original photo size). Two
geometries, one per model family as transformers post-processes it:

- ``at_input=True`` (Mask2Former, and the original detectron2 code of both models): upsample bilinearly
  to the padded input, crop the image, then resize bilinearly (no antialiasing) to the target. Work at the
  input resolution happens in between (sigmoid, the semantic class mixture).
- ``at_input=False`` (transformers' OneFormer): work at mask resolution, then one antialiased bilinear
  resize (torchvision's ``resize``) of the part of the mask grid that covers the image. transformers resizes
  the whole grid, padding included; for an unpadded image the two are the same call, for a padded one ours
  leaves the padding out.

Memory: whatever is resized to the target is resized ``CHUNK`` channels at a time, so a 4000x3000 target
costs ``CHUNK`` full-size float maps, not one per query or class. Chunks start at multiples of ``CHUNK``:
PyTorch's CPU bilinear kernel vectorises across channels when it downsamples both sides, so a channel's
value depends on its position within a group of SIMD lanes (8 with AVX2, 16 with AVX-512); chunks aligned
to 16 reproduce the one-call result bit for bit (tests/test_processing_postprocess.py checks it).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F

__all__ = ["CHUNK", "MapGeometry", "RunningArgmax", "chunks", "valid_region_logits"]

CHUNK = 16


def chunks(count: int, size: int = CHUNK) -> Iterator[slice]:
    """Slices [0, size), [size, 2 size), ... covering ``count`` channels."""
    for start in range(0, count, size):
        yield slice(start, min(start + size, count))


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


class MapGeometry:
    """Where one image's maps go: ``working(maps)`` takes (N, h, w) mask-resolution maps to the resolution
    the post-processing works at; ``to_target(x)`` takes working maps to (N, *target)."""

    def __init__(
        self, *, input_size: tuple[int, int], image_size: tuple[int, int], target: tuple[int, int], at_input: bool
    ) -> None:
        self.input_size, self.image_size, self.target, self.at_input = input_size, image_size, target, at_input

    def working(self, maps: torch.Tensor) -> torch.Tensor:
        return valid_region_logits(maps, self.input_size, self.image_size) if self.at_input else maps

    def to_target(self, x: torch.Tensor) -> torch.Tensor:
        if self.at_input:
            return _resize_bilinear(x, self.target)
        return self._resize_image_part(x)

    def _resize_image_part(self, x: torch.Tensor) -> torch.Tensor:
        """Antialiased bilinear resize of the part of the (N, h, w) grid covering the image."""
        if self.image_size == self.input_size:
            if tuple(x.shape[-2:]) == self.target:  # torchvision returns the input unchanged
                return x
            return F.interpolate(x[None], size=self.target, mode="bilinear", align_corners=False, antialias=True)[0]
        # the image covers extent = grid * image / input cells; crop the cells it touches and resize with the
        # exact scale target / extent (the output may run a row or column past the target: cut it)
        extent = [g * i / s for g, i, s in zip(x.shape[-2:], self.image_size, self.input_size)]
        crop = x[:, : math.ceil(extent[0]), : math.ceil(extent[1])]
        scale = [math.nextafter(t / e, math.inf) for t, e in zip(self.target, extent)]
        out = F.interpolate(
            crop[None], scale_factor=scale, mode="bilinear", align_corners=False, antialias=True,
            recompute_scale_factor=False,
        )[0]
        return out[:, : self.target[0], : self.target[1]]

    def chunked(self, count: int, make: Callable[[slice], torch.Tensor]) -> Iterator[tuple[slice, torch.Tensor]]:
        """``(part, to_target(make(part)))`` for aligned chunks of ``count`` channels."""
        for part in chunks(count):
            yield part, self.to_target(make(part))


class RunningArgmax:
    """``argmax`` over the channels of maps that arrive in chunks, equal to one ``argmax(dim=0)`` over their
    concatenation: the first maximum wins, and NaN counts as the maximum (as in ``torch.argmax``).

    Each chunk is reduced with ``max(dim=0)`` (the same first-maximum and NaN rules as ``argmax``, and
    several times faster than ``argmax`` over the outer dimension on the CPU), then merged into the running
    maximum: an earlier chunk keeps a tie and a NaN. Nothing is read back to the host, so on a GPU the
    chunks queue up without waiting. The (H, W) buffers are allocated once and reused, so that chunk after
    chunk the allocator is not left holding a heap of freed target-size temporaries."""

    def __init__(self) -> None:
        self.best: torch.Tensor | None = None  # (H, W) running maximum
        self.index: torch.Tensor | None = None  # (H, W) int64 channel of the maximum

    def update(self, values: torch.Tensor, offset: int) -> None:
        """values (n, H, W) are channels offset .. offset + n - 1."""
        if self.best is None:
            self.best, self.index = values.max(dim=0)
            self.index += offset
            self._chunk_best, self._chunk_index = torch.empty_like(self.best), torch.empty_like(self.index)
            self._better, self._flags = (torch.empty(self.best.shape, dtype=torch.bool, device=values.device)
                                         for _ in range(2))
            return
        best, index = torch.max(values, dim=0, out=(self._chunk_best, self._chunk_index))
        index += offset
        # the chunk wins where it is larger, or NaN (not(new <= old) holds for both), unless the running
        # maximum is already NaN (the first NaN stays, as in argmax)
        better = torch.le(best, self.best, out=self._better).logical_not_()
        better &= torch.eq(self.best, self.best, out=self._flags)
        torch.maximum(self.best, best, out=self.best)  # NaN propagates, as it should
        torch.where(better, index, self.index, out=self.index)
