"""resample.py: chunked resizing and the running argmax reproduce the one-call results bit for bit."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from maskformers.processing.resample import CHUNK, MapGeometry, RunningArgmax, chunks


def _argmax_in_chunks(values: torch.Tensor, size: int) -> torch.Tensor:
    running = RunningArgmax()
    for part in chunks(len(values), size):
        running.update(values[part], part.start)
    return running.index


@pytest.mark.parametrize("size", [1, 3, CHUNK])
def test_running_argmax_equals_argmax_with_ties_and_nan(size):
    g = torch.Generator().manual_seed(0)
    values = torch.randint(0, 3, (37, 19, 23), generator=g).float()  # many ties, also across chunks
    assert torch.equal(_argmax_in_chunks(values, size), values.argmax(0))
    values[20, :5] = float("nan")  # a NaN wins over numbers; the first NaN wins over later ones
    values[30, 3:8] = float("nan")
    values[2, 7:9] = float("nan")
    assert torch.equal(_argmax_in_chunks(values, size), values.argmax(0))
    running = RunningArgmax()
    running.update(values, 0)
    assert torch.equal(running.index, values.argmax(0))


def test_chunks_cover_in_order():
    assert [(p.start, p.stop) for p in chunks(37, 16)] == [(0, 16), (16, 32), (32, 37)]
    assert list(chunks(0)) == []


@pytest.mark.parametrize("antialias", [False, True])
@pytest.mark.parametrize("size", [(50, 60), (100, 7), (97, 55), (300, 400)])
def test_aligned_chunks_resize_like_one_call(size, antialias):
    """Shrinking both sides, the CPU bilinear kernel vectorises across channels; chunks aligned to CHUNK
    still give the one-call values (what the parity tests rely on)."""
    x = torch.randn(1, 37, 96, 131, generator=torch.Generator().manual_seed(1))
    full = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=antialias)[0]
    parts = [F.interpolate(x[:, p], size=size, mode="bilinear", align_corners=False, antialias=antialias)[0]
             for p in chunks(37)]
    assert torch.equal(torch.cat(parts), full)


def test_image_part_resize():
    """OneFormer geometry: an unpadded image is transformers' single antialiased resize of the whole grid;
    a padded one resizes only the cells covering the image, at the image's exact scale."""
    grid = torch.randn(5, 32, 48, generator=torch.Generator().manual_seed(2))
    whole = MapGeometry(input_size=(128, 192), image_size=(128, 192), target=(100, 150), at_input=False)
    expected = F.interpolate(grid[None], size=(100, 150), mode="bilinear", align_corners=False, antialias=True)[0]
    assert torch.equal(whole.to_target(grid), expected)
    assert whole.to_target(grid[:, :, :]).shape == (5, 100, 150) and whole.working(grid) is grid
    same = MapGeometry(input_size=(128, 192), image_size=(128, 192), target=(32, 48), at_input=False)
    assert same.to_target(grid) is grid
    # an image filling the top half of the canvas: a map that is a function of the vertical position maps
    # onto the target as that function of the image's own vertical position
    ramp = torch.arange(32, dtype=torch.float32)[:, None].expand(32, 48)[None]  # value = grid row
    half = MapGeometry(input_size=(128, 192), image_size=(64, 192), target=(160, 48), at_input=False)
    out = half.to_target(ramp)[0, :, 0]
    rows = (torch.arange(160) + 0.5) * (16 / 160) - 0.5  # grid row sampled by each target row
    inside = (rows > 0) & (rows < 15)
    torch.testing.assert_close(out[inside], rows[inside], atol=1e-4, rtol=0)
    assert out.max() <= 15.5  # nothing from the padding rows 16..31
