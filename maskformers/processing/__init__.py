"""Pre- and post-processing: image loading, ImageProcessor (Mask2Former), OneFormerProcessor with its CLIP
tokenizer and class info, segmentation post-processing."""

from .class_info import ClassInfo, load_class_info
from .clip_tokenizer import CLIPTokenizer
from .image_processor import ImageProcessor
from .io import ImageLoadError, load_image, to_rgb_tensor
from .oneformer_processor import OneFormerProcessor, segmentation_map_to_masks
from .postprocess import post_process_instance, post_process_panoptic, post_process_semantic
from .resample import valid_region_logits

__all__ = [
    "CLIPTokenizer",
    "ClassInfo",
    "ImageLoadError",
    "ImageProcessor",
    "OneFormerProcessor",
    "load_class_info",
    "load_image",
    "post_process_instance",
    "post_process_panoptic",
    "post_process_semantic",
    "segmentation_map_to_masks",
    "to_rgb_tensor",
    "valid_region_logits",
]
