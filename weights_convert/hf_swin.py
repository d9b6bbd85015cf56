"""transformers ``SwinBackbone`` weights -> ``maskformers.models.backbone.SwinBackbone`` (timm names).

Accepts both layouts transformers produces:

* hub files and ``save_pretrained`` output (v4 names, which transformers 5 writes back on save):
  ``embeddings.patch_embeddings.projection``, ``encoder.layers.{s}.blocks.{b}.attention.self.{query,key,value}``,
  ``attention.self.relative_position_bias_table``, ``attention.output.dense``, ``intermediate.dense``,
  ``output.dense``, ``layernorm_before/after``, ``encoder.layers.{s}.downsample.*``,
  ``hidden_states_norms.stage{k}``; v4 files also hold ``relative_position_index`` buffers (dropped);
* the transformers 5 in-memory ``state_dict()``: a ``swin.`` infix before ``embeddings``/``encoder``,
  ``attention.{q,k,v,o}_proj``, ``attention.relative_position_bias.relative_position_bias_table``,
  ``mlp.fc1/fc2``.

q, k and v are concatenated (rows, in that order) into ``attn.qkv``; ``encoder.layers.{s}.downsample``
becomes ``layers.{s+1}.downsample`` (timm merges patches at the start of the next stage);
``hidden_states_norms.stage{k}`` becomes ``norms.{k-1}``. The unused final ``layernorm`` (with or
without the ``swin.`` infix, present in transformers 5 files) is dropped.
"""

from __future__ import annotations

import re

from weights_convert.rules import Rule

__all__ = ["rules"]

_PARAM = r"(weight|bias)"


def rules(src_prefix: str = "", dst_prefix: str = "") -> list[Rule]:
    """Rename table for a ``SwinBackbone`` state dict whose keys start with ``src_prefix``
    (e.g. ``"model.pixel_level_module.encoder."``) onto keys starting with ``dst_prefix``."""
    p = re.escape(src_prefix) + r"(?:swin\.)?"
    block = p + r"encoder\.layers\.(\d+)\.blocks\.(\d+)\."

    def to_block(name: str):
        return lambda m: f"{dst_prefix}layers.{m[1]}.blocks.{m[2]}.{name}.{m[3]}"

    def to_qkv(m: re.Match) -> str:
        return f"{dst_prefix}layers.{m[1]}.blocks.{m[2]}.attn.qkv.{m[3]}"

    table = [
        Rule(p + r"embeddings\.patch_embeddings\.projection\." + _PARAM,
             lambda m: f"{dst_prefix}patch_embed.proj.{m[1]}"),
        Rule(p + r"embeddings\.norm\." + _PARAM, lambda m: f"{dst_prefix}patch_embed.norm.{m[1]}"),
        Rule(block + r"layernorm_before\." + _PARAM, to_block("norm1")),
        Rule(block + r"layernorm_after\." + _PARAM, to_block("norm2")),
        Rule(block + r"(?:intermediate\.dense|mlp\.fc1)\." + _PARAM, to_block("mlp.fc1")),
        Rule(block + r"(?:output\.dense|mlp\.fc2)\." + _PARAM, to_block("mlp.fc2")),
        Rule(block + r"attention\.(?:output\.dense|o_proj)\." + _PARAM, to_block("attn.proj")),
        Rule(block + r"attention\.(?:self|relative_position_bias)\.(relative_position_bias_table)",
             lambda m: f"{dst_prefix}layers.{m[1]}.blocks.{m[2]}.attn.{m[3]}"),
        Rule(block + r"attention\.(?:self|relative_position_bias)\.relative_position_index", None),
    ]
    for i, (v4, v5) in enumerate([("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")]):
        table.append(Rule(block + rf"attention\.(?:self\.{v4}|{v5})\." + _PARAM, to_qkv, part=(i, 3)))
    table += [
        Rule(p + r"encoder\.layers\.(\d+)\.downsample\.(reduction\.weight|norm\.weight|norm\.bias)",
             lambda m: f"{dst_prefix}layers.{int(m[1]) + 1}.downsample.{m[2]}"),
        Rule(re.escape(src_prefix) + r"hidden_states_norms\.stage([1-9]\d*)\." + _PARAM,
             lambda m: f"{dst_prefix}norms.{int(m[1]) - 1}.{m[2]}"),
        Rule(p + r"layernorm\." + _PARAM, None),
    ]
    return table
