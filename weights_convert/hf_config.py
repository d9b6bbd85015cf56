"""transformers ``config.json`` dicts -> our architecture config dicts (plain dict -> dict, no model code).

* :func:`backbone_spec_from_hf_config`: a ``backbone_config`` -> a backbone spec ``{"name": ..., **kwargs}``
  (see ``maskformers.models.backbone.build_backbone``);
* :func:`mask2former_config_from_hf` / :func:`oneformer_config_from_hf`: a whole ``config.json`` -> the
  fields of ``Mask2FormerConfig`` / ``OneFormerConfig`` (``from_dict`` builds them);
* :func:`id2label_from_hf`: the class names.

Keys a (diff-saved) config.json leaves out take transformers' defaults; options our modules cannot
reproduce raise :class:`~weights_convert.rules.ConversionError` naming the key and the value. Every
value is type-checked, so ``"hidden_dim": "sixty-four"`` is an error that names ``hidden_dim``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .rules import ConversionError

__all__ = [
    "backbone_spec_from_hf_config",
    "id2label_from_hf",
    "mask2former_config_from_hf",
    "oneformer_config_from_hf",
    "MASK2FORMER_DEFAULTS",
    "ONEFORMER_DEFAULTS",
    "RESNET_DEPTHS",
]

RESNET_DEPTHS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}

# transformers' defaults for keys a config.json may leave out
MASK2FORMER_DEFAULTS: dict[str, Any] = {
    "feature_size": 256, "mask_feature_size": 256, "hidden_dim": 256, "encoder_feedforward_dim": 1024,
    "activation_function": "relu", "encoder_layers": 6, "decoder_layers": 10, "num_attention_heads": 8,
    "dim_feedforward": 2048, "pre_norm": False, "enforce_input_projection": False, "common_stride": 4,
    "num_queries": 100, "feature_strides": [4, 8, 16, 32], "dropout": 0.0,
}
_MASK2FORMER_DEFAULT_BACKBONE = {
    "model_type": "swin", "depths": [2, 2, 18, 2], "drop_path_rate": 0.3,
    "out_features": ["stage1", "stage2", "stage3", "stage4"],
}
ONEFORMER_DEFAULTS: dict[str, Any] = {
    "conv_dim": 256, "mask_dim": 256, "hidden_dim": 256, "encoder_feedforward_dim": 1024, "norm": "GN",
    "encoder_layers": 6, "decoder_layers": 10, "use_task_norm": True, "num_attention_heads": 8, "dropout": 0.1,
    "dim_feedforward": 2048, "pre_norm": False, "enforce_input_proj": False, "query_dec_layers": 2,
    "common_stride": 4, "num_queries": 150, "strides": [4, 8, 16, 32], "task_seq_len": 77,
    "text_encoder_width": 256, "text_encoder_context_length": 77, "text_encoder_num_layers": 6,
    "text_encoder_vocab_size": 49408, "text_encoder_proj_layers": 2, "text_encoder_n_ctx": 16,
    "is_training": False, "layer_norm_eps": 1e-5,
}
_ONEFORMER_DEFAULT_BACKBONE = {
    "model_type": "swin", "drop_path_rate": 0.3, "out_features": ["stage1", "stage2", "stage3", "stage4"],
}


def _typed(config: Mapping[str, Any], key: str, kind: type, default: Any, where: str) -> Any:
    """config[key] (or ``default``) checked to be a ``kind`` (int accepts no bool; float accepts int)."""
    value = config.get(key, default)
    ok = (
        isinstance(value, bool) if kind is bool
        else isinstance(value, (int, float)) and not isinstance(value, bool) if kind is float
        else isinstance(value, kind) and not isinstance(value, bool) if kind is int
        else isinstance(value, kind)
    )
    if not ok:
        raise ConversionError(f"{where}: {key}={value!r} must be a {kind.__name__}")
    return float(value) if kind is float else value


def _int_list(config: Mapping[str, Any], key: str, default: list[int], where: str) -> list[int]:
    value = config.get(key, default)
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise ConversionError(f"{where}: {key}={value!r} must be a list of integers")
    return [int(v) for v in value]


def _require(config: Mapping[str, Any], key: str, expected: Any, default: Any, where: str) -> None:
    value = config.get(key, default)
    if value != expected:
        raise ConversionError(f"{where}: unsupported {key}={value!r} (only {expected!r} is supported)")


def _require_all_stages(config: Mapping[str, Any], num_stages: int, where: str) -> None:
    names = [f"stage{i}" for i in range(1, num_stages + 1)]
    out_features, out_indices = config.get("out_features"), config.get("out_indices")
    if out_features is not None:
        every_stage = list(out_features) == names
    else:
        every_stage = list(out_indices or []) == list(range(1, num_stages + 1))
    if not every_stage:
        raise ConversionError(
            f"{where}: unsupported out_features={out_features!r} / out_indices={out_indices!r}: every stage "
            f"{names} must be an output"
        )


def backbone_spec_from_hf_config(config: Mapping[str, Any], *, where: str = "backbone_config") -> dict[str, Any]:
    """The backbone spec a transformers ``backbone_config`` dict describes.

    Supports ``model_type`` "swin" (every Mask2Former/OneFormer Swin checkpoint), "resnet" (bottleneck,
    torchvision layout), "convnext" (the OneFormer ConvNeXt checkpoints) and "dinat" (the OneFormer DiNAT
    checkpoints). Options these backbones cannot reproduce (absolute position embeddings, other
    activations or eps, hidden dropout, a subset of stages) raise. The spec holds plain JSON values.
    """
    if not isinstance(config, Mapping):
        raise ConversionError(f"{where}: expected a dict, got {type(config).__name__}")
    model_type = config.get("model_type")
    if model_type == "swin":
        depths = _int_list(config, "depths", [2, 2, 6, 2], where)
        for key, expected in [("patch_size", 4), ("use_absolute_embeddings", False), ("hidden_act", "gelu"),
                              ("layer_norm_eps", 1e-5), ("hidden_dropout_prob", 0.0)]:
            _require(config, key, expected, expected, where)
        _require_all_stages(config, len(depths), where)
        heads = _int_list(config, "num_heads", [3, 6, 12, 24], where)
        if len(heads) != len(depths):
            raise ConversionError(f"{where}: num_heads={heads} needs one entry per stage of depths={depths}")
        return {
            "name": "swin",
            "embed_dim": _typed(config, "embed_dim", int, 96, where),
            "depths": depths,
            "num_heads": heads,
            "window_size": _typed(config, "window_size", int, 7, where),
            "mlp_ratio": _typed(config, "mlp_ratio", float, 4.0, where),
            "qkv_bias": _typed(config, "qkv_bias", bool, True, where),
            "drop_path_rate": _typed(config, "drop_path_rate", float, 0.1, where),
            "attn_drop_rate": _typed(config, "attention_probs_dropout_prob", float, 0.0, where),
            "in_chans": _typed(config, "num_channels", int, 3, where),
        }
    if model_type == "resnet":
        depths = tuple(_int_list(config, "depths", [3, 4, 6, 3], where))
        depth = {layers: d for d, layers in RESNET_DEPTHS.items()}.get(depths)
        if depth is None:
            raise ConversionError(
                f"{where}: unsupported resnet depths={list(depths)}; supported: {[list(v) for v in RESNET_DEPTHS.values()]}"
            )
        for key, expected in [("layer_type", "bottleneck"), ("embedding_size", 64), ("hidden_act", "relu"),
                              ("hidden_sizes", [256, 512, 1024, 2048]), ("downsample_in_first_stage", False),
                              ("downsample_in_bottleneck", False)]:
            _require(config, key, expected, expected, where)
        _require_all_stages(config, 4, where)
        return {"name": "resnet", "depth": depth, "in_chans": _typed(config, "num_channels", int, 3, where)}
    if model_type == "dinat":
        return _dinat_spec(config, where)
    if model_type == "convnext":
        return _convnext_spec(config, where)
    raise ConversionError(
        f"{where}: unsupported model_type={model_type!r}; supported: 'swin', 'resnet', 'convnext', 'dinat'"
    )


def _convnext_spec(config: Mapping[str, Any], where: str) -> dict[str, Any]:
    """A transformers ``ConvNextConfig`` dict -> the spec of ``maskformers.models.convnext.convnext_backbone``
    (transformers' ``ConvNextBackbone``: 7x7 depthwise kernels, every LayerNorm at eps 1e-6; ``layer_norm_eps``
    is read only by ``ConvNextModel``'s final norm, which the backbone does not have)."""
    depths = _int_list(config, "depths", [3, 3, 9, 3], where)
    dims = _int_list(config, "hidden_sizes", [96, 192, 384, 768], where)
    if len(dims) != len(depths) or config.get("num_stages", len(depths)) != len(depths):
        raise ConversionError(f"{where}: hidden_sizes={dims} and num_stages must give one entry per stage of {depths}")
    for key, expected in [("patch_size", 4), ("hidden_act", "gelu")]:
        _require(config, key, expected, expected, where)
    _require_all_stages(config, len(depths), where)
    return {
        "name": "convnext",
        "depths": depths,
        "dims": dims,
        "kernel_size": 7,
        "layer_scale_init_value": _typed(config, "layer_scale_init_value", float, 1e-6, where),
        "drop_path_rate": _typed(config, "drop_path_rate", float, 0.0, where),
        "in_chans": _typed(config, "num_channels", int, 3, where),
    }


# transformers' DinatConfig default dilations (its ImageNet models)
_DINAT_DEFAULT_DILATIONS = [[1, 8, 1], [1, 4, 1, 4], [1, 2, 1, 2, 1, 2], [1, 1, 1, 1, 1]]


def _dinat_spec(config: Mapping[str, Any], where: str) -> dict[str, Any]:
    """A transformers ``DinatConfig`` dict (the OneFormer DiNAT checkpoints' backbone_config) -> the spec of
    ``maskformers.models.dinat.dinat_backbone``."""
    depths = _int_list(config, "depths", [3, 4, 6, 5], where)
    for key, expected in [("patch_size", 4), ("hidden_act", "gelu"), ("layer_norm_eps", 1e-5),
                          ("attention_probs_dropout_prob", 0.0)]:
        _require(config, key, expected, expected, where)
    _require_all_stages(config, len(depths), where)
    heads = _int_list(config, "num_heads", [2, 4, 8, 16], where)
    dilations = config.get("dilations", _DINAT_DEFAULT_DILATIONS)
    if (not isinstance(dilations, (list, tuple)) or len(dilations) != len(depths)
            or any(not isinstance(level, (list, tuple)) or len(level) != d for level, d in zip(dilations, depths))):
        raise ConversionError(f"{where}: dilations={dilations!r} needs one list per stage, one entry per block of {depths}")
    layer_scale = _typed(config, "layer_scale_init_value", float, 0.0, where)
    return {
        "name": "dinat",
        "embed_dim": _typed(config, "embed_dim", int, 64, where),
        "depths": depths,
        "num_heads": heads,
        "kernel_size": _typed(config, "kernel_size", int, 7, where),
        "dilations": [[int(d) for d in level] for level in dilations],
        "mlp_ratio": _typed(config, "mlp_ratio", float, 3.0, where),
        "qkv_bias": _typed(config, "qkv_bias", bool, True, where),
        "drop_rate": _typed(config, "hidden_dropout_prob", float, 0.0, where),
        "drop_path_rate": _typed(config, "drop_path_rate", float, 0.1, where),
        "layer_scale": layer_scale if layer_scale > 0 else None,
        "in_chans": _typed(config, "num_channels", int, 3, where),
    }


def id2label_from_hf(hf: Mapping[str, Any], *, where: str = "config.json") -> dict[int, str]:
    """``id2label`` with int keys; an error unless the ids are 0..K-1."""
    raw = hf.get("id2label") or {}
    if not isinstance(raw, Mapping):
        raise ConversionError(f"{where}: id2label must be a dict of class id -> name, got {type(raw).__name__}")
    try:
        labels = {int(k): str(v) for k, v in raw.items()}
    except (TypeError, ValueError) as exc:
        raise ConversionError(f"{where}: id2label keys must be integers: {exc}") from exc
    if labels and sorted(labels) != list(range(len(labels))):
        raise ConversionError(f"{where}: id2label ids must be 0..{len(labels) - 1}, got {sorted(labels)[:10]}...")
    return labels


def _num_classes(hf: Mapping[str, Any], where: str) -> int:
    labels = id2label_from_hf(hf, where=where)
    if labels:
        return len(labels)
    num = hf.get("num_labels")
    if isinstance(num, int) and not isinstance(num, bool) and num >= 1:
        return num
    raise ConversionError(f"{where} has neither id2label nor a positive num_labels; cannot tell the number of classes")


def _backbone(hf: Mapping[str, Any], default: Mapping[str, Any], where: str) -> dict[str, Any]:
    if hf.get("use_timm_backbone") or (hf.get("backbone") and not hf.get("backbone_config")):
        raise ConversionError(
            f"{where} names a backbone by string (backbone={hf.get('backbone')!r}, use_timm_backbone="
            f"{hf.get('use_timm_backbone')!r}); only an explicit backbone_config is supported"
        )
    return backbone_spec_from_hf_config(hf.get("backbone_config") or default, where=f"{where} backbone_config")


def _check_model_type(hf: Mapping[str, Any], expected: str, where: str) -> None:
    if not isinstance(hf, Mapping):
        raise ConversionError(f"{where}: expected a JSON object, got {type(hf).__name__}")
    if hf.get("model_type") != expected:
        raise ConversionError(f"{where} has model_type={hf.get('model_type')!r}, expected {expected!r}")


def mask2former_config_from_hf(hf: Mapping[str, Any], *, where: str = "config.json") -> dict[str, Any]:
    """The ``Mask2FormerConfig`` fields a transformers ``Mask2FormerConfig`` dict describes."""
    _check_model_type(hf, "mask2former", where)
    get = lambda key, kind: _typed(hf, key, kind, MASK2FORMER_DEFAULTS[key], where)  # noqa: E731
    if hf.get("activation_function", "relu") != "relu":
        raise ConversionError(f"{where}: unsupported activation_function={hf.get('activation_function')!r} (only 'relu')")
    strides = _int_list(hf, "feature_strides", MASK2FORMER_DEFAULTS["feature_strides"], where)
    if strides != [4, 8, 16, 32]:
        raise ConversionError(f"{where}: feature_strides={strides} differ from the backbone's [4, 8, 16, 32]")
    decoder_layers = get("decoder_layers", int)
    if decoder_layers < 1:
        raise ConversionError(f"{where}: decoder_layers={decoder_layers} must be >= 1")
    return {
        "backbone": _backbone(hf, _MASK2FORMER_DEFAULT_BACKBONE, where),
        "num_classes": _num_classes(hf, where),
        "num_queries": get("num_queries", int),
        "hidden_dim": get("hidden_dim", int),
        "conv_dim": get("feature_size", int),
        "mask_dim": get("mask_feature_size", int),
        "num_heads": get("num_attention_heads", int),
        "encoder_layers": get("encoder_layers", int),
        "encoder_ffn_dim": get("encoder_feedforward_dim", int),
        "encoder_dropout": get("dropout", float),
        "decoder_layers": decoder_layers - 1,  # transformers counts the query-only prediction
        "decoder_ffn_dim": get("dim_feedforward", int),
        "common_stride": get("common_stride", int),
        "pre_norm": get("pre_norm", bool),
        "enforce_input_projection": get("enforce_input_projection", bool),
    }


def oneformer_config_from_hf(hf: Mapping[str, Any], *, where: str = "config.json") -> dict[str, Any]:
    """The ``OneFormerConfig`` fields a transformers ``OneFormerConfig`` dict describes.

    transformers applies ``dropout`` to the pixel decoder's encoder only when ``is_training`` and to the
    query transformer in training mode; ``is_training`` also builds the text mapper.
    """
    _check_model_type(hf, "oneformer", where)
    get = lambda key, kind: _typed(hf, key, kind, ONEFORMER_DEFAULTS[key], where)  # noqa: E731
    if get("norm", str) != "GN":
        raise ConversionError(f"{where}: unsupported norm={hf.get('norm')!r} (only 'GN')")
    if get("layer_norm_eps", float) != 1e-5:
        raise ConversionError(f"{where}: unsupported layer_norm_eps={hf.get('layer_norm_eps')!r} (only 1e-05)")
    strides = _int_list(hf, "strides", ONEFORMER_DEFAULTS["strides"], where)
    if strides != [4, 8, 16, 32]:
        raise ConversionError(f"{where}: strides={strides} differ from the backbone's [4, 8, 16, 32]")
    decoder_layers = get("decoder_layers", int)
    if decoder_layers < 1:
        raise ConversionError(f"{where}: decoder_layers={decoder_layers} must be >= 1")
    is_training = get("is_training", bool)
    dropout = get("dropout", float)
    width = get("text_encoder_width", int)
    return {
        "backbone": _backbone(hf, _ONEFORMER_DEFAULT_BACKBONE, where),
        "num_classes": _num_classes(hf, where),
        "num_queries": get("num_queries", int),
        "hidden_dim": get("hidden_dim", int),
        "conv_dim": get("conv_dim", int),
        "mask_dim": get("mask_dim", int),
        "num_heads": get("num_attention_heads", int),
        "encoder_layers": get("encoder_layers", int),
        "encoder_ffn_dim": get("encoder_feedforward_dim", int),
        "encoder_dropout": dropout if is_training else 0.0,
        "decoder_layers": decoder_layers - 1,
        "decoder_ffn_dim": get("dim_feedforward", int),
        "common_stride": get("common_stride", int),
        "pre_norm": get("pre_norm", bool),
        "enforce_input_projection": get("enforce_input_proj", bool),
        "task_seq_len": get("task_seq_len", int),
        "query_dec_layers": get("query_dec_layers", int),
        "query_dropout": dropout,
        "use_task_norm": get("use_task_norm", bool),
        "with_text_mapper": is_training,
        "text_width": width,
        "text_context_length": get("text_encoder_context_length", int),
        "text_layers": get("text_encoder_num_layers", int),
        "text_heads": max(1, width // 64),
        "text_vocab_size": get("text_encoder_vocab_size", int),
        "text_proj_layers": get("text_encoder_proj_layers", int),
        "text_n_ctx": get("text_encoder_n_ctx", int),
        # text_causal_mask stays at its default (True, the original's): the hub weights are the original
        # ones, trained with it; transformers builds the mask but never applies it
    }
