"""Original SHI-Labs/OneFormer checkpoints (the ``.pth`` files of its model zoo, with or without the text
encoder of training) -> ``maskformers.OneFormer`` state dicts; and which model an original file holds.

Key layout of the original (``oneformer/oneformer_model.py`` and the modules it builds):

* ``backbone.*``: D2 Swin, ResNet or ConvNeXt (:mod:`weights_convert.d2_backbone`);
* ``sem_seg_head.pixel_decoder.*``: Mask2Former's pixel decoder, same names (its rules are reused);
* ``sem_seg_head.predictor.*``: ``query_embed`` (our top-level ``query_embed``), ``level_embed``,
  ``input_proj.{l}``, the masked-attention layers and heads exactly as in Mask2Former (no ``query_feat``),
  plus the task-conditioned query transformer: ``class_input_proj`` and
  ``class_transformer.decoder.{layers.{i}.{self_attn, multihead_attn, linear1, linear2, norm1, norm2, norm3},
  norm}`` (DETR post-norm layers: norm1 after self-attention, norm2 after cross-attention, norm3 after the
  FFN) -> ``query_transformer.*``;
* ``task_mlp.layers.{i}`` -> ``task_encoder.mlp.layers.{i}``;
* training checkpoints (``MODEL.IS_TRAIN``) also hold the text mapper: ``text_encoder.{token_embedding,
  positional_embedding, ln_final, transformer.resblocks.{i}.{attn.in_proj_*, attn.out_proj, ln_1, ln_2,
  mlp.c_fc, mlp.c_proj}}`` (CLIP names), ``text_projector.layers.{i}``, ``prompt_ctx`` -> ``text_mapper.*``.

Dropped on purpose: ``criterion.empty_weight`` / ``criterion.logit_scale`` (loss state: class weights and
the contrastive temperature) and ``pixel_mean`` / ``pixel_std`` (normalisation, done by the image
processor here). Every other key must be used, or the conversion fails listing it.

The original's ``_load_from_state_dict`` hooks rename only version-1 (MaskFormer-era) state dicts
(``static_query`` -> ``query_feat``, ``sem_seg_head.X`` -> ``sem_seg_head.pixel_decoder.X``); the published
OneFormer files carry the version-2 names read here, and a version-1 layout is refused with that reason.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from . import d2_mask2former
from .checkpoint_io import UnsafePickleError, load_d2_checkpoint
from .d2_backbone import backbone_rules, detect_d2_backbone
from .rules import ConversionError, Rule, apply_rules, packed_qkv

__all__ = [
    "load_checkpoint", "rules", "convert_state_dict", "infer_architecture", "original_model_type",
    "query_transformer_rules", "text_mapper_rules", "UnsafePickleError",
]

PREDICTOR = d2_mask2former.PREDICTOR
_P = r"(weight|bias)"
# what every published model has and the weights do not show (dropout only acts in training)
PUBLISHED = {"num_heads": 8, "dropout": 0.1, "use_task_norm": True}


def load_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """The model state dict of an original checkpoint file (see ``checkpoint_io.load_d2_checkpoint``)."""
    return load_d2_checkpoint(path)


def query_transformer_rules(
    input_proj: str = PREDICTOR + "class_input_proj.",
    decoder: str = PREDICTOR + "class_transformer.decoder.",
    dst: str = "query_transformer.",
) -> list[Rule]:
    """The original's ``class_input_proj`` and DETR decoder (``class_transformer.decoder.{layers.{i}, norm}``:
    ``self_attn`` / ``multihead_attn`` packed, ``norm1/2/3`` after self-attention / cross-attention / FFN,
    ``linear1/2``) -> :class:`~maskformers.models.QueryTransformer`. transformers kept the same inner names
    under other prefixes (``weights_convert.hf_oneformer`` passes them)."""
    p, s, d = re.escape(input_proj), re.escape(decoder), dst
    lay = rf"{s}layers\.(\d+)\."
    return [
        Rule(rf"{p}{_P}", rf"{d}input_proj.\1"),
        Rule(lay + rf"self_attn\.in_proj_{_P}", None, split=packed_qkv(rf"{d}layers.\1.self_attn.attn.", 2)),
        Rule(lay + rf"self_attn\.out_proj\.{_P}", rf"{d}layers.\1.self_attn.attn.out_proj.\2"),
        Rule(lay + rf"multihead_attn\.in_proj_{_P}", None, split=packed_qkv(rf"{d}layers.\1.cross_attn.attn.", 2)),
        Rule(lay + rf"multihead_attn\.out_proj\.{_P}", rf"{d}layers.\1.cross_attn.attn.out_proj.\2"),
        Rule(lay + rf"norm1\.{_P}", rf"{d}layers.\1.self_attn.norm.\2"),
        Rule(lay + rf"norm2\.{_P}", rf"{d}layers.\1.cross_attn.norm.\2"),
        Rule(lay + rf"norm3\.{_P}", rf"{d}layers.\1.ffn.norm.\2"),
        Rule(lay + rf"(linear1|linear2)\.{_P}", rf"{d}layers.\1.ffn.\2.\3"),
        Rule(rf"{s}norm\.{_P}", rf"{d}norm.\1"),
    ]


def text_mapper_rules(dst: str = "text_mapper.") -> list[Rule]:
    """The CLIP-style ``text_encoder``, ``text_projector`` and ``prompt_ctx`` -> our ``TextMapper``."""
    enc = dst + "text_encoder."
    block = r"text_encoder\.transformer\.resblocks\.(\d+)\."
    return [
        Rule(r"text_encoder\.(token_embedding\.weight|positional_embedding)", rf"{enc}\1"),
        Rule(rf"text_encoder\.ln_final\.{_P}", rf"{enc}final_norm.\1"),
        Rule(block + rf"attn\.in_proj_{_P}", None, split=packed_qkv(rf"{enc}layers.\1.attn.", 2)),
        Rule(block + rf"attn\.out_proj\.{_P}", rf"{enc}layers.\1.attn.out_proj.\2"),
        Rule(block + rf"ln_([12])\.{_P}", rf"{enc}layers.\1.norm\2.\3"),
        Rule(block + rf"mlp\.c_fc\.{_P}", rf"{enc}layers.\1.mlp.fc1.\2"),
        Rule(block + rf"mlp\.c_proj\.{_P}", rf"{enc}layers.\1.mlp.fc2.\2"),
        Rule(rf"text_projector\.layers\.(\d+)\.{_P}", rf"{dst}projector.layers.\1.\2"),
        Rule(r"prompt_ctx\.weight", f"{dst}prompt_ctx.weight"),
    ]


def rules(backbone_type: str) -> list[Rule]:
    """The whole rename table of a OneFormer checkpoint (backbone kind as :func:`detect_d2_backbone` names it)."""
    return [
        *backbone_rules(backbone_type, "backbone.", "backbone."),
        *d2_mask2former.pixel_decoder_rules(),
        *d2_mask2former.decoder_rules(),
        *query_transformer_rules(),
        Rule(rf"task_mlp\.layers\.(\d+)\.{_P}", r"task_encoder.mlp.layers.\1.\2"),
        *text_mapper_rules(),
        Rule(r"criterion\.(empty_weight|logit_scale)", None),  # loss state: class weights, contrastive temperature
        Rule(r"pixel_(mean|std)", None),  # normalisation constants, applied by the image processor here
    ]


def _check_layout(state_dict: Mapping[str, Any]) -> None:
    legacy = sorted(k for k in state_dict if k.startswith("sem_seg_head.")
                    and not k.startswith(("sem_seg_head.predictor.", "sem_seg_head.pixel_decoder.")))
    if legacy:
        raise ConversionError(
            f"version-1 (MaskFormer-era) head layout: {len(legacy)} key(s) like {legacy[:3]} lie directly under "
            "sem_seg_head. instead of sem_seg_head.pixel_decoder.; only the published version-2 layout is read"
        )


def convert_state_dict(
    state_dict: Mapping[str, torch.Tensor], *, backbone_type: str | None = None, source: str = "OneFormer checkpoint"
) -> dict[str, torch.Tensor]:
    """Rename an original OneFormer state dict to ours (backbone kind detected when not given); raises
    ``ConversionError`` listing every key no rule uses, duplicates and bad splits."""
    _check_layout(state_dict)
    if backbone_type is None:
        backbone_type = detect_d2_backbone(state_dict)[0]
    return apply_rules(state_dict, rules(backbone_type), source=source)


def _indices(state_dict: Mapping[str, Any], pattern: str) -> list[int]:
    return sorted({int(m[1]) for k in state_dict if (m := re.fullmatch(pattern, k))})


def _layers(state_dict: Mapping[str, Any], pattern: str, what: str) -> int:
    found = _indices(state_dict, pattern)
    if found != list(range(len(found))):
        raise ConversionError(f"{what} are not numbered 0..n-1: found {found}")
    return len(found)


def _text_architecture(state_dict: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    parts = {name: any(k.startswith(name) for k in state_dict) for name in ("text_encoder.", "text_projector.")}
    if not any(parts.values()) and "prompt_ctx.weight" not in state_dict:
        return {"with_text_mapper": False}
    if not all(parts.values()):
        missing = [name + "*" for name, there in parts.items() if not there]
        raise ConversionError(f"incomplete text mapper: the checkpoint has part of it but no {missing}")
    for key in ("text_encoder.token_embedding.weight", "text_encoder.positional_embedding"):
        if key not in state_dict:
            raise ConversionError(f"incomplete text encoder: {key!r} is missing")
    vocab, width = (int(n) for n in state_dict["text_encoder.token_embedding.weight"].shape)
    ctx = state_dict.get("prompt_ctx.weight")
    return {
        "with_text_mapper": True,
        "text_width": width,
        "text_context_length": int(state_dict["text_encoder.positional_embedding"].shape[0]),
        "text_layers": _layers(state_dict, r"text_encoder\.transformer\.resblocks\.(\d+)\.ln_1\.weight", "text layers"),
        "text_heads": max(1, width // 64),  # the original's rule: heads = width // 64
        "text_vocab_size": vocab,
        "text_proj_layers": _layers(state_dict, r"text_projector\.layers\.(\d+)\.weight", "text projector layers"),
        "text_n_ctx": 0 if ctx is None else int(ctx.shape[0]),
        "text_causal_mask": True,
    }


def infer_architecture(
    state_dict: Mapping[str, torch.Tensor], *, num_heads: int = PUBLISHED["num_heads"],
    backbone_strides: tuple[int, ...] = (4, 8, 16, 32),
) -> dict[str, Any]:
    """Keyword arguments of ``OneFormerConfig`` read from an original checkpoint's shapes.

    Not in the weights, so taken from the published models (override with a config): ``num_heads`` 8 (the
    sampling points follow from it), dropout 0.1 in the pixel decoder and the query transformer (training
    only), ``use_task_norm``, post-norm layers, the causal text attention and its width // 64 heads.
    """
    _check_layout(state_dict)
    pr = PREDICTOR
    if "task_mlp.layers.0.weight" not in state_dict:
        raise ConversionError("not a OneFormer checkpoint: 'task_mlp.layers.0.weight' is missing")
    encoder = sorted(k for k in state_dict if k.startswith(pr + "class_transformer.encoder."))
    if encoder:
        raise ConversionError(
            f"unsupported OneFormer: its query transformer has encoder layers (MODEL.ONE_FORMER.ENC_LAYERS > 0, "
            f"e.g. {encoder[0]!r}); the published models have none"
        )
    arch = d2_mask2former.shared_architecture(
        state_dict, num_heads=num_heads, backbone_strides=backbone_strides, model="OneFormer"
    )
    lay = re.escape(pr) + r"class_transformer\.decoder\.layers\."
    query_layers = _layers(state_dict, lay + r"(\d+)\.norm1\.weight", "query transformer layers")
    if query_layers:
        ffn = int(state_dict[pr + "class_transformer.decoder.layers.0.linear1.weight"].shape[0])
        if ffn != arch["decoder_ffn_dim"]:
            raise ConversionError(f"unsupported OneFormer: query transformer FFN width {ffn} differs from the "
                                  f"decoder's {arch['decoder_ffn_dim']} (one DIM_FEEDFORWARD in the original)")
    return {
        **arch,
        "encoder_dropout": PUBLISHED["dropout"],
        "task_seq_len": int(state_dict["task_mlp.layers.0.weight"].shape[1]),
        "task_mlp_layers": _layers(state_dict, r"task_mlp\.layers\.(\d+)\.weight", "task MLP layers"),
        "query_dec_layers": query_layers,
        "query_dropout": PUBLISHED["dropout"],
        "use_task_norm": PUBLISHED["use_task_norm"],
        **_text_architecture(state_dict),
    }


def original_model_type(state_dict: Mapping[str, Any], *, source: str = "checkpoint") -> str:
    """"oneformer" or "mask2former": which original repository's model a state dict holds, by its keys
    (OneFormer's task MLP and query transformer; Mask2Former's learned query features)."""
    oneformer = "task_mlp.layers.0.weight" in state_dict or any(
        k.startswith(PREDICTOR + "class_transformer.") for k in state_dict
    )
    mask2former = PREDICTOR + "query_feat.weight" in state_dict
    if oneformer and not mask2former:
        return "oneformer"
    if mask2former and not oneformer:
        return "mask2former"
    heads = sorted({k.split(".")[0] for k in state_dict})
    what = "both" if oneformer else "neither"
    raise ConversionError(
        f"{source} is {what} a Mask2Former checkpoint ({PREDICTOR}query_feat.weight) {'and' if oneformer else 'nor'} "
        f"a OneFormer checkpoint (task_mlp.*, {PREDICTOR}class_transformer.*); its top-level names: {heads[:12]}"
    )
