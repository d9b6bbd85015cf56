"""`maskformers demo` writes scene | ground truth | prediction side by side at a readable size (512 px high),
each overlay with its legend; the enlarging keeps label maps exact (nearest neighbour)."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch

from maskformers import cli
from maskformers.processing.visualize import (
    color_for,
    compare_segmentations,
    masks_to_segmentation,
    region_anchors,
    scale_for_display,
    side_by_side_layout,
)

ALPHA = 0.55  # overlay_segments' default blend


def _blend(scene: np.ndarray, colour: tuple[int, int, int]) -> np.ndarray:
    return np.round((1 - ALPHA) * scene.astype(np.float32) + ALPHA * np.asarray(colour, np.float32)).astype(np.uint8)


def _interior(mask: np.ndarray, margin: int) -> np.ndarray:
    """Pixels of ``mask`` at least ``margin`` pixels (Chebyshev) from its border: away from outlines."""
    keep = mask.copy()
    for dy in range(-margin, margin + 1):
        for dx in range(-margin, margin + 1):
            keep &= np.roll(np.roll(mask, dy, 0), dx, 1)
    return keep


def _check_panel(panel: np.ndarray, scene: np.ndarray, segmentation: np.ndarray, segments, *, font: int,
                 min_share: float = 0.99):
    """Each region of ``segmentation`` is the scene blended with its class colour (outlines and id tags aside)."""
    anchors = region_anchors(segmentation, [int(s["id"]) for s in segments])
    yy, xx = np.mgrid[: segmentation.shape[0], : segmentation.shape[1]]
    for segment in segments:
        inside = _interior(segmentation == segment["id"], margin=3)
        ax, ay = anchors[int(segment["id"])]
        inside &= (np.abs(xx - ax) > 2 * font) | (np.abs(yy - ay) > font)  # the tag box
        if inside.sum() < 200:
            continue
        expected = _blend(scene[inside], color_for(int(segment["label_id"])))
        exact = (np.abs(panel[inside].astype(int) - expected.astype(int)) <= 1).all(-1).mean()
        assert exact >= min_share, f"segment {segment}: only {exact:.2%} of its pixels show its class colour"


def test_demo_draws_scene_truth_and_prediction_side_by_side(tmp_path, capsys):
    from maskformers.processing import post_process_panoptic
    from maskformers.training.builtin import BUILTIN_IMAGE_SIZE, BUILTIN_VAL_SEED, load_builtin_model
    from maskformers.training.data import collate
    from maskformers.training.synthetic import SyntheticScenes

    assert cli.main(["demo", "--out", str(tmp_path), "--scenes", "0", "--scene", "1"]) == 0
    assert "scene | ground truth | prediction" in capsys.readouterr().out
    out = np.asarray(PIL.Image.open(tmp_path / "overlay.png").convert("RGB"))

    scene_sample = SyntheticScenes(2, size=BUILTIN_IMAGE_SIZE, seed=BUILTIN_VAL_SEED)[1]
    scene = scene_sample["image"].permute(1, 2, 0).numpy()
    assert np.array_equal(np.asarray(PIL.Image.open(tmp_path / "scene.png")), scene)  # the input, as it was
    k = 512 // BUILTIN_IMAGE_SIZE
    big = lambda a: np.repeat(np.repeat(a, k, 0), k, 1)  # noqa: E731  (nearest, independent of the library)
    truth, truth_segments = masks_to_segmentation(scene_sample["masks"], scene_sample["labels"])

    model = load_builtin_model().eval()
    batch = collate([(scene_sample, {"labels": scene_sample["labels"], "masks": scene_sample["masks"]})])
    with torch.inference_mode():
        logits = model(batch["pixel_values"])
    size = (BUILTIN_IMAGE_SIZE, BUILTIN_IMAGE_SIZE)
    predicted = post_process_panoptic(logits.class_logits, logits.mask_logits, threshold=0.8,
                                      input_size=batch["pixel_values"].shape[-2:], image_sizes=[size],
                                      target_sizes=[size])[0]

    # three 512-px panels under a title band; the two overlays carry a legend, so the canvas is wider
    font = max(11, round(512 / 32))
    panels = [(512, 512)] * 3
    (width, height), corners = side_by_side_layout(panels, font_size=font)
    assert out.shape[0] == height and out.shape[0] >= 512 and out.shape[1] > width + 150
    x0, y0 = corners[0]
    scene_panel = out[y0:y0 + 512, x0:x0 + 512]
    assert np.array_equal(scene_panel, big(scene))  # the scene itself, enlarged pixel for pixel

    # the overlays' offsets depend on the legend widths: panels are the runs of 512 columns that are image, not
    # white legend background
    image_columns = (out[y0:y0 + 512] != 255).any(-1).mean(0) > 0.5
    starts = [x for x in range(1, out.shape[1]) if image_columns[x] and not image_columns[x - 1]]
    runs = [x for x in sorted({x0, *starts}) if image_columns[x:x + 512].all() and not image_columns[x + 512]]
    assert runs[0] == x0 and len(runs) == 3, runs
    gx, px = runs[1:]
    truth_panel, prediction_panel = out[y0:y0 + 512, gx:gx + 512], out[y0:y0 + 512, px:px + 512]
    _check_panel(truth_panel, big(scene), big(truth.numpy()), truth_segments, font=font)
    legend = out[y0:y0 + 512, gx + 512:px]
    for segment in truth_segments:  # a legend swatch per ground-truth class colour
        assert (legend == np.asarray(color_for(segment["label_id"]), np.uint8)).all(-1).sum() > font * font // 2
    predicted_map = big(predicted["segmentation"].numpy())
    _check_panel(prediction_panel, big(scene), predicted_map, predicted["segments_info"], font=font)
    differs = (predicted_map > 0) & (np.abs(truth_panel.astype(int) - prediction_panel.astype(int)).sum(-1) > 3)
    assert differs.any()  # the prediction is the model's, not a copy of the truth
    assert not np.array_equal(truth_panel, scene_panel)


def test_scale_for_display_keeps_maps_exact_and_aligned():
    image = torch.randint(0, 256, (3, 30, 40), dtype=torch.uint8)
    seg = torch.arange(30 * 40).view(30, 40)
    shown, (big,) = scale_for_display(image, [seg], height=100)  # 3.33x: not an integer factor
    assert shown.size == (133, 100) and big.shape == (100, 133) and big.dtype == seg.dtype
    assert set(big.unique().tolist()) == set(seg.flatten().tolist())  # every input pixel survives, none invented
    rows, cols = big // 40, big % 40  # each output pixel names its source pixel: check the image followed it
    pixels = np.asarray(shown)
    assert np.array_equal(pixels, image.permute(1, 2, 0).numpy()[rows.numpy(), cols.numpy()])
    small, (down,) = scale_for_display(image, [seg], height=15)
    assert small.size == (20, 15) and down.shape == (15, 20)
    with pytest.raises(ValueError, match="does not match the image size"):
        scale_for_display(image, [seg[:, :10]])


def test_masks_to_segmentation_and_comparison_colours():
    masks = torch.zeros(3, 8, 8, dtype=torch.bool)
    masks[0] = True
    masks[1, :4] = True
    masks[2, :2, :2] = True  # drawn last: wins the overlap
    seg, segments = masks_to_segmentation(masks, torch.tensor([4, 0, 0]))
    assert seg[0, 0] == 3 and seg[3, 3] == 2 and seg[7, 7] == 1
    assert segments == [{"id": 1, "label_id": 4}, {"id": 2, "label_id": 0}, {"id": 3, "label_id": 0}]
    with pytest.raises(ValueError, match="3 masks but 2 labels"):
        masks_to_segmentation(masks, [1, 2])
    # instances of one class share its colour in both panels (keyed by class, not by segment id)
    image = torch.full((3, 8, 8), 100, dtype=torch.uint8)
    picture = np.asarray(compare_segmentations(image, (seg, segments), (seg, segments), height=256))
    (_, _), corners = side_by_side_layout([(256, 256)] * 3, font_size=11)
    x, y = corners[1]
    truth_panel = picture[y:y + 256, x:x + 256]
    colour = _blend(np.full((1, 3), 100, np.uint8), color_for(0))[0]
    assert (truth_panel[4:12, 4:12] == colour).all() and (truth_panel[100:120, 4:12] == colour).all()
    assert (truth_panel[200:250, 4:50] == _blend(np.full((1, 3), 100, np.uint8), color_for(4))[0]).all()


def test_demo_rejects_a_bad_height(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["demo", "--height", "ten"])
    assert exc.value.code == 2
    assert "--height must be a whole number of pixels in [16, 4096], got 'ten'" in capsys.readouterr().err
