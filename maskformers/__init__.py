"""maskformers: Mask2Former (and OneFormer) in plain PyTorch.

    from maskformers import Mask2Former, ImageProcessor, post_process_panoptic

    model = Mask2Former.from_pretrained("facebook/mask2former-swin-tiny-coco-panoptic")
    processor = ImageProcessor.from_pretrained("facebook/mask2former-swin-tiny-coco-panoptic")

The deformable attention op lives in :mod:`maskformers.ops`, the building blocks in
:mod:`maskformers.models` and :mod:`maskformers.layers`.
"""

from .models.mask2former import Mask2Former, Mask2FormerConfig, Mask2FormerOutput
from .processing import ImageProcessor, post_process_instance, post_process_panoptic, post_process_semantic

__version__ = "0.1.0"

__all__ = [
    "ImageProcessor",
    "Mask2Former",
    "Mask2FormerConfig",
    "Mask2FormerOutput",
    "__version__",
    "post_process_instance",
    "post_process_panoptic",
    "post_process_semantic",
]
