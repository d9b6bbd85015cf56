"""Overlays: only visible segments in the legend, a legend wrapped into columns no taller than the image,
a scalable font that follows the image size, region outlines and id tags drawn inside their regions."""

from __future__ import annotations

import numpy as np
import PIL.ImageFont
import pytest
import torch

from maskformers.processing.visualize import (
    color_for, font_size_for, legend_rows, overlay_segments, region_anchors, segmentation_to_png,
)

H, W = 240, 320


def _image(height=H, width=W):
    yy, xx = np.mgrid[:height, :width]
    return np.stack([xx * 255 // width, yy * 255 // height, np.full((height, width), 90)], -1).astype(np.uint8)


def _shapes():
    """Segment 0: a disc; 1: a ring (its centre belongs to 0's neighbour, the background); 2: a bar; 3 is
    listed but covered by the others (a hidden instance); background -1."""
    yy, xx = np.mgrid[:H, :W]
    seg = np.full((H, W), -1, np.int64)
    seg[(xx - 80) ** 2 + (yy - 120) ** 2 < 60**2] = 0
    r2 = (xx - 230) ** 2 + (yy - 100) ** 2
    seg[(r2 < 70**2) & (r2 > 40**2)] = 1
    seg[200:230, 150:310] = 2
    segments = [{"id": i, "label_id": label, "score": 0.9} for i, label in enumerate([5, 6, 7, 8])]
    return torch.from_numpy(seg), segments


def test_legend_lists_only_visible_segments():
    seg, segments = _shapes()
    rows = legend_rows(seg, segments, {5: "cat", 6: "dog", 7: "bus", 8: "hidden"})
    assert [r[0] for r in rows] == [0, 1, 2]
    assert rows[0][2] == "0  cat  0.90" and rows[0][1] == color_for(0)
    out = np.asarray(overlay_segments(_image(), seg, segments))
    legend = out[:, W:]
    swatch = lambda key: (legend == np.asarray(color_for(key), np.uint8)).all(-1).sum()  # noqa: E731
    assert min(swatch(k) for k in (0, 1, 2)) > 25 and swatch(3) == 0


def test_legend_wraps_into_columns_beside_the_image():
    seg = torch.arange(120).repeat_interleave(640).view(H, W)  # 120 visible stripes
    segments = [{"id": i, "label_id": i % 7} for i in range(120)]
    out = overlay_segments(_image(), seg, segments, tags=False)
    assert out.height == H  # not a 1700-px-tall legend
    assert W + 150 < out.width < W + 3000  # several columns, each of bounded width
    rows_per_column = (H - 2 * 6) // round(font_size_for(H, W) * 1.35)
    assert len(legend_rows(seg, segments)) == 120 and rows_per_column < 120
    long = [{"id": 0, "label_id": 0}]
    text = legend_rows(torch.zeros(4, 4, dtype=torch.int64), long, {0: "x" * 200})[0][2]
    assert len(text) < 45 and text.endswith("...")  # long labels are cut


def test_font_is_scalable_and_follows_the_image():
    assert font_size_for(480, 640) < font_size_for(1080, 1920) < font_size_for(3000, 4000) <= 64
    assert font_size_for(10, 10) == 11
    assert isinstance(PIL.ImageFont.load_default(size=20), PIL.ImageFont.FreeTypeFont)
    seg, segments = _shapes()
    small = overlay_segments(_image(), seg, segments, font_size=12)
    large = overlay_segments(_image(), seg, segments, font_size=30)
    assert large.width - W > 1.8 * (small.width - W)  # legend text really grows with the font size


def test_anchors_lie_inside_their_regions():
    seg, segments = _shapes()
    anchors = region_anchors(seg, [0, 1, 2, 3])
    assert set(anchors) == {0, 1, 2}  # 3 has no pixel
    for segment_id, (x, y) in anchors.items():
        assert seg[y, x] == segment_id
    ring_x, ring_y = anchors[1]
    assert 40**2 < (ring_x - 230) ** 2 + (ring_y - 100) ** 2 < 70**2  # in the ring, not its hole
    tiny = torch.full((600, 800), -1, dtype=torch.int64)
    tiny[301, 402] = 7  # smaller than a cell of the thumbnail: found at full resolution
    assert region_anchors(tiny, [7]) == {7: (402, 301)}


def test_outlines_and_id_tags_are_drawn():
    seg, segments = _shapes()
    plain = np.asarray(overlay_segments(_image(), seg, segments, outline=False, tags=False))[:, :W].astype(int)
    outlined = np.asarray(overlay_segments(_image(), seg, segments, tags=False))[:, :W].astype(int)
    tagged = np.asarray(overlay_segments(_image(), seg, segments))[:, :W].astype(int)
    changed = (plain != outlined).any(-1)
    s = seg.numpy()
    border = np.zeros_like(changed)  # pixels with a 4-neighbour of another id
    border[:, 1:] |= s[:, 1:] != s[:, :-1]
    border[:, :-1] |= s[:, 1:] != s[:, :-1]
    border[1:] |= s[1:] != s[:-1]
    border[:-1] |= s[1:] != s[:-1]
    assert changed.any() and (outlined[changed] == 255).all()  # white outlines ...
    assert not (changed & ~border).any()  # ... on region borders only (1 px at this size)
    assert (changed == (border & (s >= 0))).all()  # every border pixel of a drawn region
    for segment_id, (x, y) in region_anchors(seg, [0, 1, 2]).items():
        box = (tagged[y - 5 : y + 6, x - 8 : x + 9] != outlined[y - 5 : y + 6, x - 8 : x + 9]).any(-1)
        assert box.mean() > 0.3, segment_id  # a dark box with the id in white
        patch = tagged[y - 5 : y + 6, x - 8 : x + 9]
        assert (patch.min(-1) > 180).sum() >= 3 and (patch.max(-1) < 40).sum() >= 10  # light text on a dark box


def test_no_segments_and_bad_sizes():
    seg = torch.full((H, W), -1, dtype=torch.int64)
    out = overlay_segments(_image(), seg, [])
    assert out.height == H and np.array_equal(np.asarray(out)[:, :W], _image())
    with pytest.raises(ValueError, match=r"segmentation \(10, 10\) does not match the image size \(240, 320\)"):
        overlay_segments(_image(), seg[:10, :10], [])
    assert segmentation_to_png(seg, offset=1).mode == "L"
