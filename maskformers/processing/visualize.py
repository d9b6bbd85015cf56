"""Drawing segmentations: colour overlays with a legend, and the raw segmentation as a PNG.

Colours are a fixed function of the segment's key (its label for semantic maps, its id otherwise), so the
same class keeps its colour across images of a semantic run.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import PIL.Image
import PIL.ImageDraw
import PIL.ImageFont
import torch

from .io import to_rgb_tensor

__all__ = ["color_for", "overlay_segments", "segmentation_to_png"]

_GOLDEN = 0.6180339887498949


def color_for(key: int) -> tuple[int, int, int]:
    """A saturated colour for an integer key; neighbouring keys get far-apart hues."""
    hue = (key * _GOLDEN) % 1.0
    sat, val = 0.65 + 0.35 * ((key * 7) % 3) / 2, 0.95 - 0.25 * ((key * 5) % 2)
    i, f = int(hue * 6), hue * 6 - int(hue * 6)
    p, q, t = val * (1 - sat), val * (1 - sat * f), val * (1 - sat * (1 - f))
    r, g, b = [(val, t, p), (q, val, p), (p, val, t), (p, q, val), (t, p, val), (val, p, q)][i % 6]
    return int(r * 255), int(g * 255), int(b * 255)


def segmentation_to_png(segmentation: torch.Tensor, *, offset: int = 0) -> PIL.Image.Image:
    """(H, W) integer map -> grayscale PNG image: 8-bit when every value fits, else 16-bit.

    ``offset`` is added first (instance maps use -1 for "no instance": offset 1 makes that 0).
    """
    if segmentation.dim() != 2:
        raise ValueError(f"expected segmentation (H, W), got {tuple(segmentation.shape)}")
    values = segmentation.to(torch.int64) + offset
    lo, hi = (int(values.min()), int(values.max())) if values.numel() else (0, 0)
    if lo < 0 or hi > 65535:
        raise ValueError(f"segmentation values + offset must lie in [0, 65535], got [{lo}, {hi}]")
    array = values.cpu().numpy()
    if hi <= 255:
        return PIL.Image.fromarray(array.astype(np.uint8), mode="L")
    return PIL.Image.fromarray(array.astype(np.uint16))  # mode "I;16"


def overlay_segments(
    image: PIL.Image.Image | torch.Tensor,
    segmentation: torch.Tensor,
    segments: Sequence[Mapping[str, Any]],
    *,
    id2label: Mapping[int, str] | None = None,
    alpha: float = 0.55,
) -> PIL.Image.Image:
    """Blend one colour per segment over ``image`` and append a legend of the segments on the right.

    image: a PIL image or a (3, H, W) tensor on the 0..255 scale (converted like model inputs, see
    :func:`maskformers.processing.to_rgb_tensor`); segmentation: (H, W) map of segment ids; segments: dicts with "id" and
    "label_id" (and optionally "score"), one per id drawn. Pixels whose id is in no segment stay as is.
    """
    rgb = to_rgb_tensor(image)  # (3, H, W), 0..255
    if tuple(segmentation.shape) != tuple(rgb.shape[-2:]):
        raise ValueError(
            f"segmentation {tuple(segmentation.shape)} does not match the image size {tuple(rgb.shape[-2:])}"
        )
    id2label = id2label or {}
    base = rgb.permute(1, 2, 0).to(torch.float32).cpu().numpy()
    seg = segmentation.cpu().numpy()
    painted = base.copy()
    for segment in segments:
        where = seg == segment["id"]
        painted[where] = (1 - alpha) * base[where] + alpha * np.asarray(color_for(_colour_key(segment)), np.float32)
    out = PIL.Image.fromarray(painted.round().clip(0, 255).astype(np.uint8))
    return _with_legend(out, segments, id2label)


def _colour_key(segment: Mapping[str, Any]) -> int:
    return int(segment.get("colour_key", segment["id"]))


def _with_legend(image: PIL.Image.Image, segments: Sequence[Mapping[str, Any]], id2label: Mapping[int, str]):
    font = PIL.ImageFont.load_default()
    rows = []
    for segment in segments:
        label = id2label.get(int(segment["label_id"]), f"class {segment['label_id']}")
        score = segment.get("score")
        rows.append((color_for(_colour_key(segment)), label if score is None else f"{label} {score:.2f}"))
    if not rows:
        rows = [((128, 128, 128), "no segments")]
    line, pad, swatch = 14, 6, 10
    measure = PIL.ImageDraw.Draw(image)
    text_width = max(measure.textlength(text, font=font) for _, text in rows)
    width = int(pad * 3 + swatch + text_width)
    height = max(image.height, pad * 2 + line * len(rows))
    canvas = PIL.Image.new("RGB", (image.width + width, height), (255, 255, 255))
    canvas.paste(image, (0, 0))
    draw = PIL.ImageDraw.Draw(canvas)
    for i, (colour, text) in enumerate(rows):
        y = pad + i * line
        x = image.width + pad
        draw.rectangle([x, y + 1, x + swatch, y + 1 + swatch], fill=colour, outline=(0, 0, 0))
        draw.text((x + swatch + pad, y), text, fill=(0, 0, 0), font=font)
    return canvas
