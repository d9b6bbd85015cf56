"""Image loading and conversion to one canonical layout: an RGB tensor (3, H, W).

Every accepted input ends up as a (3, H, W) tensor on the 0..255 value scale, either ``uint8`` (8-bit
sources, kept exact) or ``float32`` (16-bit and floating-point sources, kept unquantized). What is accepted:

- a path (``str`` or ``os.PathLike``): opened with PIL; a missing, empty, truncated or undecodable file
  raises ``ImageLoadError`` naming the file.
- a ``PIL.Image.Image``: the EXIF orientation is applied first (``ImageOps.exif_transpose``; a no-op when
  the tag is absent or was already applied). Modes:
  ``RGB`` as is; ``L``/``1``/``CMYK``/``YCbCr``/``RGBX``/``P`` through PIL's RGB conversion; anything
  with an alpha band (``RGBA``, ``LA``, ``PA``, ``P`` with a transparency entry) is composited onto a
  white background (as transformers does); ``I;16*`` and ``I`` are read as 16-bit data and divided
  by 257 (= 65535/255) to float (``I`` values outside [0, 65535] raise); ``F`` follows the float rule below.
- a ``numpy.ndarray`` laid out (H, W) or (H, W, C) with C in {1, 3, 4} (channels last, the PIL/OpenCV
  convention).
- a ``torch.Tensor`` laid out (H, W) or (C, H, W) with C in {1, 3, 4} (channels first, the torch
  convention).

Array and tensor dtypes: ``uint8`` as is; ``uint16`` divided by 257 (= 65535/255); floating point must lie in
[0, 1] and is scaled by 255. Other dtypes raise. One channel is replicated to three; a fourth channel is
alpha and is composited onto white.
"""

from __future__ import annotations

import os
from typing import Union

import numpy as np
import PIL.Image
import PIL.ImageOps
import torch

__all__ = ["ImageInput", "ImageLoadError", "load_image", "to_rgb_tensor"]

ImageInput = Union[str, os.PathLike, PIL.Image.Image, np.ndarray, torch.Tensor]

_SIXTEEN_BIT_PER_8_BIT = 257.0  # 65535 / 255: 16-bit value / 257 = 8-bit value (0 -> 0, 65535 -> 255 exactly)


class ImageLoadError(ValueError):
    """An image file could not be read (missing data, truncated, not an image)."""


def load_image(path: str | os.PathLike) -> PIL.Image.Image:
    """Open and fully decode an image file, EXIF orientation applied; errors name the file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image file not found: {path!r}")
    if os.path.getsize(path) == 0:
        raise ImageLoadError(f"could not read image {path!r}: the file is empty")
    try:
        with PIL.Image.open(path) as image:
            image.load()  # decode now, so truncated data fails here and not later
            return PIL.ImageOps.exif_transpose(image)  # a new, upright image; the file can close
    except (OSError, SyntaxError, ValueError, PIL.Image.DecompressionBombError) as error:
        raise ImageLoadError(f"could not read image {path!r}: {error}") from error


def _pil_to_tensor(image: PIL.Image.Image) -> torch.Tensor:
    image = PIL.ImageOps.exif_transpose(image)
    mode = image.mode
    if mode.startswith("I;16") or mode == "I":
        data = np.asarray(image)
        if mode == "I" and data.size and (int(data.min()) < 0 or int(data.max()) > 65535):
            raise ValueError(
                f"PIL mode 'I' image is read as 16-bit data, but its values span "
                f"[{int(data.min())}, {int(data.max())}], outside [0, 65535]"
            )
        gray = torch.from_numpy(data.astype(np.float32)) / _SIXTEEN_BIT_PER_8_BIT
        return gray.unsqueeze(0).expand(3, -1, -1).contiguous()
    if mode == "F":
        return _float_to_rgb(torch.from_numpy(np.array(image, dtype=np.float32)).unsqueeze(0), "PIL mode 'F' image")
    has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
    if has_alpha:
        rgba = image.convert("RGBA")
        white = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = PIL.Image.alpha_composite(white, rgba).convert("RGB")
    elif mode != "RGB":
        image = image.convert("RGB")
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).contiguous()  # (3, H, W)


def _float_to_rgb(image: torch.Tensor, what: str) -> torch.Tensor:
    """(C, H, W) floating point in [0, 1] -> (3, H, W) float32 on the 0..255 scale."""
    image = image.to(torch.float32)
    if image.numel():
        if not bool(torch.isfinite(image).all()):
            raise ValueError(f"{what} contains NaN or infinite values")
        low, high = float(image.min()), float(image.max())
        if low < 0.0 or high > 1.0:
            raise ValueError(
                f"{what} is floating point, so its values must lie in [0, 1]; got [{low}, {high}] "
                "(pass uint8 for 0..255 data)"
            )
    return _to_three_channels(image * 255.0)


def _to_three_channels(image: torch.Tensor) -> torch.Tensor:
    """(C, H, W) with C in {1, 3, 4} on the 0..255 scale -> (3, H, W); alpha composited onto white."""
    channels = image.shape[0]
    if channels == 1:
        return image.expand(3, -1, -1).contiguous()
    if channels == 3:
        return image.contiguous()
    if image.dtype == torch.uint8:
        # transformers' tensor path: to [0, 1], blend onto 1.0, back with x * (256 - 1e-3) truncated
        unit = image.to(torch.float32) * (1.0 / 255.0)
        rgb = unit[:3] * unit[3:] + (1.0 - unit[3:])
        return (rgb * (255.0 + 1.0 - 1e-3)).to(torch.uint8).contiguous()
    alpha = image[3:] * (1.0 / 255.0)
    return (image[:3] * alpha + 255.0 * (1.0 - alpha)).contiguous()


def _array_to_tensor(image: torch.Tensor, what: str) -> torch.Tensor:
    """(C, H, W) tensor of any accepted dtype -> (3, H, W) uint8 or float32 on the 0..255 scale."""
    if image.dtype == torch.uint8:
        return _to_three_channels(image)
    if image.dtype == torch.uint16:
        return _to_three_channels(image.to(torch.float32) / _SIXTEEN_BIT_PER_8_BIT)
    if image.is_floating_point():
        return _float_to_rgb(image, what)
    raise TypeError(
        f"{what} has dtype {image.dtype}; accepted are uint8 (0..255), uint16 (0..65535) and floating "
        "point in [0, 1]"
    )


def to_rgb_tensor(image: ImageInput) -> torch.Tensor:
    """Convert one image to (3, H, W), ``uint8`` or ``float32`` on the 0..255 scale (rules in the module doc)."""
    if isinstance(image, (str, os.PathLike)):
        path = os.fspath(image)
        loaded = load_image(path)
        try:
            return _pil_to_tensor(loaded)
        except (OSError, ValueError) as error:
            raise ImageLoadError(f"could not convert image {path!r} (mode {loaded.mode}): {error}") from error
    if isinstance(image, PIL.Image.Image):
        return _pil_to_tensor(image)
    if isinstance(image, np.ndarray):
        if image.ndim == 2:
            image = image[:, :, None]
        if image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
            looks_chw = image.ndim == 3 and image.shape[0] in (1, 3, 4)
            hint = " (channels first? use np.moveaxis(a, 0, -1))" if looks_chw else ""
            raise ValueError(
                f"expected a numpy image (H, W) or (H, W, C) with C in 1/3/4, got shape {image.shape}{hint}"
            )
        if image.dtype not in (np.uint8, np.uint16, np.float16, np.float32, np.float64):
            raise TypeError(
                f"numpy image has dtype {image.dtype}; accepted are uint8 (0..255), uint16 (0..65535) and "
                "floating point in [0, 1]"
            )
        if image.dtype == np.uint16:  # torch's uint16 support is thin: go through float32 here
            tensor = torch.from_numpy(image.astype(np.float32)) / _SIXTEEN_BIT_PER_8_BIT
            return _to_three_channels(tensor.permute(2, 0, 1))  # (C, H, W)
        tensor = torch.from_numpy(np.ascontiguousarray(image))
        return _array_to_tensor(tensor.permute(2, 0, 1), "numpy image")  # (C, H, W)
    if isinstance(image, torch.Tensor):
        tensor = image.detach()
        if tensor.dim() == 2:
            tensor = tensor.unsqueeze(0)
        if tensor.dim() != 3 or tensor.shape[0] not in (1, 3, 4):
            looks_hwc = tensor.dim() == 3 and tensor.shape[-1] in (1, 3, 4)
            hint = " (channels last? use t.permute(2, 0, 1))" if looks_hwc else ""
            raise ValueError(
                f"expected a tensor image (H, W) or (C, H, W) with C in 1/3/4, got shape {tuple(tensor.shape)}{hint}"
            )
        return _array_to_tensor(tensor, "tensor image")
    raise TypeError(
        "expected an image as a path, PIL.Image.Image, numpy.ndarray (H, W[, C]) or torch.Tensor ([C, ]H, W), "
        f"got {type(image).__name__}"
    )
