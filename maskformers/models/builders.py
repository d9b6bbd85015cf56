"""Builders shared by Mask2Former and OneFormer: the pixel decoder and the masked-attention decoder
from the shared fields of a config (:class:`~maskformers.models.config.MaskFormerConfig`).

They read the config and call the modules' plain keyword constructors; nothing else. Use the
constructors directly to build a variant the config cannot express.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import MaskFormerConfig
from .pixel_decoder import MSDeformAttnPixelDecoder
from .transformer_decoder import MultiScaleMaskedTransformerDecoder

__all__ = ["build_pixel_decoder", "build_transformer_decoder", "check_backbone", "materialize"]


def check_backbone(backbone: nn.Module) -> nn.Module:
    """``backbone`` if it reports ``channels`` and ``strides`` (one per output feature), else a TypeError."""
    for attr in ("channels", "strides"):
        if not hasattr(backbone, attr):
            raise TypeError(f"the backbone must report .{attr} (tuple per output), {type(backbone).__name__} does not")
    return backbone


def build_pixel_decoder(config: MaskFormerConfig, backbone: nn.Module) -> MSDeformAttnPixelDecoder:
    """The MSDeformAttn pixel decoder for ``backbone``'s features (its ``channels`` and ``strides``)."""
    check_backbone(backbone)
    return MSDeformAttnPixelDecoder(
        in_channels=backbone.channels,
        in_strides=backbone.strides,
        conv_dim=config.conv_dim,
        mask_dim=config.mask_dim,
        num_heads=config.num_heads,
        num_layers=config.encoder_layers,
        ffn_dim=config.encoder_ffn_dim,
        num_points=config.encoder_points,
        num_levels=config.num_feature_levels,
        common_stride=config.common_stride,
        dropout=config.encoder_dropout,
    )


def build_transformer_decoder(
    config: MaskFormerConfig, *, head_norm: nn.Module | None = None
) -> MultiScaleMaskedTransformerDecoder:
    """The masked-attention decoder with its prediction heads (``head_norm``: see the decoder)."""
    return MultiScaleMaskedTransformerDecoder(
        in_channels=config.conv_dim,
        hidden_dim=config.hidden_dim,
        num_classes=config.num_classes,
        num_heads=config.num_heads,
        num_layers=config.decoder_layers,
        ffn_dim=config.decoder_ffn_dim,
        mask_dim=config.mask_dim,
        num_levels=config.num_feature_levels,
        pre_norm=config.pre_norm,
        enforce_input_projection=config.enforce_input_projection,
        head_norm=head_norm,
    )


def materialize(model: nn.Module, device: torch.device | str = "cpu") -> nn.Module:
    """Give a model built under ``torch.device("meta")`` real (uninitialised) storage on ``device`` and
    recompute its non-persistent buffers (Swin's relative position index), which no state dict carries;
    then load weights with ``load_state_dict``. Returns ``model``."""
    model.to_empty(device=device)
    for name, module in model.named_modules():
        transient = [b for b in module._buffers if b in module._non_persistent_buffers_set]
        if not transient:
            continue
        init = getattr(module, "init_non_persistent_buffers", None)
        if init is None:
            raise TypeError(
                f"{name or type(model).__name__} ({type(module).__name__}) has non-persistent buffers {transient} "
                "and no init_non_persistent_buffers() to recompute them after to_empty (timm too old?)"
            )
        init()
    return model
