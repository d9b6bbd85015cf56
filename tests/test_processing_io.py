"""Image loading and conversion rules of maskformers.processing.io."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch

from maskformers.processing import ImageLoadError, load_image, to_rgb_tensor

RNG = np.random.default_rng(0)


@pytest.fixture(autouse=True)
def _fresh_rng():
    """Every test draws the same images whatever ran before it (-k, reordering)."""
    global RNG
    RNG = np.random.default_rng(0)


def _rgb(h: int = 9, w: int = 13) -> np.ndarray:
    return RNG.integers(0, 256, (h, w, 3), dtype=np.uint8)


def _hwc(t: torch.Tensor) -> np.ndarray:
    assert t.dim() == 3 and t.shape[0] == 3
    return t.permute(1, 2, 0).numpy()


# ----------------------------------------------------------------------------- PIL modes
def test_rgb_pil_is_exact_uint8():
    a = _rgb()
    t = to_rgb_tensor(PIL.Image.fromarray(a))
    assert t.dtype == torch.uint8 and np.array_equal(_hwc(t), a)


@pytest.mark.parametrize("mode", ["L", "1", "CMYK", "YCbCr", "P"])
def test_modes_without_alpha_follow_pil_rgb_conversion(mode):
    image = PIL.Image.fromarray(_rgb()).convert(mode)
    t = to_rgb_tensor(image)
    assert t.dtype == torch.uint8
    assert np.array_equal(_hwc(t), np.asarray(image.convert("RGB")))


def test_grayscale_replicates_the_channel():
    gray = RNG.integers(0, 256, (7, 5), dtype=np.uint8)
    t = to_rgb_tensor(PIL.Image.fromarray(gray, mode="L"))
    assert all(np.array_equal(t[c].numpy(), gray) for c in range(3))


@pytest.mark.parametrize("mode", ["RGBA", "LA", "PA"])
def test_alpha_is_composited_onto_white(mode):
    rgb = _rgb()
    alpha = RNG.integers(0, 256, rgb.shape[:2], dtype=np.uint8)
    alpha[0, 0], alpha[0, 1] = 0, 255
    image = PIL.Image.fromarray(np.dstack([rgb, alpha]), mode="RGBA").convert(mode)
    colour = np.asarray(image.convert("RGB")).astype(np.float64)  # the colour bands without alpha
    a = np.asarray(image.getchannel("A")).astype(np.float64)[..., None] / 255.0
    expected = colour * a + 255.0 * (1.0 - a)
    got = _hwc(to_rgb_tensor(image)).astype(np.float64)
    assert np.abs(got - expected).max() <= 1.0  # PIL composites in integer arithmetic
    assert (got[0, 0] == 255).all()  # fully transparent -> white
    assert np.array_equal(got[0, 1], colour[0, 1])  # opaque -> unchanged


def test_palette_with_transparency_goes_through_rgba():
    image = PIL.Image.fromarray(_rgb()).convert("P")
    transparent_index = int(np.asarray(image)[0, 0])
    image.info["transparency"] = transparent_index
    got = _hwc(to_rgb_tensor(image))
    hidden = np.asarray(image) == transparent_index
    assert (got[hidden] == 255).all()
    assert np.array_equal(got[~hidden], np.asarray(image.convert("RGB"))[~hidden])


@pytest.mark.parametrize("mode", ["I;16", "I"])
def test_sixteen_bit_scales_instead_of_clipping(mode):
    values = np.array([[0, 257, 32896, 40000, 65535]], dtype=np.uint16)
    image = PIL.Image.fromarray(values) if mode == "I;16" else PIL.Image.fromarray(values.astype(np.int32))
    assert image.mode == mode
    t = to_rgb_tensor(image)
    assert t.dtype == torch.float32
    expected = values.astype(np.float64) * 255.0 / 65535.0
    assert np.abs(t[0].numpy() - expected).max() < 1e-4
    assert t[0, 0, 2] == 128.0 and t[0, 0, 4] == 255.0  # mid grey stays mid grey, white stays white
    assert torch.equal(t[0], t[1]) and torch.equal(t[0], t[2])


def test_mode_i_outside_sixteen_bit_raises():
    image = PIL.Image.fromarray(np.array([[0, 70000]], dtype=np.int32))
    with pytest.raises(ValueError, match=r"\[0, 70000\]"):
        to_rgb_tensor(image)


def test_mode_f_follows_the_float_rule():
    t = to_rgb_tensor(PIL.Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32), mode="F"))
    assert torch.equal(t[1, 0], torch.tensor([0.0, 127.5, 255.0]))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        to_rgb_tensor(PIL.Image.fromarray(np.array([[0.0, 2.0]], dtype=np.float32), mode="F"))


# ----------------------------------------------------------------------------- EXIF and files
def test_exif_orientation_is_applied(tmp_path):
    a = _rgb(20, 30)
    image = PIL.Image.fromarray(a)
    exif = image.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = tmp_path / "rotated.png"
    image.save(path, exif=exif)
    expected = np.rot90(a, -1)
    assert np.array_equal(_hwc(to_rgb_tensor(path)), expected)
    assert np.array_equal(_hwc(to_rgb_tensor(PIL.Image.open(path))), expected)
    assert np.array_equal(np.asarray(load_image(path)), expected)
    # an already transposed image is not rotated twice
    assert np.array_equal(_hwc(to_rgb_tensor(load_image(path))), expected)


@pytest.mark.parametrize("fmt", ["png", "jpeg"])
def test_truncated_file_raises_naming_the_file(tmp_path, fmt):
    full = tmp_path / f"full.{fmt}"
    PIL.Image.fromarray(_rgb(64, 64)).save(full)
    data = full.read_bytes()
    cut = tmp_path / f"cut.{fmt}"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageLoadError, match="cut"):
        to_rgb_tensor(cut)


def test_empty_corrupt_and_missing_files(tmp_path):
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(ImageLoadError, match="empty.png.*empty"):
        to_rgb_tensor(str(empty))
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(bytes(range(256)) * 3)
    with pytest.raises(ImageLoadError, match="garbage.jpg"):
        to_rgb_tensor(garbage)
    with pytest.raises(FileNotFoundError, match="missing.png"):
        to_rgb_tensor(tmp_path / "missing.png")


# ----------------------------------------------------------------------------- arrays and tensors
def test_numpy_layouts_and_dtypes():
    a = _rgb()
    assert np.array_equal(_hwc(to_rgb_tensor(a)), a)
    gray = a[..., 0]
    assert np.array_equal(_hwc(to_rgb_tensor(gray)), np.repeat(gray[..., None], 3, axis=2))
    assert np.array_equal(_hwc(to_rgb_tensor(gray[..., None])), np.repeat(gray[..., None], 3, axis=2))
    f = to_rgb_tensor(a.astype(np.float64) / 255.0)
    assert f.dtype == torch.float32 and torch.allclose(f, torch.from_numpy(a).permute(2, 0, 1).float(), atol=1e-4)
    u16 = to_rgb_tensor(a.astype(np.uint16) * 257)
    assert torch.equal(u16, torch.from_numpy(a).permute(2, 0, 1).float())  # 257 * v / 257 == v exactly


def test_rgba_arrays_composite_onto_white():
    rgba = np.dstack([_rgb(), RNG.integers(0, 256, (9, 13), dtype=np.uint8)])
    a = rgba[..., 3:].astype(np.float64) / 255.0
    expected = rgba[..., :3] * a + 255.0 * (1 - a)
    got_u8 = _hwc(to_rgb_tensor(rgba)).astype(np.float64)
    assert np.abs(got_u8 - expected).max() < 1.0  # truncated like transformers' tensor path
    got_float = _hwc(to_rgb_tensor(rgba.astype(np.float32) / 255.0)).astype(np.float64)
    assert np.abs(got_float - expected).max() < 1e-3
    got_tensor = _hwc(to_rgb_tensor(torch.from_numpy(rgba).permute(2, 0, 1)))
    assert np.array_equal(got_tensor, got_u8)


def test_tensor_layout_is_channels_first():
    a = _rgb()
    t = torch.from_numpy(a).permute(2, 0, 1)
    assert np.array_equal(_hwc(to_rgb_tensor(t)), a)
    assert np.array_equal(_hwc(to_rgb_tensor(t[0])), np.repeat(a[..., :1], 3, axis=2))
    with pytest.raises(ValueError, match=r"\(C, H, W\).*channels last"):
        to_rgb_tensor(torch.from_numpy(a))


@pytest.mark.parametrize(
    "bad, error, message",
    [
        (np.zeros((3, 8, 9), np.uint8), ValueError, "channels first"),
        (np.zeros((8, 9, 2), np.uint8), ValueError, r"got shape \(8, 9, 2\)"),
        (np.zeros((2, 8, 9, 3), np.uint8), ValueError, r"got shape \(2, 8, 9, 3\)"),
        (np.zeros((8, 9, 3), np.int32), TypeError, "int32"),
        (np.zeros((8, 9, 3), bool), TypeError, "bool"),
        (np.full((8, 9, 3), 2.0), ValueError, r"\[0, 1\]"),
        (np.full((8, 9, 3), np.nan), ValueError, "NaN"),
        (torch.zeros(5, 8, 9), ValueError, r"got shape \(5, 8, 9\)"),
        (torch.zeros(3, 8, 9, dtype=torch.int64), TypeError, "int64"),
        (torch.full((3, 8, 9), -0.5), ValueError, r"\[0, 1\]"),
        ([[0, 1], [2, 3]], TypeError, "list"),
    ],
)
def test_bad_inputs_raise_clear_errors(bad, error, message):
    with pytest.raises(error, match=message):
        to_rgb_tensor(bad)
