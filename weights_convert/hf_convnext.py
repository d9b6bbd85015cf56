"""transformers ``ConvNextBackbone`` weights -> ``maskformers.models.convnext.ConvNeXtBackbone`` (timm names).

transformers names (files and in-memory agree): ``embeddings.{patch_embeddings, layernorm}`` (the stem),
``encoder.stages.{s}.downsampling_layer.{0,1}`` (LayerNorm + 2x2 convolution, stages s >= 1),
``encoder.stages.{s}.layers.{b}.{dwconv, layernorm, pwconv1, pwconv2, layer_scale_parameter}`` and
``hidden_states_norms.stage{k}``. Ours: ``stem.{0,1}``, ``stages.{s}.downsample.{0,1}``,
``stages.{s}.blocks.{b}.{conv_dw, norm, mlp.fc1, mlp.fc2, gamma}`` and ``norms.{k-1}``.
"""

from __future__ import annotations

import re

from weights_convert.rules import Rule

__all__ = ["rules"]

_PARAM = r"(weight|bias)"


def rules(src_prefix: str = "", dst_prefix: str = "") -> list[Rule]:
    """Rename table for a ``ConvNextBackbone`` state dict whose keys start with ``src_prefix``."""
    p, d = re.escape(src_prefix), dst_prefix
    block = p + r"encoder\.stages\.(\d+)\.layers\.(\d+)\."
    return [
        Rule(p + r"embeddings\.patch_embeddings\." + _PARAM, rf"{d}stem.0.\1"),
        Rule(p + r"embeddings\.layernorm\." + _PARAM, rf"{d}stem.1.\1"),
        Rule(p + r"encoder\.stages\.(\d+)\.downsampling_layer\.([01])\." + _PARAM, rf"{d}stages.\1.downsample.\2.\3"),
        Rule(block + r"dwconv\." + _PARAM, rf"{d}stages.\1.blocks.\2.conv_dw.\3"),
        Rule(block + r"layernorm\." + _PARAM, rf"{d}stages.\1.blocks.\2.norm.\3"),
        Rule(block + r"pwconv([12])\." + _PARAM, rf"{d}stages.\1.blocks.\2.mlp.fc\3.\4"),
        Rule(block + r"layer_scale_parameter", rf"{d}stages.\1.blocks.\2.gamma"),
        Rule(p + r"hidden_states_norms\.stage([1-9]\d*)\." + _PARAM, lambda m: f"{d}norms.{int(m[1]) - 1}.{m[2]}"),
    ]
