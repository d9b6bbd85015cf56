"""Model building blocks: backbones, pixel decoders, transformer decoders and the composed models.

Names are imported on first use (the backbones import timm)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_exports

_EXPORTS = {
    "ConvNeXtBackbone": ".convnext",
    "convnext_backbone": ".convnext",
    "ResNetBackbone": ".backbone",
    "SwinBackbone": ".backbone",
    "build_backbone": ".backbone",
    "resnet_backbone": ".backbone",
    "swin_backbone": ".backbone",
    "MaskFormerConfig": ".config",
    "Mask2FormerConfig": ".config",
    "OneFormerConfig": ".config",
    "build_pixel_decoder": ".builders",
    "build_transformer_decoder": ".builders",
    "materialize": ".builders",
    "DiNATBackbone": ".dinat",
    "dinat_backbone": ".dinat",
    "dinat_large": ".dinat",
    "OneFormer": ".oneformer",
    "OneFormerOutput": ".oneformer",
    "build_oneformer": ".oneformer",
    "oneformer_config": ".oneformer",
    "QueryTransformer": ".query_transformer",
    "TaskEncoder": ".task_encoder",
    "TextMapper": ".text_mapper",
    "DATASETS": ".mask2former",
    "Mask2Former": ".mask2former",
    "Mask2FormerOutput": ".mask2former",
    "build_mask2former": ".mask2former",
    "mask2former_config": ".mask2former",
    "MSDeformAttnPixelDecoder": ".pixel_decoder",
    "PixelDecoderOutput": ".pixel_decoder",
    "DecoderOutput": ".transformer_decoder",
    "MaskedAttentionDecoderLayer": ".transformer_decoder",
    "MultiScaleMaskedTransformerDecoder": ".transformer_decoder",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, globals(), _EXPORTS)

if TYPE_CHECKING:
    from .convnext import ConvNeXtBackbone, convnext_backbone
    from .backbone import ResNetBackbone, SwinBackbone, build_backbone, resnet_backbone, swin_backbone
    from .builders import build_pixel_decoder, build_transformer_decoder, materialize
    from .config import Mask2FormerConfig, MaskFormerConfig, OneFormerConfig
    from .dinat import DiNATBackbone, dinat_backbone, dinat_large
    from .oneformer import OneFormer, OneFormerOutput, build_oneformer, oneformer_config
    from .query_transformer import QueryTransformer
    from .task_encoder import TaskEncoder
    from .text_mapper import TextMapper
    from .mask2former import DATASETS, Mask2Former, Mask2FormerOutput, build_mask2former, mask2former_config
    from .pixel_decoder import MSDeformAttnPixelDecoder, PixelDecoderOutput
    from .transformer_decoder import DecoderOutput, MaskedAttentionDecoderLayer, MultiScaleMaskedTransformerDecoder
