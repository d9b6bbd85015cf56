"""Pre- and post-processing for Mask2Former: image loading, ImageProcessor, segmentation post-processing."""

from .clip_tokenizer import CLIPTokenizer
from .image_processor import ImageProcessor
from .io import ImageLoadError, load_image, to_rgb_tensor
from .postprocess import post_process_instance, post_process_panoptic, post_process_semantic, valid_region_logits

__all__ = [
    "CLIPTokenizer",
    "ImageLoadError",
    "ImageProcessor",
    "load_image",
    "post_process_instance",
    "post_process_panoptic",
    "post_process_semantic",
    "to_rgb_tensor",
    "valid_region_logits",
]
