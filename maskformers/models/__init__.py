"""Model building blocks: backbones, pixel decoders, transformer decoders and the composed models."""

from maskformers.models.backbone import (
    ResNetBackbone,
    SwinBackbone,
    backbone_from_hf_config,
    resnet_backbone,
    swin_backbone,
)

__all__ = [
    "ResNetBackbone",
    "SwinBackbone",
    "backbone_from_hf_config",
    "resnet_backbone",
    "swin_backbone",
]
