"""The one preprocessing rule of a model: its saved ``preprocessor_config.json``.

``maskformers segment``, ``maskformers evaluate``, the evaluations during training and the Python API all
preprocess a model's images with :func:`image_processor_for` (resize, normalise, pad as the model's
``preprocessor_config`` says), so the same image gives the same prediction everywhere. A model without one
(an older folder, a model built in Python) gets the transformers default (:class:`ImageProcessor` ``()``:
shortest edge 800, longest 1333), said once.

Fine-tuning writes the settings it trained with (:func:`training_processor_config`): the size at which an
image meets the model at scale 1 of the training augmentation, ImageNet normalisation and zero padding to a
multiple of 32 (``size_divisibility``) as the training batches have, and the class names with their thing/stuff
split (``class_info``, the layout OneFormer's checkpoints
use; :func:`class_info_of` reads it back).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .class_info import ClassInfo, load_class_info
from .image_processor import IMAGENET_MEAN, IMAGENET_STD, ImageProcessor

__all__ = ["image_processor_for", "training_processor_config", "class_info_of"]

_PIXEL_KEYS = frozenset(ImageProcessor().to_dict())


def image_processor_for(model: Any, *, say: Callable[[str], None] | None = None) -> ImageProcessor:
    """The :class:`ImageProcessor` of ``model``'s ``preprocessor_config`` (pixel settings only, also for a
    OneFormer), or the default one (``say`` is told so) when the model carries none."""
    config = getattr(model, "preprocessor_config", None)
    if not config:
        if say is not None:
            say("the model carries no preprocessor_config.json: its images are preprocessed by the default "
                "ImageProcessor() (shortest edge 800, longest 1333, ImageNet normalisation)")
        return ImageProcessor()
    if getattr(model, "task_encoder", None) is not None:  # OneFormer keys (class info, text lengths) aside
        from .oneformer_processor import OneFormerProcessor

        config = OneFormerProcessor.from_dict(config).to_dict()
    return ImageProcessor.from_dict({k: v for k, v in config.items() if k in _PIXEL_KEYS})


def training_processor_config(task: str, crop_size: int, class_info: ClassInfo | None = None) -> dict[str, Any]:
    """``preprocessor_config.json`` of a model trained with crops of ``crop_size``: panoptic / instance
    (large-scale jitter around "fit the image into crop x crop") resize to fit ``crop_size`` x ``crop_size``;
    semantic (random shortest side around ``crop_size``) resize the shortest side to ``crop_size`` (longest at
    most 4x). ImageNet mean/std on the 0..255 scale and padding to a multiple of 32, as the training batches.
    ``class_info`` adds the class names and thing ids."""
    size = ({"shortest_edge": crop_size, "longest_edge": 4 * crop_size} if task == "semantic"
            else {"max_height": crop_size, "max_width": crop_size})
    config = ImageProcessor(size=size, size_divisor=0, size_divisibility=32, image_mean=IMAGENET_MEAN,
                            image_std=IMAGENET_STD).to_dict()
    if class_info is not None:
        config["class_info"] = class_info.to_dict()
    return config


def class_info_of(model: Any) -> ClassInfo | None:
    """The class names and thing ids saved with ``model`` (``preprocessor_config["class_info"]``), if any."""
    info = (getattr(model, "preprocessor_config", None) or {}).get("class_info")
    return None if info is None else load_class_info(info)
