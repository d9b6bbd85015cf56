"""transformers ``Mask2FormerForUniversalSegmentation`` checkpoints -> ``maskformers.Mask2Former`` state dicts.

Handles files written by transformers 4.x (the hub checkpoints) and by 5.x ``save_pretrained`` (which
writes the same 4.x names plus an unused ``...encoder.swin.layernorm``; the backbone rules decide), with a
Swin, ResNet, ConvNeXt or DiNAT ``backbone_config`` (:mod:`weights_convert.hf_backbones`).
Pure functions of a state dict: a regex rename table on :mod:`weights_convert.rules` plus one split
(the packed ``nn.MultiheadAttention.in_proj_*`` of the cross-attention into q, k, v, in that order).
``criterion.empty_weight`` (a loss buffer) is dropped on purpose; any other unused key is an error.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from . import hf_backbones
from .rules import Rule, apply_rules

__all__ = ["pixel_decoder_rules", "transformer_decoder_rules", "query_rules", "rules", "convert_state_dict"]

HF_BACKBONE = "model.pixel_level_module.encoder."
HF_PIXEL_DECODER = "model.pixel_level_module.decoder."
HF_TRANSFORMER = "model.transformer_module."


def pixel_decoder_rules(src: str = HF_PIXEL_DECODER, dst: str = "pixel_decoder.") -> list[Rule]:
    """``Mask2FormerPixelDecoder`` -> :class:`maskformers.models.MSDeformAttnPixelDecoder`."""
    s, d = re.escape(src), dst
    enc = rf"{s}encoder\.layers\.(\d+)\."
    return [
        Rule(rf"{s}level_embed", f"{d}level_embed"),
        Rule(rf"{s}input_projections\.(\d+)\.([01])\.(weight|bias)", rf"{d}input_projs.\1.\2.\3"),
        Rule(
            enc + r"self_attn\.(sampling_offsets|attention_weights|value_proj|output_proj)\.(weight|bias)",
            rf"{d}encoder.layers.\1.self_attn.\2.\3",
        ),
        Rule(enc + r"self_attn_layer_norm\.(weight|bias)", rf"{d}encoder.layers.\1.norm1.\2"),
        Rule(enc + r"fc1\.(weight|bias)", rf"{d}encoder.layers.\1.linear1.\2"),
        Rule(enc + r"fc2\.(weight|bias)", rf"{d}encoder.layers.\1.linear2.\2"),
        Rule(enc + r"final_layer_norm\.(weight|bias)", rf"{d}encoder.layers.\1.norm2.\2"),
        Rule(rf"{s}mask_projection\.(weight|bias)", rf"{d}mask_features.\1"),
        # adapter_{i+1} / layer_{i+1} belong to backbone feature i
        Rule(rf"{s}adapter_(\d+)\.([01])\.(weight|bias)", lambda m: f"{d}lateral_convs.{int(m[1]) - 1}.{m[2]}.{m[3]}"),
        Rule(rf"{s}layer_(\d+)\.([01])\.(weight|bias)", lambda m: f"{d}output_convs.{int(m[1]) - 1}.{m[2]}.{m[3]}"),
    ]


def transformer_decoder_rules(
    src: str = HF_TRANSFORMER, dst: str = "transformer_decoder.", class_src: str = "class_predictor."
) -> list[Rule]:
    """``Mask2FormerTransformerModule`` + top-level ``class_predictor`` ->
    :class:`maskformers.models.MultiScaleMaskedTransformerDecoder`."""
    s, d = re.escape(src), dst
    lay = rf"{s}decoder\.layers\.(\d+)\."
    return [
        Rule(rf"{s}level_embed\.weight", f"{d}level_embed.weight"),
        Rule(rf"{s}input_projections\.(\d+)\.(weight|bias)", rf"{d}input_projs.\1.\2"),
        Rule(lay + r"self_attn\.(q_proj|k_proj|v_proj|out_proj)\.(weight|bias)", rf"{d}layers.\1.self_attn.attn.\2.\3"),
        Rule(lay + r"self_attn_layer_norm\.(weight|bias)", rf"{d}layers.\1.self_attn.norm.\2"),
        Rule(
            lay + r"cross_attn\.in_proj_(weight|bias)",
            None,
            split=tuple(rf"{d}layers.\1.cross_attn.attn.{p}_proj.\2" for p in ("q", "k", "v")),
        ),
        Rule(lay + r"cross_attn\.out_proj\.(weight|bias)", rf"{d}layers.\1.cross_attn.attn.out_proj.\2"),
        Rule(lay + r"cross_attn_layer_norm\.(weight|bias)", rf"{d}layers.\1.cross_attn.norm.\2"),
        Rule(lay + r"fc1\.(weight|bias)", rf"{d}layers.\1.ffn.linear1.\2"),
        Rule(lay + r"fc2\.(weight|bias)", rf"{d}layers.\1.ffn.linear2.\2"),
        Rule(lay + r"final_layer_norm\.(weight|bias)", rf"{d}layers.\1.ffn.norm.\2"),
        Rule(rf"{s}decoder\.layernorm\.(weight|bias)", rf"{d}head.norm.\1"),
        Rule(
            rf"{s}decoder\.mask_predictor\.mask_embedder\.(\d+)\.0\.(weight|bias)", rf"{d}head.mask_embed.layers.\1.\2"
        ),
        Rule(rf"{re.escape(class_src)}(weight|bias)", rf"{d}head.class_embed.\1"),
    ]


def query_rules(src: str = HF_TRANSFORMER, dst: str = "") -> list[Rule]:
    """Mask2Former's learned queries: ``queries_features`` (content) and ``queries_embedder`` (position)
    -> :class:`maskformers.models.Mask2Former` ``query_feat`` / ``query_embed``."""
    s = re.escape(src)
    return [
        Rule(rf"{s}queries_embedder\.weight", f"{dst}query_embed.weight"),
        Rule(rf"{s}queries_features\.weight", f"{dst}query_feat.weight"),
    ]


def rules(backbone_type: str = "swin") -> list[Rule]:
    """The whole rename table of a ``Mask2FormerForUniversalSegmentation`` checkpoint."""
    return [
        *hf_backbones.rules(backbone_type, HF_BACKBONE, "backbone.", model="transformers Mask2Former"),
        *pixel_decoder_rules(),
        *transformer_decoder_rules(),
        *query_rules(),
        Rule(r"criterion\.empty_weight", None),  # loss buffer (class weights), not part of the model
    ]


def convert_state_dict(
    state_dict: Mapping[str, torch.Tensor], *, backbone_type: str = "swin", source: str = "transformers checkpoint"
) -> dict[str, torch.Tensor]:
    """Rename a transformers Mask2Former state dict to ours; raises ``ConversionError`` listing every
    key no rule uses, duplicates and bad splits."""
    return hf_backbones.after_rules(backbone_type, apply_rules(state_dict, rules(backbone_type), source=source))
