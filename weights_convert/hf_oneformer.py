"""transformers ``OneFormerForUniversalSegmentation`` checkpoints -> ``maskformers.OneFormer`` state dicts.

Handles the hub files (v4 names) and transformers 5 ``save_pretrained`` / in-memory names (they differ
only inside the Swin backbone, which :mod:`weights_convert.hf_swin` reads both ways). The pixel decoder
keys are Mask2Former's (same rules). The rest:

* ``model.transformer_module.{queries_embedder, level_embed, input_projections}`` -> ``query_embed`` and
  the decoder's ``level_embed`` / ``input_projs``;
* ``...decoder.layers.{i}.{cross_attn.multihead_attn, self_attn.self_attn, ffn}`` -> our decoder layers
  (the packed ``in_proj`` of the cross-attention split into q, k, v);
* ``...decoder.{decoder_norm, class_embed, mask_embed.layers.{i}.0}`` -> the decoder head;
* ``...decoder.query_input_projection`` and ``...decoder.query_transformer.decoder.{layers.{i}, norm}``
  -> ``query_transformer`` (``norm1/2/3`` after self-attention / cross-attention / FFN);
* ``model.task_encoder.task_mlp.layers.{i}.0`` -> ``task_encoder.mlp.layers.{i}``;
* ``model.text_mapper.*`` (``is_training`` checkpoints) -> ``text_mapper.*``.

``criterion.empty_weight`` and ``criterion.logit_scale`` (loss state) are dropped on purpose.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from .hf_mask2former import HF_BACKBONE, HF_PIXEL_DECODER, HF_TRANSFORMER, pixel_decoder_rules
from .d2_oneformer import query_transformer_rules as _original_query_transformer_rules
from . import hf_backbones
from .rules import Rule, apply_rules, packed_qkv

__all__ = ["rules", "convert_state_dict", "decoder_rules", "query_transformer_rules", "text_mapper_rules"]

_P = r"(weight|bias)"


def decoder_rules(src: str = HF_TRANSFORMER, dst: str = "transformer_decoder.") -> list[Rule]:
    """The masked-attention decoder, its heads, the query position embeddings."""
    s, d = re.escape(src), dst
    lay = rf"{s}decoder\.layers\.(\d+)\."
    return [
        Rule(rf"{s}queries_embedder\.weight", "query_embed.weight"),
        Rule(rf"{s}level_embed\.weight", f"{d}level_embed.weight"),
        Rule(rf"{s}input_projections\.(\d+)\.{_P}", rf"{d}input_projs.\1.\2"),
        Rule(lay + rf"cross_attn\.multihead_attn\.in_proj_{_P}", None, split=packed_qkv(rf"{d}layers.\1.cross_attn.attn.", 2)),
        Rule(lay + rf"cross_attn\.multihead_attn\.out_proj\.{_P}", rf"{d}layers.\1.cross_attn.attn.out_proj.\2"),
        Rule(lay + rf"cross_attn\.norm\.{_P}", rf"{d}layers.\1.cross_attn.norm.\2"),
        Rule(lay + rf"self_attn\.self_attn\.(q_proj|k_proj|v_proj|out_proj)\.{_P}", rf"{d}layers.\1.self_attn.attn.\2.\3"),
        Rule(lay + rf"self_attn\.norm\.{_P}", rf"{d}layers.\1.self_attn.norm.\2"),
        Rule(lay + rf"ffn\.(linear1|linear2|norm)\.{_P}", rf"{d}layers.\1.ffn.\2.\3"),
        Rule(rf"{s}decoder\.decoder_norm\.{_P}", rf"{d}head.norm.\1"),
        Rule(rf"{s}decoder\.class_embed\.{_P}", rf"{d}head.class_embed.\1"),
        Rule(rf"{s}decoder\.mask_embed\.layers\.(\d+)\.0\.{_P}", rf"{d}head.mask_embed.layers.\1.\2"),
    ]


def query_transformer_rules(src: str = HF_TRANSFORMER + "decoder.", dst: str = "query_transformer.") -> list[Rule]:
    """``query_input_projection`` and ``query_transformer.decoder.*``: the original's names inside."""
    return _original_query_transformer_rules(src + "query_input_projection.", src + "query_transformer.decoder.", dst)


def text_mapper_rules(src: str = "model.text_mapper.", dst: str = "text_mapper.") -> list[Rule]:
    s, d = re.escape(src), dst
    lay = rf"{s}text_encoder\.transformer\.layers\.(\d+)\."
    return [
        Rule(rf"{s}text_encoder\.(token_embedding\.weight|positional_embedding)", rf"{d}text_encoder.\1"),
        Rule(rf"{s}text_encoder\.ln_final\.{_P}", rf"{d}text_encoder.final_norm.\1"),
        Rule(lay + rf"self_attn\.in_proj_{_P}", None, split=packed_qkv(rf"{d}text_encoder.layers.\1.attn.", 2)),
        Rule(lay + rf"self_attn\.out_proj\.{_P}", rf"{d}text_encoder.layers.\1.attn.out_proj.\2"),
        Rule(lay + rf"layer_norm([12])\.{_P}", rf"{d}text_encoder.layers.\1.norm\2.\3"),
        Rule(lay + rf"mlp\.(fc1|fc2)\.{_P}", rf"{d}text_encoder.layers.\1.mlp.\2.\3"),
        Rule(rf"{s}text_projector\.layers\.(\d+)\.0\.{_P}", rf"{d}projector.layers.\1.\2"),
        Rule(rf"{s}prompt_ctx\.weight", rf"{d}prompt_ctx.weight"),
    ]


def rules(backbone_type: str = "swin") -> list[Rule]:
    """The whole rename table of a ``OneFormerForUniversalSegmentation`` checkpoint."""
    return [
        *hf_backbones.rules(backbone_type, HF_BACKBONE, "backbone.", model="transformers OneFormer"),
        *pixel_decoder_rules(HF_PIXEL_DECODER, "pixel_decoder."),
        *query_transformer_rules(),
        *decoder_rules(),
        Rule(r"model\.task_encoder\.task_mlp\.layers\.(\d+)\.0\.(weight|bias)", r"task_encoder.mlp.layers.\1.\2"),
        *text_mapper_rules(),
        Rule(r"criterion\.(empty_weight|logit_scale)", None),  # loss state, not part of the model
    ]


def convert_state_dict(
    state_dict: Mapping[str, torch.Tensor], *, backbone_type: str = "swin", source: str = "transformers checkpoint"
) -> dict[str, torch.Tensor]:
    """Rename a transformers OneFormer state dict to ours; raises ``ConversionError`` listing every key no
    rule uses, duplicates and bad splits."""
    return hf_backbones.after_rules(backbone_type, apply_rules(state_dict, rules(backbone_type), source=source))
