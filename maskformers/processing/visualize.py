"""Drawing segmentations: colour overlays with region outlines, id tags and a legend; the raw map as a PNG.

Colours are a fixed function of the segment's key (its label for semantic maps, its id otherwise), so the
same class keeps its colour across images of a semantic run. An overlay lists only the segments that are
visible (own at least one pixel of the map; an instance drawn over completely is left out), outlines each
region and writes its id on it, so a legend row ``id label score`` can be matched to its region. Text uses
Pillow's scalable default font at a size that follows the image (Pillow's bitmap font where Pillow was built
without FreeType); the legend wraps into columns beside the image instead of growing below it.

Small images are shown enlarged (:func:`scale_for_display`: label maps by nearest neighbour, so every region
keeps its exact shape), and :func:`compare_segmentations` puts an image, its ground truth and a prediction
side by side under titles, as ``maskformers demo`` writes them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import PIL.Image
import PIL.ImageDraw
import PIL.ImageFilter
import PIL.ImageFont
import torch

from .io import to_rgb_tensor

__all__ = ["color_for", "compare_segmentations", "font_size_for", "legend_rows", "masks_to_segmentation",
           "overlay_segments", "region_anchors", "scale_for_display", "segmentation_to_png", "side_by_side",
           "side_by_side_layout"]

_GOLDEN = 0.6180339887498949
_MAX_LABEL = 32  # characters of a legend label before it is cut with "..."


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


def font_size_for(height: int, width: int) -> int:
    """Legend text size in pixels for an image: ~2.2% of its short side, between 11 and 64."""
    return int(min(64, max(11, round(0.022 * min(height, width)))))


def _font(size: int) -> PIL.ImageFont.ImageFont | PIL.ImageFont.FreeTypeFont:
    try:
        return PIL.ImageFont.load_default(size=size)  # scalable (Pillow >= 10.1 with FreeType)
    except (TypeError, ImportError, OSError):
        return PIL.ImageFont.load_default()


def _colour_key(segment: Mapping[str, Any]) -> int:
    return int(segment.get("colour_key", segment["id"]))


def _visible(segmentation: np.ndarray, segments: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    present = set(np.unique(segmentation).tolist())
    return [s for s in segments if int(s["id"]) in present]


def legend_rows(
    segmentation: torch.Tensor | np.ndarray,
    segments: Sequence[Mapping[str, Any]],
    id2label: Mapping[int, str] | None = None,
) -> list[tuple[int, tuple[int, int, int], str]]:
    """The legend of an overlay: (segment id, colour, "id label score") for each segment that owns at least
    one pixel of ``segmentation``, in the order of ``segments``."""
    seg = segmentation.cpu().numpy() if isinstance(segmentation, torch.Tensor) else np.asarray(segmentation)
    id2label = id2label or {}
    rows = []
    for segment in _visible(seg, segments):
        label = id2label.get(int(segment["label_id"]), f"class {segment['label_id']}")
        if len(label) > _MAX_LABEL:
            label = label[: _MAX_LABEL - 3] + "..."
        score = segment.get("score")
        text = f"{segment['id']}  {label}" + ("" if score is None else f"  {score:.2f}")
        rows.append((int(segment["id"]), color_for(_colour_key(segment)), text))
    return rows


def region_anchors(
    segmentation: torch.Tensor | np.ndarray, ids: Sequence[int], *, grid: int = 256
) -> dict[int, tuple[int, int]]:
    """For each id, an (x, y) pixel inside its region, as far from the region's border as a ``grid``-sized
    copy of the map shows (the place for its tag); regions too small for the copy get their pixel nearest
    their centroid."""
    from scipy.ndimage import distance_transform_edt  # only for overlays

    seg = segmentation.cpu().numpy() if isinstance(segmentation, torch.Tensor) else np.asarray(segmentation)
    height, width = seg.shape
    step = max(1, math.ceil(max(height, width) / grid))
    small = seg[step // 2 :: step, step // 2 :: step]  # nearest-neighbour thumbnail
    anchors = {}
    for segment_id in ids:
        inside = small == segment_id
        if inside.any():
            distance = distance_transform_edt(np.pad(inside, 1))[1:-1, 1:-1]
            y, x = np.unravel_index(int(distance.argmax()), distance.shape)
            anchors[segment_id] = (int(x * step + step // 2), int(y * step + step // 2))
            continue
        ys, xs = np.nonzero(seg == segment_id)
        if len(ys):
            k = int(((ys - ys.mean()) ** 2 + (xs - xs.mean()) ** 2).argmin())
            anchors[segment_id] = (int(xs[k]), int(ys[k]))
    return anchors


def overlay_segments(
    image: PIL.Image.Image | torch.Tensor,
    segmentation: torch.Tensor,
    segments: Sequence[Mapping[str, Any]],
    *,
    id2label: Mapping[int, str] | None = None,
    alpha: float = 0.55,
    outline: bool = True,
    tags: bool = True,
    font_size: int | None = None,
) -> PIL.Image.Image:
    """Blend one colour per visible segment over ``image``, outline the regions and tag them with their id,
    and put a legend (in columns, no taller than the image) on the right.

    image: a PIL image or a (3, H, W) tensor on the 0..255 scale (converted like model inputs, see
    :func:`maskformers.processing.to_rgb_tensor`); segmentation: (H, W) map of segment ids; segments: dicts
    with "id" and "label_id" (optionally "score" and "colour_key"). Pixels whose id is in no segment stay as
    they are."""
    rgb = to_rgb_tensor(image)  # (3, H, W), 0..255
    if tuple(segmentation.shape) != tuple(rgb.shape[-2:]):
        raise ValueError(
            f"segmentation {tuple(segmentation.shape)} does not match the image size {tuple(rgb.shape[-2:])}"
        )
    seg = segmentation.cpu().numpy()
    height, width = seg.shape
    size = font_size or font_size_for(height, width)
    visible = _visible(seg, segments)
    base = rgb.permute(1, 2, 0).to(torch.float32).cpu().numpy()
    painted = base.copy()
    drawn = np.zeros(seg.shape, dtype=bool)
    for segment in visible:
        where = seg == segment["id"]
        painted[where] = (1 - alpha) * base[where] + alpha * np.asarray(color_for(_colour_key(segment)), np.float32)
        drawn |= where
    if outline:
        painted[_borders(seg, drawn, thickness=max(1, round(size / 12)))] = 255.0  # white lines between regions
    out = PIL.Image.fromarray(painted.round().clip(0, 255).astype(np.uint8))
    if tags:
        _draw_tags(out, seg, visible, _font(size))
    return _with_legend(out, legend_rows(seg, visible, id2label), _font(size), size)


def _borders(seg: np.ndarray, drawn: np.ndarray, *, thickness: int) -> np.ndarray:
    """Pixels of drawn regions next to a pixel of another id, grown to ``thickness``."""
    edge = np.zeros(seg.shape, dtype=bool)
    edge[:, 1:] |= seg[:, 1:] != seg[:, :-1]
    edge[:, :-1] |= seg[:, 1:] != seg[:, :-1]
    edge[1:, :] |= seg[1:, :] != seg[:-1, :]
    edge[:-1, :] |= seg[1:, :] != seg[:-1, :]
    edge &= drawn
    if thickness > 1:
        grown = PIL.Image.fromarray(edge.astype(np.uint8) * 255)
        edge = (np.asarray(grown.filter(PIL.ImageFilter.MaxFilter(2 * (thickness // 2) + 1))) > 0) & drawn
    return edge


def _draw_tags(image: PIL.Image.Image, seg: np.ndarray, segments: Sequence[Mapping[str, Any]], font) -> None:
    """A small box with the segment's id at each region's anchor."""
    draw = PIL.ImageDraw.Draw(image)
    anchors = region_anchors(seg, [int(s["id"]) for s in segments])
    for segment in segments:
        if int(segment["id"]) not in anchors:
            continue
        x, y = anchors[int(segment["id"])]
        text = str(segment["id"])
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        x, y = x - (left + right) // 2, y - (top + bottom) // 2  # centre the text on the anchor
        pad = max(1, (bottom - top) // 5)
        draw.rectangle([x + left - pad, y + top - pad, x + right + pad, y + bottom + pad], fill=(0, 0, 0),
                       outline=color_for(_colour_key(segment)))
        draw.text((x, y), text, fill=(255, 255, 255), font=font)


def _with_legend(image: PIL.Image.Image, rows: list[tuple[int, tuple[int, int, int], str]], font, size: int):
    """Columns of (swatch, text) rows right of the image; as many rows per column as the image height holds."""
    if not rows:
        rows = [(-1, (128, 128, 128), "no segments")]
    line, pad, swatch = round(size * 1.35), max(4, size // 2), size
    per_column = max(1, (image.height - 2 * pad) // line)
    columns = [rows[i : i + per_column] for i in range(0, len(rows), per_column)]
    measure = PIL.ImageDraw.Draw(image)
    widths = [int(pad * 3 + swatch + max(measure.textlength(t, font=font) for _, _, t in c)) for c in columns]
    height = max(image.height, 2 * pad + line * len(columns[0]))
    canvas = PIL.Image.new("RGB", (image.width + sum(widths), height), (255, 255, 255))
    canvas.paste(image, (0, 0))
    draw = PIL.ImageDraw.Draw(canvas)
    x0 = image.width
    for column, column_width in zip(columns, widths):
        for i, (_, colour, text) in enumerate(column):
            y = pad + i * line
            draw.rectangle([x0 + pad, y, x0 + pad + swatch, y + swatch], fill=colour, outline=(0, 0, 0))
            top, bottom = draw.textbbox((0, 0), text, font=font)[1::2]
            draw.text((x0 + 2 * pad + swatch, y + (swatch - top - bottom) / 2), text, fill=(0, 0, 0), font=font)
        x0 += column_width
    return canvas


# ------------------------------------------------------------------------------------------------
# enlarged views and side-by-side comparisons
# ------------------------------------------------------------------------------------------------


def masks_to_segmentation(
    masks: torch.Tensor, labels: torch.Tensor | Sequence[int]
) -> tuple[torch.Tensor, list[dict[str, int]]]:
    """Per-segment masks (N, H, W) bool and their labels (N,) -> an (H, W) int64 map of segment ids 1..N
    (0 where no mask is set; a later mask wins an overlap) and its segments (``id``, ``label_id``)."""
    if masks.dim() != 3:
        raise ValueError(f"expected masks (N, H, W), got {tuple(masks.shape)}")
    labels = [int(x) for x in (labels.tolist() if isinstance(labels, torch.Tensor) else labels)]
    if len(labels) != masks.shape[0]:
        raise ValueError(f"got {masks.shape[0]} masks but {len(labels)} labels")
    segmentation = torch.zeros(masks.shape[1:], dtype=torch.int64)
    for i in range(masks.shape[0]):
        segmentation[masks[i].bool().cpu()] = i + 1
    return segmentation, [{"id": i + 1, "label_id": label} for i, label in enumerate(labels)]


def _nearest_rows(source: int, target: int) -> np.ndarray:
    """Source index of each of ``target`` output positions (pixel centres, nearest neighbour)."""
    return np.minimum(((np.arange(target) + 0.5) * source / target).astype(np.int64), source - 1)


def scale_for_display(
    image: PIL.Image.Image | torch.Tensor,
    segmentations: Sequence[torch.Tensor] = (),
    *,
    height: int = 512,
) -> tuple[PIL.Image.Image, list[torch.Tensor]]:
    """Scale an image and its (H, W) segmentation maps to ``height`` rows, keeping the aspect ratio.

    Enlarging is nearest neighbour for the image too (every input pixel becomes a block, so the view shows
    what the model saw and each map stays aligned to it pixel for pixel); shrinking filters the image
    (Pillow's box filter) and picks map values by nearest neighbour."""
    rgb = to_rgb_tensor(image)
    h, w = rgb.shape[-2:]
    if height < 1:
        raise ValueError(f"height must be >= 1, got {height}")
    width = max(1, round(w * height / h))
    rows, cols = _nearest_rows(h, height), _nearest_rows(w, width)
    for seg in segmentations:
        if tuple(seg.shape) != (h, w):
            raise ValueError(f"segmentation {tuple(seg.shape)} does not match the image size {(h, w)}")
    maps = [seg.cpu()[torch.from_numpy(rows)][:, torch.from_numpy(cols)] for seg in segmentations]
    pixels = rgb.permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).cpu().numpy()
    if height >= h:
        return PIL.Image.fromarray(pixels[rows][:, cols]), maps
    return PIL.Image.fromarray(pixels).resize((width, height), PIL.Image.Resampling.BOX), maps


def side_by_side_layout(
    sizes: Sequence[tuple[int, int]], *, font_size: int, gap: int | None = None
) -> tuple[tuple[int, int], list[tuple[int, int]]]:
    """Where :func:`side_by_side` puts panels of (width, height) ``sizes``: (canvas (width, height), the
    top-left (x, y) of each panel). Panels sit in a row, ``gap`` pixels apart, below a title band."""
    gap = max(8, font_size) if gap is None else gap
    band = round(font_size * 1.8)
    corners, x = [], gap
    for width, _ in sizes:
        corners.append((x, band))
        x += width + gap
    return (x, band + max((h for _, h in sizes), default=0) + gap), corners


def side_by_side(
    panels: Sequence[tuple[str, PIL.Image.Image]], *, font_size: int = 16, gap: int | None = None
) -> PIL.Image.Image:
    """Panels (title, image) in a row on white, each under its title (see :func:`side_by_side_layout`)."""
    size, corners = side_by_side_layout([im.size for _, im in panels], font_size=font_size, gap=gap)
    canvas = PIL.Image.new("RGB", size, (255, 255, 255))
    draw, font = PIL.ImageDraw.Draw(canvas), _font(font_size)
    for (title, image), (x, y) in zip(panels, corners):
        canvas.paste(image.convert("RGB"), (x, y))
        top, bottom = draw.textbbox((0, 0), title, font=font)[1::2]
        draw.text((x, (y - top - bottom) / 2), title, fill=(0, 0, 0), font=font)
    return canvas


def compare_segmentations(
    image: PIL.Image.Image | torch.Tensor,
    truth: tuple[torch.Tensor, Sequence[Mapping[str, Any]]],
    prediction: tuple[torch.Tensor, Sequence[Mapping[str, Any]]],
    *,
    id2label: Mapping[int, str] | None = None,
    height: int = 512,
    titles: tuple[str, str, str] = ("scene", "ground truth", "prediction"),
) -> PIL.Image.Image:
    """The image, its ground truth and a prediction side by side, scaled to ``height`` rows, each overlay
    with its outlines, id tags and legend. ``truth`` and ``prediction`` are (segmentation (H, W), segments)
    as :func:`overlay_segments` takes them; both are coloured by class (``label_id``), so the same class has
    the same colour in the two panels."""
    shown, (truth_map, predicted_map) = scale_for_display(image, [truth[0], prediction[0]], height=height)
    font_size = max(font_size_for(shown.height, shown.width), round(height / 32))

    def by_class(segments: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        return [{**s, "colour_key": int(s["label_id"])} for s in segments]

    overlays = [
        overlay_segments(shown, seg, by_class(segments), id2label=id2label, font_size=font_size)
        for seg, segments in ((truth_map, truth[1]), (predicted_map, prediction[1]))
    ]
    return side_by_side(list(zip(titles, [shown, *overlays])), font_size=font_size)
