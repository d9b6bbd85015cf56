"""Original OneFormer DiNAT weights (detectron2 ``D2DiNAT``, keys under ``backbone.``) ->
``maskformers.models.dinat.DiNATBackbone``.

The original module tree is ours: ``patch_embed.proj.{0,1}``, ``patch_embed.norm``,
``levels.{i}.blocks.{j}.{norm1, attn.qkv, attn.rpb, attn.proj, norm2, mlp.fc1, mlp.fc2, gamma1, gamma2}``,
``levels.{i}.downsample.{reduction.weight, norm}`` keep their names; the output norms ``norm{i}`` become
``norms.{i}``. Arrays from a ``.pkl`` must be turned into tensors (``torch.as_tensor``) before conversion.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from weights_convert.rules import Rule, apply_rules

__all__ = ["convert", "rules"]

_PARAM = r"(weight|bias)"


def rules(src_prefix: str = "backbone.", dst_prefix: str = "") -> list[Rule]:
    """Rename table for a D2DiNAT state dict (keys under ``src_prefix``)."""
    p = re.escape(src_prefix)
    block = p + r"levels\.(\d+)\.blocks\.(\d+)\."
    return [
        Rule(p + r"patch_embed\.(proj\.[01]|norm)\." + _PARAM, lambda m: f"{dst_prefix}patch_embed.{m[1]}.{m[2]}"),
        Rule(block + r"(norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\." + _PARAM,
             lambda m: f"{dst_prefix}levels.{m[1]}.blocks.{m[2]}.{m[3]}.{m[4]}"),
        Rule(block + r"(attn\.rpb|gamma1|gamma2)", lambda m: f"{dst_prefix}levels.{m[1]}.blocks.{m[2]}.{m[3]}"),
        Rule(p + r"levels\.(\d+)\.downsample\.(reduction\.weight|norm\.weight|norm\.bias)",
             lambda m: f"{dst_prefix}levels.{m[1]}.downsample.{m[2]}"),
        Rule(p + r"norm(\d+)\." + _PARAM, lambda m: f"{dst_prefix}norms.{m[1]}.{m[2]}"),
    ]


def convert(state_dict: Mapping[str, torch.Tensor], src_prefix: str = "backbone.", dst_prefix: str = "") -> dict[
        str, torch.Tensor]:
    """The ``backbone.*`` part of a D2DiNAT state dict renamed for ``DiNATBackbone`` (other keys must be
    filtered out first); raises ``ConversionError`` unless every key is accounted for."""
    return apply_rules(state_dict, rules(src_prefix, dst_prefix), source="OneFormer D2DiNAT weights")
