"""Mask2Former: backbone -> pixel decoder -> masked-attention transformer decoder.

``Mask2Former`` composes three modules passed in by the caller; ``build_mask2former(config)`` builds
them from a :class:`Mask2FormerConfig` (architecture only), and ``mask2former_config(backbone,
dataset)`` gives the configs of the published variants. Checkpoints load with
``Mask2Former.from_pretrained`` (see :mod:`maskformers.hub`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .backbone import build_backbone
from .pixel_decoder import MSDeformAttnPixelDecoder
from .transformer_decoder import MultiScaleMaskedTransformerDecoder

__all__ = [
    "Mask2Former",
    "Mask2FormerConfig",
    "Mask2FormerOutput",
    "build_mask2former",
    "mask2former_config",
    "SWIN_SPECS",
    "DATASETS",
]

# backbone specs: {"name": ..., **kwargs of the builder}
SWIN_SPECS: dict[str, dict[str, Any]] = {
    size: {"name": "swin", "embed_dim": dim, "depths": depths, "num_heads": heads, "window_size": window}
    for size, dim, depths, heads, window in (
        ("swin-tiny", 96, [2, 2, 6, 2], [3, 6, 12, 24], 7),
        ("swin-small", 96, [2, 2, 18, 2], [3, 6, 12, 24], 7),
        ("swin-base", 128, [2, 2, 18, 2], [4, 8, 16, 32], 12),
        ("swin-large", 192, [2, 2, 18, 2], [6, 12, 24, 48], 12),
    )
}
# dataset -> (number of classes, queries of the Swin-L model; every other backbone uses 100)
DATASETS: dict[str, tuple[int, int]] = {
    "coco-panoptic": (133, 200),
    "coco-instance": (80, 200),
    "ade-semantic": (150, 100),
    "ade-panoptic": (150, 200),
    "cityscapes-semantic": (19, 100),
    "cityscapes-panoptic": (19, 200),
    "cityscapes-instance": (8, 200),
    "mapillary-vistas-semantic": (65, 100),
    "mapillary-vistas-panoptic": (65, 200),
}


@dataclass
class Mask2FormerConfig:
    """Architecture of a Mask2Former (no loss or training settings).

    backbone: ``{"name": "swin" | "resnet", **builder kwargs}`` (see :func:`build_backbone`).
    decoder_layers counts real layers (transformers' ``decoder_layers`` is this + 1); the model makes
    ``decoder_layers + 1`` predictions. conv_dim is the pixel decoder width (transformers' ``feature_size``).
    """

    backbone: dict[str, Any] = field(default_factory=lambda: dict(SWIN_SPECS["swin-tiny"]))
    num_classes: int = 133
    num_queries: int = 100
    hidden_dim: int = 256
    conv_dim: int = 256
    mask_dim: int = 256
    num_heads: int = 8
    encoder_layers: int = 6
    encoder_ffn_dim: int = 1024
    encoder_points: int = 4
    num_feature_levels: int = 3
    common_stride: int = 4
    decoder_layers: int = 9
    decoder_ffn_dim: int = 2048
    pre_norm: bool = False
    enforce_input_projection: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Mask2FormerConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown Mask2FormerConfig field(s) {unknown}; known: {sorted(names)}")
        return cls(**dict(data))


@dataclass
class Mask2FormerOutput:
    """class_logits (B, Q, K+1), last class is "no object"; mask_logits (B, Q, H/4, W/4);
    aux_outputs: the earlier predictions (from the learned queries, then after each layer but the
    last) as ``{"class_logits": ..., "mask_logits": ...}`` dicts, oldest first."""

    class_logits: torch.Tensor
    mask_logits: torch.Tensor
    aux_outputs: list[dict[str, torch.Tensor]]


class Mask2Former(nn.Module):
    """Mask2Former for panoptic, instance and semantic segmentation.

    backbone: returns a list of (B, C_i, H_i, W_i) maps ordered by increasing stride; pixel_decoder and
    transformer_decoder as in :mod:`maskformers.models`. ``id2label`` maps class index -> name.
    """

    def __init__(
        self,
        *,
        backbone: nn.Module,
        pixel_decoder: MSDeformAttnPixelDecoder,
        transformer_decoder: MultiScaleMaskedTransformerDecoder,
        config: Mask2FormerConfig | None = None,
        id2label: Mapping[int, str] | None = None,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.pixel_decoder = pixel_decoder
        self.transformer_decoder = transformer_decoder
        self.config = config
        self.id2label = {int(k): str(v) for k, v in (id2label or {}).items()}
        self.preprocessor_config: dict[str, Any] | None = None

    @property
    def num_classes(self) -> int:
        return self.transformer_decoder.head.num_classes

    def forward(self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor | None = None) -> Mask2FormerOutput:
        """pixel_values (B, 3, H, W), normalized.

        pixel_mask (B, H, W), 1 on real pixels and 0 on padding, is only checked for shape: like the
        published models (and transformers), the network attends to padded pixels too, so results for
        a padded image depend on the padding. Crop the padding away from ``mask_logits`` in
        post-processing (the image processor does).
        """
        if pixel_values.dim() != 4:
            raise ValueError(f"expected pixel_values (B, C, H, W), got {tuple(pixel_values.shape)}")
        if pixel_mask is not None:
            B, _, H, W = pixel_values.shape
            if tuple(pixel_mask.shape) != (B, H, W):
                raise ValueError(f"expected pixel_mask (B, H, W) = {(B, H, W)}, got {tuple(pixel_mask.shape)}")
        features = self.backbone(pixel_values)
        mask_features, multi_scale = self.pixel_decoder(features)
        predictions = self.transformer_decoder(multi_scale, mask_features)
        aux = [{"class_logits": c, "mask_logits": m} for c, m in predictions[:-1]]
        class_logits, mask_logits = predictions[-1]
        return Mask2FormerOutput(class_logits=class_logits, mask_logits=mask_logits, aux_outputs=aux)

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, **kwargs: Any) -> Mask2Former:
        """Load a checkpoint: a hub id (``facebook/mask2former-swin-tiny-coco-panoptic``), a local folder
        in transformers' layout, or a folder written by :meth:`save_pretrained`. See
        :func:`maskformers.hub.load_mask2former` for the keyword arguments."""
        from ..hub import load_mask2former

        return load_mask2former(name_or_path, **kwargs)

    def save_pretrained(self, folder: str | Path) -> Path:
        """Write ``model.safetensors`` (our parameter names) and ``maskformers_config.json``."""
        from ..hub import save_mask2former

        return save_mask2former(self, folder)


def build_mask2former(
    config: Mask2FormerConfig,
    *,
    backbone: nn.Module | None = None,
    id2label: Mapping[int, str] | None = None,
) -> Mask2Former:
    """A randomly initialised Mask2Former for ``config`` (backbone built from ``config.backbone``
    unless given; it must report ``channels`` and ``strides``)."""
    backbone = build_backbone(config.backbone) if backbone is None else backbone
    for attr in ("channels", "strides"):
        if not hasattr(backbone, attr):
            raise TypeError(f"the backbone must report .{attr} (tuple per output), {type(backbone).__name__} does not")
    pixel_decoder = MSDeformAttnPixelDecoder(
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
    )
    transformer_decoder = MultiScaleMaskedTransformerDecoder(
        in_channels=config.conv_dim,
        hidden_dim=config.hidden_dim,
        num_classes=config.num_classes,
        num_queries=config.num_queries,
        num_heads=config.num_heads,
        num_layers=config.decoder_layers,
        ffn_dim=config.decoder_ffn_dim,
        mask_dim=config.mask_dim,
        num_levels=config.num_feature_levels,
        pre_norm=config.pre_norm,
        enforce_input_projection=config.enforce_input_projection,
    )
    return Mask2Former(
        backbone=backbone,
        pixel_decoder=pixel_decoder,
        transformer_decoder=transformer_decoder,
        config=config,
        id2label=id2label,
    )


def mask2former_config(
    backbone: str = "swin-tiny",
    dataset: str = "coco-panoptic",
    *,
    num_queries: int | None = None,
    window_size: int | None = None,
) -> Mask2FormerConfig:
    """Config of a published variant, e.g. ``mask2former_config("swin-large", "ade-semantic")``.

    backbone: "swin-tiny" | "swin-small" | "swin-base" | "swin-large" | "resnet-50" | "resnet-101";
    dataset: one of :data:`DATASETS`. Queries default to 200 for Swin-L panoptic/instance models and
    100 otherwise; Swin-T/S use window 7, Swin-B/L window 12 (override with ``window_size``).
    """
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; expected one of {sorted(DATASETS)}")
    num_classes, large_queries = DATASETS[dataset]
    if backbone in SWIN_SPECS:
        spec = dict(SWIN_SPECS[backbone])
        if window_size is not None:
            spec["window_size"] = window_size
    elif backbone in ("resnet-50", "resnet-101"):
        if window_size is not None:
            raise ValueError(f"window_size applies to Swin backbones, not {backbone}")
        spec = {"name": "resnet", "depth": int(backbone.split("-")[1])}
    else:
        known = sorted(SWIN_SPECS) + ["resnet-50", "resnet-101"]
        raise ValueError(f"unknown backbone {backbone!r}; expected one of {known}")
    if num_queries is None:
        num_queries = large_queries if backbone == "swin-large" else 100
    return Mask2FormerConfig(backbone=spec, num_classes=num_classes, num_queries=num_queries)
