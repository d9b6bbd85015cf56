"""Model building blocks: backbones, pixel decoders, transformer decoders and the composed models."""

from maskformers.models.backbone import (
    ResNetBackbone,
    SwinBackbone,
    backbone_from_hf_config,
    backbone_spec_from_hf_config,
    build_backbone,
    resnet_backbone,
    swin_backbone,
)

__all__ = [
    "ResNetBackbone",
    "SwinBackbone",
    "backbone_from_hf_config",
    "backbone_spec_from_hf_config",
    "build_backbone",
    "resnet_backbone",
    "swin_backbone",
]

from maskformers.models.mask2former import (  # noqa: E402
    DATASETS,
    Mask2Former,
    Mask2FormerConfig,
    Mask2FormerOutput,
    build_mask2former,
    mask2former_config,
)
from maskformers.models.pixel_decoder import MSDeformAttnPixelDecoder, PixelDecoderOutput  # noqa: E402
from maskformers.models.transformer_decoder import (  # noqa: E402
    MaskedAttentionDecoderLayer,
    MultiScaleMaskedTransformerDecoder,
)

__all__ += [
    "DATASETS",
    "Mask2Former",
    "Mask2FormerConfig",
    "Mask2FormerOutput",
    "MSDeformAttnPixelDecoder",
    "MaskedAttentionDecoderLayer",
    "MultiScaleMaskedTransformerDecoder",
    "PixelDecoderOutput",
    "build_mask2former",
    "mask2former_config",
]
