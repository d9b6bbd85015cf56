"""transformers ``ResNetBackbone`` weights -> ``maskformers.models.backbone.ResNetBackbone`` (timm names).

transformers names (files and in-memory agree): ``embedder.embedder.{convolution, normalization}`` (the 7x7
stem), ``encoder.stages.{s}.layers.{b}.layer.{i}.{convolution, normalization}`` (the bottleneck's three
convolutions) and ``...layers.{b}.shortcut.{convolution, normalization}`` (the projection shortcut).
Ours: ``conv1``/``bn1``, ``layer{s+1}.{b}.conv{i+1}``/``bn{i+1}``, ``layer{s+1}.{b}.downsample.{0,1}``.
``num_batches_tracked`` (a training counter of transformers' batch norms; ours are frozen) is dropped.
"""

from __future__ import annotations

import re

from weights_convert.rules import Rule

__all__ = ["rules"]

_BN = r"(weight|bias|running_mean|running_var)"


def rules(src_prefix: str = "", dst_prefix: str = "") -> list[Rule]:
    """Rename table for a ``ResNetBackbone`` state dict whose keys start with ``src_prefix``."""
    p, d = re.escape(src_prefix), dst_prefix
    layer = p + r"encoder\.stages\.(\d+)\.layers\.(\d+)\."

    def block(name: str):
        return lambda m: f"{d}layer{int(m[1]) + 1}.{m[2]}.{name}"

    return [
        Rule(p + r"embedder\.embedder\.convolution\.weight", f"{d}conv1.weight"),
        Rule(p + r"embedder\.embedder\.normalization\." + _BN, rf"{d}bn1.\1"),
        Rule(layer + r"layer\.([012])\.convolution\.weight",
             lambda m: f"{d}layer{int(m[1]) + 1}.{m[2]}.conv{int(m[3]) + 1}.weight"),
        Rule(layer + r"layer\.([012])\.normalization\." + _BN,
             lambda m: f"{d}layer{int(m[1]) + 1}.{m[2]}.bn{int(m[3]) + 1}.{m[4]}"),
        Rule(layer + r"shortcut\.convolution\.weight", block("downsample.0.weight")),
        Rule(layer + r"shortcut\.normalization\." + _BN,
             lambda m: f"{d}layer{int(m[1]) + 1}.{m[2]}.downsample.1.{m[3]}"),
        Rule(p + r"(?:embedder\.embedder|encoder\.stages\.\d+\.layers\.\d+\.(?:layer\.[012]|shortcut))\."
             r"normalization\.num_batches_tracked", None),
    ]
