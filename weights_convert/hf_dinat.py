"""transformers ``DinatBackbone`` weights -> ``maskformers.models.dinat.DiNATBackbone`` (original names).

transformers names (hub files, ``save_pretrained`` output and the in-memory ``state_dict()`` agree):
``embeddings.patch_embeddings.projection.{0,1}``, ``embeddings.norm``,
``encoder.levels.{s}.layers.{b}.{layernorm_before, attention.self.{query,key,value,rpb},
attention.output.dense, layernorm_after, intermediate.dense, output.dense, layer_scale_parameters}``,
``encoder.levels.{s}.downsample.{reduction,norm}`` (end of level s, as ours) and ``hidden_states_norms.stage{k}``.

query, key and value are concatenated (rows, in that order) into ``attn.qkv``; ``hidden_states_norms.stage{k}``
becomes ``norms.{k-1}``. ``layer_scale_parameters`` (2, C) is split into ``gamma1``/``gamma2``; the rule
engine keeps the (1, C) shape of the chunks, so :func:`convert` (or :func:`flatten_layer_scale` after
``apply_rules`` with these rules) makes them (C,). The OneFormer DiNAT checkpoints have no layer scale.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from weights_convert.rules import Rule, apply_rules

__all__ = ["convert", "flatten_layer_scale", "rules", "unflatten_layer_scale"]

_PARAM = r"(weight|bias)"


def rules(src_prefix: str = "", dst_prefix: str = "") -> list[Rule]:
    """Rename table for a ``DinatBackbone`` state dict whose keys start with ``src_prefix``
    (e.g. ``"model.pixel_level_module.encoder."``) onto keys starting with ``dst_prefix``."""
    p = re.escape(src_prefix)
    block = p + r"encoder\.levels\.(\d+)\.layers\.(\d+)\."

    def to_block(name: str):
        return lambda m: f"{dst_prefix}levels.{m[1]}.blocks.{m[2]}.{name}.{m[3]}"

    def to_qkv(m: re.Match) -> str:
        return f"{dst_prefix}levels.{m[1]}.blocks.{m[2]}.attn.qkv.{m[3]}"

    table = [
        Rule(p + r"embeddings\.patch_embeddings\.projection\.([01])\." + _PARAM,
             lambda m: f"{dst_prefix}patch_embed.proj.{m[1]}.{m[2]}"),
        Rule(p + r"embeddings\.norm\." + _PARAM, lambda m: f"{dst_prefix}patch_embed.norm.{m[1]}"),
        Rule(block + r"layernorm_before\." + _PARAM, to_block("norm1")),
        Rule(block + r"layernorm_after\." + _PARAM, to_block("norm2")),
        Rule(block + r"intermediate\.dense\." + _PARAM, to_block("mlp.fc1")),
        Rule(block + r"output\.dense\." + _PARAM, to_block("mlp.fc2")),
        Rule(block + r"attention\.output\.dense\." + _PARAM, to_block("attn.proj")),
        Rule(block + r"attention\.self\.rpb", lambda m: f"{dst_prefix}levels.{m[1]}.blocks.{m[2]}.attn.rpb"),
        Rule(block + r"layer_scale_parameters", None, split=(
            rf"{dst_prefix}levels.\1.blocks.\2.gamma1", rf"{dst_prefix}levels.\1.blocks.\2.gamma2")),
    ]
    for i, name in enumerate(("query", "key", "value")):
        table.append(Rule(block + rf"attention\.self\.{name}\." + _PARAM, to_qkv, part=(i, 3)))
    table += [
        Rule(p + r"encoder\.levels\.(\d+)\.downsample\.(reduction\.weight|norm\.weight|norm\.bias)",
             lambda m: f"{dst_prefix}levels.{m[1]}.downsample.{m[2]}"),
        Rule(p + r"hidden_states_norms\.stage([1-9]\d*)\." + _PARAM,
             lambda m: f"{dst_prefix}norms.{int(m[1]) - 1}.{m[2]}"),
    ]
    return table


def flatten_layer_scale(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Give the ``gamma1``/``gamma2`` chunks of ``layer_scale_parameters`` the block's (C,) shape, in place."""
    for key, value in state_dict.items():
        if key.endswith((".gamma1", ".gamma2")) and value.dim() == 2 and value.shape[0] == 1:
            state_dict[key] = value.reshape(-1)
    return state_dict


def unflatten_layer_scale(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of :func:`flatten_layer_scale`: (C,) ``gamma1``/``gamma2`` -> (1, C) chunks, in place, so that
    writing them back concatenates them into transformers' (2, C) ``layer_scale_parameters``."""
    for key, value in state_dict.items():
        if key.endswith((".gamma1", ".gamma2")) and value.dim() == 1:
            state_dict[key] = value.reshape(1, -1)
    return state_dict


def convert(
    state_dict: Mapping[str, torch.Tensor], src_prefix: str = "", dst_prefix: str = ""
) -> dict[str, torch.Tensor]:
    """A ``DinatBackbone`` state dict renamed for ``DiNATBackbone``; raises ``ConversionError`` unless
    every key is accounted for."""
    out = apply_rules(state_dict, rules(src_prefix, dst_prefix), source="transformers DinatBackbone weights")
    return flatten_layer_scale(out)
