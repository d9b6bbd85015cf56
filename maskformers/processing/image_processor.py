"""Mask2Former input preprocessing: resize, rescale + normalize, pad to the batch with a pixel mask.

Follows transformers' ``Mask2FormerImageProcessor`` (torchvision backend) step by step so that
``pixel_values`` come out identical for the same images (see tests/test_processing_image_processor.py):

1. resize to the configured size ({"height", "width"} fixed; {"shortest_edge", "longest_edge"} keeping the
   aspect ratio by the DETR rule; {"max_height", "max_width"} fitting inside), then round each side UP to a
   multiple of ``size_divisor`` (the image is stretched to it, not padded); ``F.interpolate`` with
   antialiasing, on uint8 where torchvision does so and through float + round where it does not;
2. rescale and normalize fused in float32: ``(x - mean / rescale_factor) / (std / rescale_factor)``;
3. pad bottom/right with zeros to the largest size in the batch (or ``pad_size``); ``pixel_mask`` is int64,
   1 on image pixels. ``size_divisibility`` > 0 (not a transformers option; 0 by default) rounds that
   canvas up to a multiple of it, as the original repositories pad (detectron2's ``SIZE_DIVISIBILITY: 32``,
   ``ImageList.from_tensors``): the image keeps its resized size and the model sees zeros around it, where
   transformers stretches the image by ``size_divisor`` instead. The two give different logits; pick the
   one the model was trained with. The key round-trips through ``preprocessor_config.json``
   (transformers keeps unknown keys there and ignores them).

The output also carries, per image, its original (H, W) and its resized (h, w) inside the padded canvas:
post-processing needs both to map predictions back (``maskformers.processing.postprocess``).
"""

from __future__ import annotations

import json
import math
import os
import platform
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .io import ImageInput, to_rgb_tensor

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "ImageProcessor", "resized_size"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CONFIG_NAME = "preprocessor_config.json"

# PIL resampling codes (as stored in preprocessor_config.json) -> F.interpolate mode
_RESAMPLE = {0: "nearest-exact", 2: "bilinear", 3: "bicubic"}
_RESAMPLE_NAMES = {"nearest": 0, "nearest-exact": 0, "bilinear": 2, "bicubic": 3}
_SIZE_KEYS = ({"height", "width"}, {"shortest_edge", "longest_edge"}, {"max_height", "max_width"})
# keys of transformers' config that carry no preprocessing meaning here
_IGNORED_KEYS = {
    "image_processor_type", "feature_extractor_type", "processor_class", "_max_size", "num_labels",
    "default_to_square", "data_format", "input_data_format", "return_tensors", "disable_grouping", "device",
}


def _parse_size(size: Any, max_size: int | None = None) -> dict[str, int]:
    if isinstance(size, int) and not isinstance(size, bool):
        if max_size is None:
            raise ValueError(
                f"size={size} (shortest edge) needs max_size (the longest edge); "
                "or pass size={'height': h, 'width': w}"
            )
        size = {"shortest_edge": size, "longest_edge": max_size}
    elif isinstance(size, (list, tuple)) and len(size) == 2:
        size = {"height": size[0], "width": size[1]}
    if not isinstance(size, dict):
        raise TypeError(f"size must be a dict, an int (with max_size) or (height, width), got {size!r}")
    size = {k: v for k, v in size.items() if v is not None}
    if set(size) not in _SIZE_KEYS:
        raise ValueError(
            f"size must have keys {{'height', 'width'}}, {{'shortest_edge', 'longest_edge'}} or "
            f"{{'max_height', 'max_width'}}, got {size}"
        )
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size.values()):
        raise ValueError(f"size values must be positive ints, got {size}")
    return dict(size)


def resized_size(height: int, width: int, size: dict[str, int], size_divisor: int = 0) -> tuple[int, int]:
    """Output (h, w) of the resize step for an image of (height, width), divisor rounding included."""
    if "height" in size:
        out_h, out_w = size["height"], size["width"]
    elif "max_height" in size:
        scale = min(size["max_height"] / height, size["max_width"] / width)
        out_h, out_w = int(height * scale), int(width * scale)
    else:
        # DETR rule: shortest edge -> target, unless that pushes the longest edge past its cap
        target, cap = size["shortest_edge"], size["longest_edge"]
        short, long = float(min(height, width)), float(max(height, width))
        capped = None
        if long / short * target > cap:
            capped = cap * short / long
            target = int(round(capped))
        scaled = capped if capped is not None else target
        if min(height, width) == target:
            out_h, out_w = height, width
        elif width < height:
            out_h, out_w = int(scaled * height / width), target
        else:
            out_h, out_w = target, int(scaled * width / height)
    if size_divisor > 0:
        out_h = math.ceil(out_h / size_divisor) * size_divisor
        out_w = math.ceil(out_w / size_divisor) * size_divisor
    return out_h, out_w


def _native_uint8(mode: str, device: torch.device) -> bool:
    """Whether torchvision would resize uint8 directly (else: float32, round, back to uint8)."""
    if mode == "nearest-exact":
        return True
    if device.type != "cpu":
        return False
    if mode == "bicubic":
        return True
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") or platform.machine() in ("aarch64", "arm64")


def _resize(image: torch.Tensor, out_size: tuple[int, int], mode: str) -> torch.Tensor:
    """(3, H, W) uint8/float32 -> (3, h, w) same dtype, antialiased for bilinear/bicubic."""
    if tuple(image.shape[-2:]) == out_size:
        return image
    antialias = mode != "nearest-exact"
    batch = image.unsqueeze(0)  # (1, 3, H, W)
    if image.dtype == torch.uint8 and not _native_uint8(mode, image.device):
        out = F.interpolate(batch.to(torch.float32), size=out_size, mode=mode, antialias=antialias)
        if mode == "bicubic":
            out = out.clamp_(0, 255)
        out = out.round_().to(torch.uint8)
    else:
        out = F.interpolate(batch, size=out_size, mode=mode, antialias=antialias)
    return out[0]


class ImageProcessor:
    """Turn images into Mask2Former inputs.

    Call it on one image or a list (paths, PIL images, numpy (H, W[, C]), tensors ([C, ]H, W); see
    ``maskformers.processing.io``). Returns a dict of tensors on ``device``:
    ``pixel_values`` (B, 3, H, W) float32, ``pixel_mask`` (B, H, W) int64 (1 = image pixel),
    ``image_sizes`` (B, 2) int64 resized (h, w) inside the canvas, ``original_sizes`` (B, 2) int64 (H, W).
    """

    def __init__(
        self,
        *,
        size: dict[str, int] | Sequence[int] | int | None = None,
        max_size: int | None = None,
        size_divisor: int = 32,
        resample: int | str = 2,
        do_resize: bool = True,
        do_rescale: bool = True,
        rescale_factor: float = 1 / 255,
        do_normalize: bool = True,
        image_mean: float | Sequence[float] = IMAGENET_MEAN,
        image_std: float | Sequence[float] = IMAGENET_STD,
        pad_size: dict[str, int] | Sequence[int] | None = None,
        ignore_index: int | None = None,
        do_reduce_labels: bool = False,
        size_divisibility: int = 0,
    ) -> None:
        if size is None:  # transformers' default, with max_size as the longest edge when given
            size = {"shortest_edge": 800, "longest_edge": max_size or 1333}
        self.size = _parse_size(size, max_size)
        if not isinstance(size_divisor, int) or size_divisor < 0:
            raise ValueError(f"size_divisor must be an int >= 0, got {size_divisor!r}")
        self.size_divisor = size_divisor
        if not isinstance(size_divisibility, int) or isinstance(size_divisibility, bool) or size_divisibility < 0:
            raise ValueError(f"size_divisibility must be an int >= 0, got {size_divisibility!r}")
        self.size_divisibility = size_divisibility
        code = _RESAMPLE_NAMES.get(resample.lower()) if isinstance(resample, str) else int(resample)
        if code not in _RESAMPLE:
            raise ValueError(f"resample must be 0 (nearest), 2 (bilinear) or 3 (bicubic), got {resample!r}")
        self.resample = code
        self.do_resize, self.do_rescale, self.do_normalize = bool(do_resize), bool(do_rescale), bool(do_normalize)
        if not rescale_factor or not math.isfinite(rescale_factor):
            raise ValueError(f"rescale_factor must be a finite nonzero number, got {rescale_factor!r}")
        self.rescale_factor = float(rescale_factor)
        self.image_mean = self._three("image_mean", image_mean)
        self.image_std = self._three("image_std", image_std)
        if any(s == 0 for s in self.image_std):
            raise ValueError(f"image_std must be nonzero, got {self.image_std}")
        self.pad_size = None if pad_size is None else _parse_size(pad_size)
        if self.pad_size is not None and set(self.pad_size) != {"height", "width"}:
            raise ValueError(f"pad_size must be {{'height', 'width'}}, got {pad_size}")
        self.ignore_index = ignore_index  # label settings, kept for round-tripping configs (labels: training)
        self.do_reduce_labels = bool(do_reduce_labels)

    @staticmethod
    def _three(name: str, value: float | Sequence[float]) -> tuple[float, float, float]:
        values = (float(value),) * 3 if isinstance(value, (int, float)) else tuple(float(v) for v in value)
        if len(values) != 3:
            raise ValueError(f"{name} must be one float or three (R, G, B), got {value!r}")
        return values  # type: ignore[return-value]

    # ------------------------------------------------------------------ configs
    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> "ImageProcessor":
        """Build from a transformers ``preprocessor_config.json`` dict; unknown keys raise."""
        config = dict(config)
        if "reduce_labels" in config:  # older name
            config.setdefault("do_reduce_labels", config.pop("reduce_labels"))
        if config.pop("do_convert_rgb", True) is False:
            raise ValueError("do_convert_rgb=False is not supported: images are always converted to RGB")
        known = set().union(*(getattr(c.__init__, "__kwdefaults__", None) or {} for c in cls.__mro__))
        if "class_info" not in known:  # class names and thing ids saved beside the settings: not preprocessing
            config.pop("class_info", None)
        unknown = sorted(set(config) - _IGNORED_KEYS - known)
        if unknown:
            raise ValueError(f"unknown preprocessor config keys: {unknown}")
        return cls(**{k: v for k, v in config.items() if k not in _IGNORED_KEYS})

    @classmethod
    def from_pretrained(
        cls, source: str | os.PathLike | dict[str, Any], *, revision: str | None = None
    ) -> "ImageProcessor":
        """From a config dict, a ``preprocessor_config.json`` file, a folder holding one, or a hub id."""
        if isinstance(source, dict):
            return cls.from_dict(source)
        path = os.fspath(source)
        if os.path.isdir(path):
            path = os.path.join(path, CONFIG_NAME)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"no {CONFIG_NAME} in folder {os.fspath(source)!r}")
        elif not os.path.isfile(path):
            from huggingface_hub import hf_hub_download  # only for hub ids

            path = hf_hub_download(repo_id=path, filename=CONFIG_NAME, revision=revision)
        with open(path, encoding="utf-8") as f:
            try:
                config = json.load(f)
            except json.JSONDecodeError as error:
                raise ValueError(f"could not parse {path!r} as JSON: {error}") from error
        return cls.from_dict(config)

    def to_dict(self) -> dict[str, Any]:
        """Config dict in transformers' key names (``from_dict(to_dict())`` round-trips)."""
        return {
            "size": dict(self.size), "size_divisor": self.size_divisor, "resample": self.resample,
            "do_resize": self.do_resize, "do_rescale": self.do_rescale, "rescale_factor": self.rescale_factor,
            "do_normalize": self.do_normalize, "image_mean": list(self.image_mean), "image_std": list(self.image_std),
            "pad_size": None if self.pad_size is None else dict(self.pad_size),
            "ignore_index": self.ignore_index, "do_reduce_labels": self.do_reduce_labels,
            "size_divisibility": self.size_divisibility,
        }

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.to_dict().items())})"

    # ------------------------------------------------------------------ processing
    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """(h, w) an image of (height, width) is resized to (unchanged when ``do_resize`` is off)."""
        if not self.do_resize:
            return height, width
        return resized_size(height, width, self.size, self.size_divisor)

    def _normalize(self, image: torch.Tensor) -> torch.Tensor:
        """(3, h, w) uint8/float32 on the 0..255 scale -> float32, rescaled and normalized as configured."""
        if self.do_normalize:
            mean = torch.tensor(self.image_mean, dtype=torch.float32, device=image.device)
            std = torch.tensor(self.image_std, dtype=torch.float32, device=image.device)
            if self.do_rescale:  # fold the rescale into mean/std, as transformers does
                mean, std = mean * (1.0 / self.rescale_factor), std * (1.0 / self.rescale_factor)
            return (image.to(torch.float32) - mean[:, None, None]) / std[:, None, None]
        if self.do_rescale:
            return image.to(torch.float32) * self.rescale_factor
        return image.to(torch.float32)

    def __call__(
        self, images: ImageInput | Sequence[ImageInput], *, device: torch.device | str | None = None
    ) -> dict[str, torch.Tensor]:
        """Preprocess one image or a batch; returns the dict described in the class docstring."""
        device = torch.device("cpu" if device is None else device)
        batch = self._as_list(images)
        if not batch:
            raise ValueError("images is empty: expected at least one image")
        mode = _RESAMPLE[self.resample]
        processed, original_sizes, image_sizes = [], [], []
        for image in batch:
            rgb = to_rgb_tensor(image).to(device)  # (3, H, W) uint8 or float32, 0..255
            height, width = rgb.shape[-2:]
            if height == 0 or width == 0:
                raise ValueError(f"image {len(processed)} is empty: size {(height, width)}")
            out_size = self.output_size(height, width)
            if min(out_size) < 1:  # before F.interpolate fails on it
                raise ValueError(
                    f"image {len(processed)} of size {(height, width)} (height, width) is too thin to process: "
                    f"size {self.size} would resize it to {out_size}"
                )
            resized = _resize(rgb, out_size, mode)
            processed.append(self._normalize(resized))
            original_sizes.append((height, width))
            image_sizes.append(out_size)

        if self.pad_size is not None:
            canvas = (self.pad_size["height"], self.pad_size["width"])
        else:
            canvas = (max(h for h, _ in image_sizes), max(w for _, w in image_sizes))
        if self.size_divisibility > 0:  # the original repositories' padding to a multiple (ImageList)
            d = self.size_divisibility
            canvas = (math.ceil(canvas[0] / d) * d, math.ceil(canvas[1] / d) * d)
        too_big = [s for s in image_sizes if s[0] > canvas[0] or s[1] > canvas[1]]
        if too_big:
            raise ValueError(f"pad_size {canvas} is smaller than resized image sizes {too_big}")
        pixel_values = torch.zeros((len(batch), 3, *canvas), dtype=torch.float32, device=device)
        pixel_mask = torch.zeros((len(batch), *canvas), dtype=torch.int64, device=device)
        for i, (image, (h, w)) in enumerate(zip(processed, image_sizes)):
            pixel_values[i, :, :h, :w] = image
            pixel_mask[i, :h, :w] = 1
        return {
            "pixel_values": pixel_values,
            "pixel_mask": pixel_mask,
            "image_sizes": torch.tensor(image_sizes, dtype=torch.int64, device=device),
            "original_sizes": torch.tensor(original_sizes, dtype=torch.int64, device=device),
        }

    @staticmethod
    def _as_list(images: Any) -> list[ImageInput]:
        if isinstance(images, (list, tuple)):
            return list(images)
        if isinstance(images, np.ndarray) and images.ndim == 4:  # (B, H, W, C)
            return list(images)
        if isinstance(images, torch.Tensor) and images.dim() == 4:  # (B, C, H, W)
            return list(images.unbind(0))
        return [images]
