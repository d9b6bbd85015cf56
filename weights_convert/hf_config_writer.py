"""Our architecture configs -> transformers ``config.json`` dicts: the inverse of :mod:`weights_convert.hf_config`.

Plain dict -> dict (``Mask2FormerConfig.to_dict()`` / ``OneFormerConfig.to_dict()`` in, a dict that
transformers' ``Mask2FormerConfig`` / ``OneFormerConfig`` loads out), so that ``hf_config.*_from_hf`` of the
result builds the same model. Every architecture field is written explicitly, so transformers' defaults
never decide what the weights mean.

What transformers cannot represent raises :class:`~weights_convert.rules.ConversionError` naming the
setting, its value and why. Differences that leave the exported model's inference outputs alone (dropout
placement, frozen batch norms) or that only show in some cases (the ConvNeXt's input padding, the OneFormer
text encoder's causal mask) are returned as notes: one sentence each, for the caller to show once.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .hf_config import RESNET_DEPTHS
from .rules import ConversionError

__all__ = [
    "backbone_config_to_hf",
    "mask2former_config_to_hf",
    "oneformer_config_to_hf",
    "SPEC_DEFAULTS",
]

# the keyword defaults of each backbone builder (maskformers.models: SwinBackbone, ResNetBackbone / resnet_backbone,
# ConvNeXtBackbone / convnext_backbone, DiNATBackbone), for specs that leave them out; tests compare them
SPEC_DEFAULTS: dict[str, dict[str, Any]] = {
    "swin": {"window_size": 7, "mlp_ratio": 4.0, "qkv_bias": True, "drop_path_rate": 0.0, "attn_drop_rate": 0.0,
             "proj_drop_rate": 0.0, "in_chans": 3, "fused_attn": True},
    "resnet": {"depth": 50, "in_chans": 3, "frozen_bn": True},
    "convnext": {"size": None, "depths": None, "dims": None, "kernel_size": 7, "layer_scale_init_value": 1.0,
                 "drop_path_rate": 0.0, "in_chans": 3},
    "dinat": {"mlp_ratio": 4.0, "qkv_bias": True, "drop_rate": 0.0, "drop_path_rate": 0.0, "layer_scale": None,
              "in_chans": 3, "layer_norm_eps": 1e-5},
}
_SPEC_REQUIRED = {"swin": ("embed_dim", "depths", "num_heads"), "resnet": (), "convnext": (),
                  "dinat": ("embed_dim", "depths", "num_heads", "kernel_size", "dilations")}
# ConvNeXt sizes by name (maskformers.models.convnext.CONVNEXT_SIZES)
_CONVNEXT_SIZES = {"tiny": ([3, 3, 9, 3], [96, 192, 384, 768]), "small": ([3, 3, 27, 3], [96, 192, 384, 768]),
                   "base": ([3, 3, 27, 3], [128, 256, 512, 1024]), "large": ([3, 3, 27, 3], [192, 384, 768, 1536]),
                   "xlarge": ([3, 3, 27, 3], [256, 512, 1024, 2048])}
_STRIDES = [4, 8, 16, 32]


def _refuse(where: str, setting: str, value: Any, why: str) -> ConversionError:
    return ConversionError(f"cannot export to transformers: {where} {setting}={value!r}: {why}")


def _spec(spec: Mapping[str, Any], where: str) -> tuple[str, dict[str, Any]]:
    """(name, every builder option with its default filled in); unknown options are refused."""
    name = spec.get("name")
    if name not in SPEC_DEFAULTS:
        raise _refuse(where, "name", name, f"not a backbone exported here (supported: {', '.join(SPEC_DEFAULTS)})")
    unknown = sorted(set(spec) - {"name"} - set(SPEC_DEFAULTS[name]) - set(_SPEC_REQUIRED[name]))
    if unknown:
        raise _refuse(where, "options", unknown, f"no transformers {name} backbone setting holds them")
    missing = [k for k in _SPEC_REQUIRED[name] if k not in spec]
    if missing:
        raise ConversionError(f"cannot export to transformers: {where} spec {dict(spec)} lacks {missing}")
    return name, {**SPEC_DEFAULTS[name], **{k: v for k, v in spec.items() if k != "name"}}


def backbone_config_to_hf(spec: Mapping[str, Any], *, where: str = "backbone") -> tuple[dict[str, Any], list[str]]:
    """A backbone spec (``{"name": ..., **builder options}``) -> (transformers ``backbone_config`` dict, notes)."""
    name, v = _spec(spec, where)
    notes: list[str] = []
    if name == "swin":
        depths = list(v["depths"])
        if v["proj_drop_rate"]:
            notes.append(f"{where} proj_drop_rate={v['proj_drop_rate']} (training only) is not written: transformers' "
                         "Swin drops at other places (hidden_dropout_prob), which maskformers does not read back")
        hf = {"model_type": "swin", "embed_dim": v["embed_dim"], "depths": depths, "num_heads": list(v["num_heads"]),
              "window_size": v["window_size"], "mlp_ratio": float(v["mlp_ratio"]), "qkv_bias": v["qkv_bias"],
              "drop_path_rate": float(v["drop_path_rate"]), "attention_probs_dropout_prob": float(v["attn_drop_rate"]),
              "hidden_dropout_prob": 0.0, "patch_size": 4, "use_absolute_embeddings": False, "hidden_act": "gelu",
              "layer_norm_eps": 1e-5}
    elif name == "resnet":
        if v["depth"] not in RESNET_DEPTHS:
            raise _refuse(where, "depth", v["depth"], f"only ResNet-{'/'.join(map(str, RESNET_DEPTHS))} are supported")
        depths = list(RESNET_DEPTHS[v["depth"]])
        if v["frozen_bn"]:
            notes.append(f"{where}: the ResNet's batch norms are frozen here; transformers' ResNetBackbone trains them "
                         "(running statistics update in training mode; inference is the same)")
        hf = {"model_type": "resnet", "embedding_size": 64, "hidden_sizes": [256, 512, 1024, 2048], "depths": depths,
              "layer_type": "bottleneck", "hidden_act": "relu", "downsample_in_first_stage": False,
              "downsample_in_bottleneck": False}
    elif name == "convnext":
        if v["size"] is not None:
            if v["size"] not in _CONVNEXT_SIZES or v["depths"] is not None or v["dims"] is not None:
                raise _refuse(where, "size", v["size"], f"expected one of {list(_CONVNEXT_SIZES)} without depths/dims")
            v["depths"], v["dims"] = _CONVNEXT_SIZES[v["size"]]
        if v["depths"] is None or v["dims"] is None:
            raise ConversionError(f"cannot export to transformers: {where} spec {dict(spec)} gives no depths and dims")
        if v["kernel_size"] != 7:
            raise _refuse(where, "kernel_size", v["kernel_size"],
                          "transformers' ConvNeXt blocks have 7x7 depthwise kernels")
        depths = list(v["depths"])
        notes.append(f"{where}: transformers' ConvNextBackbone does not pad its stride convolutions, so on inputs "
                     "whose sides are not multiples of 32 its feature maps are smaller than ours and the outputs "
                     "differ (as with the published OneFormer ConvNeXt checkpoints in transformers); pad inputs to 32")
        scale = v["layer_scale_init_value"]
        hf = {"model_type": "convnext", "depths": depths, "hidden_sizes": list(v["dims"]), "num_stages": len(depths),
              "patch_size": 4, "hidden_act": "gelu",
              "layer_scale_init_value": float(scale) if scale and scale > 0 else 0.0,
              "drop_path_rate": float(v["drop_path_rate"])}
    else:  # dinat
        if v["layer_norm_eps"] != 1e-5:
            raise _refuse(where, "layer_norm_eps", v["layer_norm_eps"],
                          "transformers' DinatBackbone output norms always use eps 1e-5")
        depths = list(v["depths"])
        hf = {"model_type": "dinat", "embed_dim": v["embed_dim"], "depths": depths, "num_heads": list(v["num_heads"]),
              "kernel_size": v["kernel_size"], "dilations": [list(level) for level in v["dilations"]],
              "mlp_ratio": float(v["mlp_ratio"]), "qkv_bias": v["qkv_bias"],
              "hidden_dropout_prob": float(v["drop_rate"]),
              "attention_probs_dropout_prob": 0.0, "drop_path_rate": float(v["drop_path_rate"]),
              "layer_scale_init_value": float(v["layer_scale"] or 0.0), "patch_size": 4, "hidden_act": "gelu",
              "layer_norm_eps": 1e-5}
    if len(depths) != len(_STRIDES):
        raise _refuse(where, "depths", depths, f"transformers' pixel decoder expects four stages at strides {_STRIDES}")
    stages = [f"stage{i}" for i in range(1, len(depths) + 1)]
    hf.update(num_channels=v["in_chans"], out_features=stages, out_indices=list(range(1, len(depths) + 1)))
    return hf, notes


def _labels(id2label: Mapping[int, str], num_classes: int) -> dict[str, Any]:
    names = {int(k): str(v) for k, v in id2label.items()} or {i: f"LABEL_{i}" for i in range(num_classes)}
    if sorted(names) != list(range(num_classes)):
        raise ConversionError(f"cannot export to transformers: id2label has ids {sorted(names)[:10]}..., the model "
                              f"{num_classes} classes (expected ids 0..{num_classes - 1})")
    return {"id2label": {str(i): names[i] for i in range(num_classes)},
            "label2id": {name: i for i, name in sorted(names.items())}}


def _shared(fields: Mapping[str, Any], where: str) -> tuple[dict[str, Any], list[str]]:
    """The backbone and the fields both models name alike."""
    if fields["encoder_points"] != 4:
        raise _refuse(where, "encoder_points", fields["encoder_points"],
                      "transformers' deformable attention samples 4 points per level")
    if fields["num_feature_levels"] != 3:
        raise _refuse(where, "num_feature_levels", fields["num_feature_levels"],
                      "transformers' pixel decoder attends over 3 feature levels")
    backbone, notes = backbone_config_to_hf(fields["backbone"], where=f"{where} backbone")
    hf = {"backbone_config": backbone, "hidden_dim": fields["hidden_dim"],
          "encoder_feedforward_dim": fields["encoder_ffn_dim"], "encoder_layers": fields["encoder_layers"],
          "decoder_layers": fields["decoder_layers"] + 1, "num_attention_heads": fields["num_heads"],
          "dim_feedforward": fields["decoder_ffn_dim"], "pre_norm": fields["pre_norm"],
          "common_stride": fields["common_stride"], "num_queries": fields["num_queries"]}
    return hf, notes


def mask2former_config_to_hf(
    fields: Mapping[str, Any], id2label: Mapping[int, str], *, dtype: str = "float32"
) -> tuple[dict[str, Any], list[str]]:
    """``Mask2FormerConfig.to_dict()`` + class names -> (transformers ``Mask2FormerConfig`` dict, notes)."""
    where = "Mask2FormerConfig"
    shared, notes = _shared(fields, where)
    if fields["encoder_dropout"]:
        notes.append(f"{where} encoder_dropout={fields['encoder_dropout']} (training only) becomes transformers' "
                     "dropout, which transformers also applies in its decoder layers and as layer drop")
    hf = {"model_type": "mask2former", "architectures": ["Mask2FormerForUniversalSegmentation"], **shared,
          "feature_size": fields["conv_dim"], "mask_feature_size": fields["mask_dim"], "activation_function": "relu",
          "dropout": float(fields["encoder_dropout"]), "enforce_input_projection": fields["enforce_input_projection"],
          "feature_strides": list(_STRIDES), "dtype": dtype, **_labels(id2label, fields["num_classes"])}
    return hf, notes


def oneformer_config_to_hf(
    fields: Mapping[str, Any], id2label: Mapping[int, str], *, with_text_mapper: bool = False, dtype: str = "float32"
) -> tuple[dict[str, Any], list[str]]:
    """``OneFormerConfig.to_dict()`` + class names -> (transformers ``OneFormerConfig`` dict, notes).

    with_text_mapper: write ``is_training=True`` (transformers then builds the text mapper, needs ``text_inputs``
    at every forward, and applies ``dropout`` in its pixel decoder even in eval mode); else an inference model.
    """
    where = "OneFormerConfig"
    shared, notes = _shared(fields, where)
    if fields["task_mlp_layers"] != 2:
        raise _refuse(where, "task_mlp_layers", fields["task_mlp_layers"], "transformers' task MLP has 2 layers")
    dropout, encoder_dropout = float(fields["query_dropout"]), float(fields["encoder_dropout"])
    width, heads = fields["text_width"], fields["text_heads"]
    if with_text_mapper:
        if heads != width // 64 or width < 64:
            raise _refuse(where, "text_heads", heads, f"transformers' text encoder has text_width // 64 = "
                          f"{width // 64} heads for text_width={width}")
        if encoder_dropout != dropout:
            raise _refuse(where, "encoder_dropout", encoder_dropout, f"with the text mapper (is_training) transformers "
                          f"applies its one dropout to the pixel decoder too, and query_dropout is {dropout}")
        if dropout:
            notes.append(f"{where}: transformers applies dropout={dropout} in the pixel decoder of an is_training "
                         "model even in eval mode; set the dropouts to 0 for deterministic outputs there")
        if fields["text_causal_mask"]:
            notes.append(f"{where} text_causal_mask=True: transformers builds the text encoder's causal mask but never "
                         "applies it, so its text queries (training only, contrastive loss) differ from ours")
    elif encoder_dropout:
        notes.append(f"{where} encoder_dropout={encoder_dropout} (training only) is not written: transformers applies "
                     "the pixel decoder's dropout only to is_training models")
    hf = {"model_type": "oneformer", "architectures": ["OneFormerForUniversalSegmentation"], **shared,
          "conv_dim": fields["conv_dim"], "mask_dim": fields["mask_dim"], "norm": "GN", "layer_norm_eps": 1e-5,
          "dropout": dropout, "enforce_input_proj": fields["enforce_input_projection"], "strides": list(_STRIDES),
          "use_task_norm": fields["use_task_norm"], "query_dec_layers": fields["query_dec_layers"],
          "task_seq_len": fields["task_seq_len"], "is_training": bool(with_text_mapper),
          "text_encoder_width": width, "text_encoder_context_length": fields["text_context_length"],
          "text_encoder_num_layers": fields["text_layers"], "text_encoder_vocab_size": fields["text_vocab_size"],
          "text_encoder_proj_layers": fields["text_proj_layers"], "text_encoder_n_ctx": fields["text_n_ctx"],
          "dtype": dtype, **_labels(id2label, fields["num_classes"])}
    return hf, notes
