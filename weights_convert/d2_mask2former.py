"""Original facebookresearch/Mask2Former checkpoints (detectron2 ``.pkl`` model-zoo files and ``.pth``
training checkpoints) -> ``maskformers.Mask2Former`` state dicts.

Key layout of the original: ``backbone.*`` (D2 Swin or ResNet; renamed by :mod:`weights_convert.d2_backbone`),
``sem_seg_head.pixel_decoder.*`` (``input_proj.{l}.{0,1}``, ``transformer.level_embed``,
``transformer.encoder.layers.{k}.{self_attn.*, linear1, linear2, norm1, norm2}``, ``mask_features``,
``adapter_{i}`` / ``layer_{i}`` detectron2 convs with a ``.norm``) and ``sem_seg_head.predictor.*``
(``query_feat``, ``query_embed``, ``level_embed``, ``input_proj.{l}``, packed ``in_proj`` of the
self- and cross-attention layers, ``transformer_ffn_layers``, ``decoder_norm``, ``class_embed``,
``mask_embed.layers.{i}``). ``criterion.empty_weight`` and the ``pixel_mean``/``pixel_std`` buffers are
dropped on purpose; anything else unused is an error.

``load_checkpoint`` reads a ``.pkl`` with a restricted unpickler that can only rebuild numpy arrays,
dicts and strings (a pickle that asks for anything else is refused, so no code runs), and ``.pth``
files with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .checkpoint_io import UnsafePickleError, load_d2_checkpoint
from .d2_backbone import backbone_rules, detect_d2_backbone
from .rules import ConversionError, Rule, apply_rules, packed_qkv

__all__ = [
    "load_checkpoint", "rules", "convert_state_dict", "infer_architecture", "shared_architecture", "decoder_rules",
    "pixel_decoder_rules", "predictor_rules", "UnsafePickleError",
]

PIXEL_DECODER = "sem_seg_head.pixel_decoder."
PREDICTOR = "sem_seg_head.predictor."


def load_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """The model state dict of an original checkpoint file (see :func:`weights_convert.checkpoint_io.load_d2_checkpoint`)."""
    return load_d2_checkpoint(path)


def pixel_decoder_rules(src: str = PIXEL_DECODER, dst: str = "pixel_decoder.") -> list[Rule]:
    s, d = re.escape(src), dst
    enc = rf"{s}transformer\.encoder\.layers\.(\d+)\."
    return [
        Rule(rf"{s}transformer\.level_embed", f"{d}level_embed"),
        Rule(rf"{s}input_proj\.(\d+)\.([01])\.(weight|bias)", rf"{d}input_projs.\1.\2.\3"),
        Rule(
            enc + r"self_attn\.(sampling_offsets|attention_weights|value_proj|output_proj)\.(weight|bias)",
            rf"{d}encoder.layers.\1.self_attn.\2.\3",
        ),
        Rule(enc + r"(linear1|linear2|norm1|norm2)\.(weight|bias)", rf"{d}encoder.layers.\1.\2.\3"),
        Rule(rf"{s}mask_features\.(weight|bias)", rf"{d}mask_features.\1"),
        # detectron2 Conv2d(norm=GN): adapter_{i+1} / layer_{i+1} belong to backbone feature i
        Rule(rf"{s}adapter_(\d+)\.weight", lambda m: f"{d}lateral_convs.{int(m[1]) - 1}.0.weight"),
        Rule(rf"{s}adapter_(\d+)\.norm\.(weight|bias)", lambda m: f"{d}lateral_convs.{int(m[1]) - 1}.1.{m[2]}"),
        Rule(rf"{s}layer_(\d+)\.weight", lambda m: f"{d}output_convs.{int(m[1]) - 1}.0.weight"),
        Rule(rf"{s}layer_(\d+)\.norm\.(weight|bias)", lambda m: f"{d}output_convs.{int(m[1]) - 1}.1.{m[2]}"),
    ]


def decoder_rules(src: str = PREDICTOR, dst: str = "transformer_decoder.") -> list[Rule]:
    """The masked-attention decoder and its heads (shared by Mask2Former and OneFormer), plus the queries'
    position embeddings ``query_embed`` (a top-level parameter of both of our models)."""
    s, d = re.escape(src), dst
    qkv = lambda prefix: packed_qkv(prefix, 2)  # noqa: E731
    sa, ca, ffn = (rf"{s}transformer_{n}_layers\.(\d+)\." for n in ("self_attention", "cross_attention", "ffn"))
    return [
        Rule(rf"{s}query_embed\.weight", "query_embed.weight"),
        Rule(rf"{s}level_embed\.weight", rf"{d}level_embed.weight"),
        Rule(rf"{s}input_proj\.(\d+)\.(weight|bias)", rf"{d}input_projs.\1.\2"),
        Rule(sa + r"self_attn\.in_proj_(weight|bias)", None, split=qkv(rf"{d}layers.\1.self_attn.attn.")),
        Rule(sa + r"self_attn\.out_proj\.(weight|bias)", rf"{d}layers.\1.self_attn.attn.out_proj.\2"),
        Rule(sa + r"norm\.(weight|bias)", rf"{d}layers.\1.self_attn.norm.\2"),
        Rule(ca + r"multihead_attn\.in_proj_(weight|bias)", None, split=qkv(rf"{d}layers.\1.cross_attn.attn.")),
        Rule(ca + r"multihead_attn\.out_proj\.(weight|bias)", rf"{d}layers.\1.cross_attn.attn.out_proj.\2"),
        Rule(ca + r"norm\.(weight|bias)", rf"{d}layers.\1.cross_attn.norm.\2"),
        Rule(ffn + r"(linear1|linear2|norm)\.(weight|bias)", rf"{d}layers.\1.ffn.\2.\3"),
        Rule(rf"{s}decoder_norm\.(weight|bias)", rf"{d}head.norm.\1"),
        Rule(rf"{s}class_embed\.(weight|bias)", rf"{d}head.class_embed.\1"),
        Rule(rf"{s}mask_embed\.layers\.(\d+)\.(weight|bias)", rf"{d}head.mask_embed.layers.\1.\2"),
    ]


def predictor_rules(src: str = PREDICTOR, dst: str = "transformer_decoder.") -> list[Rule]:
    """Mask2Former's predictor: the learned query features plus :func:`decoder_rules`."""
    return [Rule(rf"{re.escape(src)}query_feat\.weight", "query_feat.weight"), *decoder_rules(src, dst)]


# kept in the original's state dict but not part of the model; dropped on purpose
DROPPED = (
    Rule(r"criterion\.empty_weight", None),  # loss class weights
    Rule(r"pixel_(mean|std)", None),  # normalisation constants, applied by the image processor here
)


def rules(backbone_type: str) -> list[Rule]:
    """The whole rename table for a Mask2Former checkpoint (backbone kind as :func:`detect_d2_backbone` names it)."""
    return [
        *backbone_rules(backbone_type, "backbone.", "backbone."),
        *pixel_decoder_rules(),
        *predictor_rules(),
        *DROPPED,
    ]


def convert_state_dict(
    state_dict: Mapping[str, torch.Tensor], *, backbone_type: str | None = None, source: str = "detectron2 checkpoint"
) -> dict[str, torch.Tensor]:
    """Rename an original Mask2Former state dict to ours (backbone type detected when not given)."""
    if backbone_type is None:
        backbone_type = detect_d2_backbone(state_dict)[0]
    return apply_rules(state_dict, rules(backbone_type), source=source)


def _count(state_dict: Mapping[str, Any], pattern: str) -> int:
    found = {m[1] for k in state_dict if (m := re.fullmatch(pattern, k))}
    return len(found)


def shared_architecture(
    state_dict: Mapping[str, torch.Tensor], *, num_heads: int = 8, backbone_strides: tuple[int, ...] = (4, 8, 16, 32),
    model: str = "Mask2Former",
) -> dict[str, Any]:
    """The fields of ``MaskFormerConfig`` (backbone, pixel decoder, masked-attention decoder) read from an
    original Mask2Former or OneFormer checkpoint's shapes; ``model`` names it in errors.

    The number of attention heads does not show in the weights (``num_heads``, 8 in every published
    model); sampling points follow from it. ``pre_norm`` is assumed False (all published models).
    """
    def get(key: str) -> torch.Tensor:
        if key not in state_dict:
            raise ConversionError(f"not a {model} checkpoint: {key!r} is missing")
        return state_dict[key]

    kind, kwargs = detect_d2_backbone(state_dict)
    pd, pr = PIXEL_DECODER, PREDICTOR
    level_embed = get(pd + "transformer.level_embed")
    num_levels, conv_dim = (int(n) for n in level_embed.shape)
    offsets = get(pd + "transformer.encoder.layers.0.self_attn.sampling_offsets.weight").shape[0]
    if offsets % (num_heads * num_levels * 2):
        raise ConversionError(
            f"sampling_offsets has {offsets} rows, not a multiple of 2 * {num_levels} levels * {num_heads} heads"
        )
    query_embed = get(pr + "query_embed.weight")
    hidden_dim = int(query_embed.shape[1])
    num_fpn = _count(state_dict, re.escape(pd) + r"adapter_(\d+)\.weight")
    first_level = len(backbone_strides) - num_levels
    common_stride = backbone_strides[first_level - num_fpn]
    has_input_proj = (pr + "input_proj.0.weight") in state_dict
    return {
        "backbone": {"name": kind, **kwargs},
        "num_classes": int(get(pr + "class_embed.weight").shape[0]) - 1,
        "num_queries": int(query_embed.shape[0]),
        "hidden_dim": hidden_dim,
        "conv_dim": conv_dim,
        "mask_dim": int(get(pd + "mask_features.weight").shape[0]),
        "num_heads": num_heads,
        "encoder_layers": _count(state_dict, re.escape(pd) + r"transformer\.encoder\.layers\.(\d+)\.linear1\.weight"),
        "encoder_ffn_dim": int(get(pd + "transformer.encoder.layers.0.linear1.weight").shape[0]),
        "encoder_points": offsets // (num_heads * num_levels * 2),
        "num_feature_levels": num_levels,
        "common_stride": common_stride,
        "decoder_layers": _count(
            state_dict, re.escape(pr) + r"transformer_cross_attention_layers\.(\d+)\.norm\.weight"
        ),
        "decoder_ffn_dim": int(get(pr + "transformer_ffn_layers.0.linear1.weight").shape[0]),
        "pre_norm": False,
        "enforce_input_projection": has_input_proj and conv_dim == hidden_dim,
    }


def infer_architecture(
    state_dict: Mapping[str, torch.Tensor], *, num_heads: int = 8, backbone_strides: tuple[int, ...] = (4, 8, 16, 32)
) -> dict[str, Any]:
    """Keyword arguments of ``Mask2FormerConfig`` read from an original checkpoint's shapes (see
    :func:`shared_architecture`; the learned ``query_feat`` must be there)."""
    if PREDICTOR + "query_feat.weight" not in state_dict:
        raise ConversionError(f"not a Mask2Former checkpoint: {PREDICTOR + 'query_feat.weight'!r} is missing")
    return shared_architecture(state_dict, num_heads=num_heads, backbone_strides=backbone_strides)
