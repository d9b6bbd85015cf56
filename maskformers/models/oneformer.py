"""OneFormer: one set of weights for semantic, instance and panoptic segmentation, conditioned on a task.

The same backbone, pixel decoder and masked-attention decoder as Mask2Former (the shared modules, not
copies). What differs is where the decoder's queries come from:

    task prompt ids (B, 77) -> TaskEncoder -> task token (B, C) -> head norm -> task query (B, 1, C)
    QueryTransformer(mask features, task query) -> object queries (B, Q-1, C)
    queries = [object queries, task query] (B, Q, C)  -> MultiScaleMaskedTransformerDecoder

The decoder's head LayerNorm is shared with the task token (one module, ``transformer_decoder.head.norm``).
In training, a :class:`~maskformers.models.text_mapper.TextMapper` turns class prompts into text queries
for the query-text contrastive loss.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .backbone import build_backbone
from .builders import build_pixel_decoder, build_transformer_decoder, check_backbone
from .config import SWIN_SPECS, OneFormerConfig
from .pixel_decoder import MSDeformAttnPixelDecoder
from .pretrained import PretrainedMixin
from .query_transformer import QueryTransformer
from .task_encoder import TaskEncoder
from .text_mapper import TextMapper
from .transformer_decoder import MultiScaleMaskedTransformerDecoder

__all__ = ["OneFormer", "OneFormerConfig", "OneFormerOutput", "build_oneformer", "oneformer_config", "TASKS"]

TASKS = ("semantic", "instance", "panoptic")

# dataset -> (number of classes, queries of the large models; Swin-T and R-50 use 150)
_DATASETS: dict[str, tuple[int, int]] = {
    "ade20k": (150, 250),
    "coco": (133, 150),
    "cityscapes": (19, 250),
    "mapillary-vistas": (65, 250),
}
# the D2ConvNeXt of the original configs: 7x7 depthwise kernels, layer scale (LSIT 1.0); the spec
# weights_convert.d2_backbone reads from their checkpoints
_CONVNEXT_SPECS = {
    f"convnext-{size}": {"name": "convnext", "depths": [3, 3, 27, 3], "dims": dims, "kernel_size": 7,
                         "layer_scale_init_value": 1.0, "in_chans": 3}
    for size, dims in (("large", [192, 384, 768, 1536]), ("xlarge", [256, 512, 1024, 2048]))
}


@dataclass
class OneFormerOutput:
    """class_logits (B, Q, K+1), last class is "no object"; mask_logits (B, Q, H/4, W/4); aux_outputs:
    the earlier predictions as ``{"class_logits", "mask_logits"}`` dicts, oldest first; hidden_states
    (B, Q, C): the decoder's last-layer queries; task_token (B, C): the task encoder's output (before the
    norm, as transformers returns it); contrastive_queries (B, Q, C): the queries given to the decoder
    (object queries + normalised task token); text_queries (B, Q, C) when ``text_inputs`` were given."""

    class_logits: torch.Tensor
    mask_logits: torch.Tensor
    aux_outputs: list[dict[str, torch.Tensor]]
    hidden_states: torch.Tensor
    task_token: torch.Tensor
    contrastive_queries: torch.Tensor
    text_queries: torch.Tensor | None = None


torch.export.register_dataclass(OneFormerOutput)


class OneFormer(PretrainedMixin, nn.Module):
    """OneFormer for task-conditioned semantic, instance and panoptic segmentation.

    Parameters of its own: ``query_embed`` (Embedding Q x C, the queries' position embeddings),
    ``task_encoder``, ``query_transformer`` and, for training, ``text_mapper`` (or None).
    """

    checkpoint_type = "oneformer"

    def __init__(
        self,
        *,
        backbone: nn.Module,
        pixel_decoder: MSDeformAttnPixelDecoder,
        transformer_decoder: MultiScaleMaskedTransformerDecoder,
        task_encoder: TaskEncoder,
        query_transformer: QueryTransformer,
        num_queries: int = 150,
        use_task_norm: bool = True,
        text_mapper: TextMapper | None = None,
        config: OneFormerConfig | None = None,
        id2label: Mapping[int, str] | None = None,
    ) -> None:
        super().__init__()
        if num_queries < 2:
            raise ValueError(f"num_queries must be >= 2 (object queries + the task query), got {num_queries}")
        self.backbone = backbone
        self.pixel_decoder = pixel_decoder
        self.transformer_decoder = transformer_decoder
        self.task_encoder = task_encoder
        self.query_transformer = query_transformer
        self.text_mapper = text_mapper
        self.query_embed = nn.Embedding(num_queries, transformer_decoder.hidden_dim)
        self.use_task_norm = use_task_norm
        self.config = config
        self.id2label = {int(k): str(v) for k, v in (id2label or {}).items()}
        self.preprocessor_config: dict[str, Any] | None = None
        self.class_info: dict[str, Any] | None = None  # the checkpoint's class metadata (thing ids), if any

    @property
    def num_classes(self) -> int:
        return self.transformer_decoder.head.num_classes

    @property
    def num_queries(self) -> int:
        return self.query_embed.num_embeddings

    def forward(
        self,
        pixel_values: torch.Tensor,
        task_inputs: torch.Tensor,
        *,
        pixel_mask: torch.Tensor | None = None,
        text_inputs: torch.Tensor | None = None,
    ) -> OneFormerOutput:
        """pixel_values (B, 3, H, W), normalized; task_inputs (B, 77) token ids of "the task is {task}";
        pixel_mask (B, H, W) is only checked for shape (the published models attend to padding too);
        text_inputs (B, num_text, 77) token ids of the class prompts (training, needs the text mapper)."""
        if pixel_values.dim() != 4:
            raise ValueError(f"expected pixel_values (B, C, H, W), got {tuple(pixel_values.shape)}")
        B, _, H, W = pixel_values.shape
        if pixel_mask is not None and tuple(pixel_mask.shape) != (B, H, W):
            raise ValueError(f"expected pixel_mask (B, H, W) = {(B, H, W)}, got {tuple(pixel_mask.shape)}")
        if task_inputs.dim() != 2 or task_inputs.shape[0] != B:
            raise ValueError(f"expected task_inputs (B={B}, sequence), got {tuple(task_inputs.shape)}")
        if text_inputs is not None and self.text_mapper is None:
            raise ValueError("text_inputs given but this OneFormer has no text mapper (built with with_text_mapper=False)")

        features = self.backbone(pixel_values)
        mask_features, multi_scale = self.pixel_decoder(features)
        task_token = self.task_encoder(task_inputs).to(mask_features.dtype)  # (B, C)
        task_query = task_token[:, None]  # (B, 1, C)
        if self.use_task_norm:
            task_query = self.transformer_decoder.head.norm(task_query)
        object_queries = self.query_transformer(
            mask_features, self.query_embed.weight[:-1], task_query if self.use_task_norm else None
        )  # (B, Q-1, C)
        queries = torch.cat([object_queries, task_query], dim=1)  # (B, Q, C): the task query last
        predictions, hidden_states = self.transformer_decoder(
            multi_scale, mask_features, queries, self.query_embed.weight[None]
        )
        aux = [{"class_logits": c, "mask_logits": m} for c, m in predictions[:-1]]
        class_logits, mask_logits = predictions[-1]
        text_queries = None if text_inputs is None else self.text_mapper(text_inputs)
        return OneFormerOutput(
            class_logits=class_logits, mask_logits=mask_logits, aux_outputs=aux, hidden_states=hidden_states,
            task_token=task_token, contrastive_queries=queries, text_queries=text_queries,
        )


def build_oneformer(
    config: OneFormerConfig,
    *,
    backbone: nn.Module | None = None,
    id2label: Mapping[int, str] | None = None,
) -> OneFormer:
    """A randomly initialised OneFormer for ``config`` (backbone built from ``config.backbone`` unless given)."""
    backbone = check_backbone(build_backbone(config.backbone) if backbone is None else backbone)
    text_mapper = None
    if config.with_text_mapper:
        text_mapper = TextMapper(
            hidden_dim=config.hidden_dim, width=config.text_width, context_length=config.text_context_length,
            num_layers=config.text_layers, num_heads=config.text_heads, vocab_size=config.text_vocab_size,
            proj_layers=config.text_proj_layers, n_ctx=config.text_n_ctx, causal=config.text_causal_mask,
        )
    return OneFormer(
        backbone=backbone,
        pixel_decoder=build_pixel_decoder(config, backbone),
        transformer_decoder=build_transformer_decoder(config),
        task_encoder=TaskEncoder(
            task_seq_len=config.task_seq_len, hidden_dim=config.hidden_dim, num_layers=config.task_mlp_layers
        ),
        query_transformer=QueryTransformer(
            hidden_dim=config.hidden_dim, mask_dim=config.mask_dim, num_heads=config.num_heads,
            num_layers=config.query_dec_layers, ffn_dim=config.decoder_ffn_dim, dropout=config.query_dropout,
            pre_norm=config.pre_norm,
        ),
        num_queries=config.num_queries,
        use_task_norm=config.use_task_norm,
        text_mapper=text_mapper,
        config=config,
        id2label=id2label,
    )


def oneformer_config(
    backbone: str = "swin-tiny", dataset: str = "ade20k", *, num_queries: int | None = None,
    with_text_mapper: bool = False,
) -> OneFormerConfig:
    """Config of a published variant, e.g. ``oneformer_config("swin-large", "coco")``.

    backbone: "swin-tiny" | "swin-large" | "convnext-large" | "convnext-xlarge" | "resnet-50" (and the
    DiNAT ones once registered); dataset: "ade20k" | "coco" | "cityscapes" | "mapillary-vistas". Queries:
    150 for Swin-T, R-50 and every COCO model, 250 for the other large models, as the original configs.
    """
    if dataset not in _DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; expected one of {sorted(_DATASETS)}")
    num_classes, large_queries = _DATASETS[dataset]
    if backbone in SWIN_SPECS:
        spec = dict(SWIN_SPECS[backbone])
    elif backbone in _CONVNEXT_SPECS:
        spec = dict(_CONVNEXT_SPECS[backbone])
    elif backbone == "resnet-50":
        spec = {"name": "resnet", "depth": 50}
    else:
        raise ValueError(f"unknown backbone {backbone!r}; expected one of {sorted(SWIN_SPECS) + sorted(_CONVNEXT_SPECS)}"
                         " or 'resnet-50'")
    if num_queries is None:
        num_queries = 150 if backbone in ("swin-tiny", "swin-small", "resnet-50") else large_queries
    return OneFormerConfig(
        backbone=spec, num_classes=num_classes, num_queries=num_queries, with_text_mapper=with_text_mapper
    )
