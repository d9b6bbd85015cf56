"""maskformers: Mask2Former and OneFormer in plain PyTorch.

    import maskformers

    model = maskformers.from_pretrained("facebook/mask2former-swin-tiny-coco-panoptic")  # or a OneFormer
    processor = maskformers.ImageProcessor.from_pretrained("facebook/mask2former-swin-tiny-coco-panoptic")
    # OneFormer: maskformers.OneFormerProcessor.from_pretrained(...)(images, "panoptic") adds task_inputs
    maskformers.finetune(model, reader, out="runs/ft", max_steps=500)  # writes runs/ft/final (and best/)

The deformable attention op lives in :mod:`maskformers.ops`, the building blocks in
:mod:`maskformers.models` and :mod:`maskformers.layers`. Names are imported on first use, so
``import maskformers`` costs little more than ``import torch``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._lazy import lazy_exports

__version__ = "0.1.0"

_EXPORTS = {
    "finetune": ".training.run",
    "from_pretrained": ".hub",
    "CheckpointError": ".hub",
    "Mask2Former": ".models.mask2former",
    "Mask2FormerOutput": ".models.mask2former",
    "Mask2FormerConfig": ".models.config",
    "OneFormer": ".models.oneformer",
    "OneFormerOutput": ".models.oneformer",
    "OneFormerConfig": ".models.config",
    "ImageProcessor": ".processing.image_processor",
    "OneFormerProcessor": ".processing.oneformer_processor",
    "post_process_instance": ".processing.postprocess",
    "post_process_panoptic": ".processing.postprocess",
    "post_process_semantic": ".processing.postprocess",
}

__all__ = ["__version__", *sorted(_EXPORTS)]
__getattr__, __dir__ = lazy_exports(__name__, globals(), _EXPORTS)

if TYPE_CHECKING:
    from .hub import CheckpointError, from_pretrained
    from .models.config import Mask2FormerConfig, OneFormerConfig
    from .models.mask2former import Mask2Former, Mask2FormerOutput
    from .models.oneformer import OneFormer, OneFormerOutput
    from .processing.image_processor import ImageProcessor
    from .processing.oneformer_processor import OneFormerProcessor
    from .processing.postprocess import post_process_instance, post_process_panoptic, post_process_semantic
    from .training.run import finetune
