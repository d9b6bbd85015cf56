"""Mask2Former: backbone -> pixel decoder -> masked-attention transformer decoder.

``Mask2Former`` composes three modules passed in by the caller; ``build_mask2former(config)`` builds
them from a :class:`Mask2FormerConfig` (architecture only), and ``mask2former_config(backbone,
dataset)`` gives the configs of the published variants. Checkpoints load with
``Mask2Former.from_pretrained`` (see :mod:`maskformers.hub`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .backbone import build_backbone
from .builders import build_pixel_decoder, build_transformer_decoder, check_backbone
from .config import SWIN_SPECS, Mask2FormerConfig
from .pixel_decoder import MSDeformAttnPixelDecoder
from .pretrained import PretrainedMixin
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
class Mask2FormerOutput:
    """class_logits (B, Q, K+1), last class is "no object"; mask_logits (B, Q, H/4, W/4);
    aux_outputs: the earlier predictions (from the learned queries, then after each layer but the
    last) as ``{"class_logits": ..., "mask_logits": ...}`` dicts, oldest first; hidden_states
    (B, Q, C): the decoder's last-layer queries (before the heads' norm)."""

    class_logits: torch.Tensor
    mask_logits: torch.Tensor
    aux_outputs: list[dict[str, torch.Tensor]]
    hidden_states: torch.Tensor


# a pytree node, so that torch.export / torch.compile can return it
torch.export.register_dataclass(Mask2FormerOutput)


class Mask2Former(PretrainedMixin, nn.Module):
    """Mask2Former for panoptic, instance and semantic segmentation.

    backbone: returns a list of (B, C_i, H_i, W_i) maps ordered by increasing stride; pixel_decoder and
    transformer_decoder as in :mod:`maskformers.models`. ``id2label`` maps class index -> name.

    Parameters of its own: ``query_feat`` (content) and ``query_embed`` (position), Embedding Q x C:
    the learned initial queries given to the decoder.
    """

    checkpoint_type = "mask2former"

    def __init__(
        self,
        *,
        backbone: nn.Module,
        pixel_decoder: MSDeformAttnPixelDecoder,
        transformer_decoder: MultiScaleMaskedTransformerDecoder,
        num_queries: int = 100,
        config: Mask2FormerConfig | None = None,
        id2label: Mapping[int, str] | None = None,
    ) -> None:
        super().__init__()
        if num_queries < 1:
            raise ValueError(f"num_queries must be >= 1, got {num_queries}")
        self.backbone = backbone
        self.pixel_decoder = pixel_decoder
        self.transformer_decoder = transformer_decoder
        hidden_dim = transformer_decoder.hidden_dim
        self.query_feat = nn.Embedding(num_queries, hidden_dim)
        self.query_embed = nn.Embedding(num_queries, hidden_dim)
        self.config = config
        self.id2label = {int(k): str(v) for k, v in (id2label or {}).items()}
        self.preprocessor_config: dict[str, Any] | None = None

    @property
    def num_classes(self) -> int:
        return self.transformer_decoder.head.num_classes

    @property
    def num_queries(self) -> int:
        return self.query_feat.num_embeddings

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
        queries = self.query_feat.weight[None].expand(pixel_values.shape[0], -1, -1)  # (B, Q, C)
        predictions, hidden_states = self.transformer_decoder(
            multi_scale, mask_features, queries, self.query_embed.weight[None]
        )
        aux = [{"class_logits": c, "mask_logits": m} for c, m in predictions[:-1]]
        class_logits, mask_logits = predictions[-1]
        return Mask2FormerOutput(
            class_logits=class_logits, mask_logits=mask_logits, aux_outputs=aux, hidden_states=hidden_states
        )


def build_mask2former(
    config: Mask2FormerConfig,
    *,
    backbone: nn.Module | None = None,
    id2label: Mapping[int, str] | None = None,
) -> Mask2Former:
    """A randomly initialised Mask2Former for ``config`` (backbone built from ``config.backbone``
    unless given; it must report ``channels`` and ``strides``)."""
    backbone = check_backbone(build_backbone(config.backbone) if backbone is None else backbone)
    return Mask2Former(
        backbone=backbone,
        pixel_decoder=build_pixel_decoder(config, backbone),
        transformer_decoder=build_transformer_decoder(config),
        num_queries=config.num_queries,
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
