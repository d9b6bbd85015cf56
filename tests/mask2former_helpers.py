"""Shared helpers of the Mask2Former tests: random transformers models, saving, comparing outputs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, SwinConfig  # noqa: E402

from maskformers.ops import toolchain  # noqa: E402

# float64 agreement the issue asks of every parity test: relative 1e-7, plus an absolute floor far below
# the logits' scale (O(1) in the tiny configs, up to ~30 in swin-tiny); the differences seen are <= 7e-14
F64 = dict(rtol=1e-7, atol=1e-9)


def swin_config(*, embed_dim=16, depths=(1, 1, 2, 1), num_heads=(1, 1, 2, 2), window_size=7) -> SwinConfig:
    return SwinConfig(
        embed_dim=embed_dim, depths=list(depths), num_heads=list(num_heads), window_size=window_size,
        out_features=["stage1", "stage2", "stage3", "stage4"],
    )


def tiny_hf_config(*, window_size=7, pre_norm=False, num_labels=4, num_queries=10, hidden=64, heads=4,
                   decoder_layers=5, encoder_layers=2, enforce_input_projection=False, feature_size=None):
    cfg = Mask2FormerConfig(
        backbone_config=swin_config(window_size=window_size), hidden_dim=hidden,
        feature_size=feature_size or hidden, mask_feature_size=hidden,
        num_attention_heads=heads, encoder_feedforward_dim=32, dim_feedforward=48, num_queries=num_queries,
        num_labels=num_labels, decoder_layers=decoder_layers, encoder_layers=encoder_layers, pre_norm=pre_norm,
        enforce_input_projection=enforce_input_projection,
    )
    return cfg


def swin_tiny_coco_panoptic_hf_config(window_size=7):
    backbone = swin_config(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), window_size=window_size)
    return Mask2FormerConfig(backbone_config=backbone, num_labels=133, num_queries=100)


def perturb_(module: torch.nn.Module, seed: int = 0, scale: float = 0.05) -> torch.nn.Module:
    """Noise on every parameter (norm weights and biases, zero-initialised biases and bias tables,
    embeddings), so that a parameter loaded into the wrong place changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)
    return module


def make_hf_model(config, seed: int = 0, scale: float = 0.05) -> Mask2FormerForUniversalSegmentation:
    torch.manual_seed(seed)
    return perturb_(Mask2FormerForUniversalSegmentation(config), seed=seed, scale=scale).eval()


def save_hf(model, folder: Path) -> Path:
    model.save_pretrained(folder)
    return folder


def hf_predictions(model, x):
    """[(class_logits, mask_logits)] of every prediction, oldest first, from transformers."""
    with torch.no_grad():
        out = model(x, output_auxiliary_logits=True)
    preds = [(a["class_queries_logits"], a["masks_queries_logits"]) for a in out.auxiliary_logits]
    return preds + [(out.class_queries_logits, out.masks_queries_logits)]


def our_predictions(model, x):
    with torch.no_grad():
        out = model(x)
    preds = [(a["class_logits"], a["mask_logits"]) for a in out.aux_outputs]
    return preds + [(out.class_logits, out.mask_logits)]


def max_differences(expected, got) -> tuple[float, float]:
    """Largest |difference| over all predictions: (class logits, mask logits)."""
    dc = max((a - b).abs().max().item() for (a, _), (b, _) in zip(expected, got))
    dm = max((a - b).abs().max().item() for (_, a), (_, b) in zip(expected, got))
    return dc, dm


def assert_predictions_close(expected, got, **tol) -> None:
    assert len(got) == len(expected)
    for i, ((ec, em), (gc, gm)) in enumerate(zip(expected, got)):
        torch.testing.assert_close(gc, ec, msg=lambda m: f"class logits of prediction {i}: {m}", **tol)
        torch.testing.assert_close(gm, em, msg=lambda m: f"mask logits of prediction {i}: {m}", **tol)


def assert_float32_noise(expected, got, factor: float = 2e-5) -> None:
    """float32 agreement: every difference within ``factor`` x the logits' magnitude (~200 float32 ulps)."""
    for i, ((ec, em), (gc, gm)) in enumerate(zip(expected, got)):
        for name, e, g in (("class", ec, gc), ("mask", em, gm)):
            bound = factor * max(1.0, e.abs().max().item())
            diff = (e - g).abs().max().item()
            assert diff <= bound, f"float32 {name} logits of prediction {i}: max diff {diff:.3g} > {bound:.3g}"


def assert_masks_nontrivial(preds) -> None:
    """Masked attention is only exercised when masks are neither empty nor full."""
    frac = torch.stack([(m < 0).double().mean() for _, m in preds[:-1]])
    assert ((frac > 0.02) & (frac < 0.98)).any(), f"masks are trivial: negative fractions {frac.tolist()}"


def no_native_toolchain() -> str:
    """Why the native CPU kernel cannot be built here (no compiler or ninja), else "". Where it can be
    built, native tests run and a failed build fails them instead of skipping them."""
    if toolchain.cxx_compiler() is None or toolchain.ninja_path() is None:
        return "no C++ compiler or ninja to build the native ms_deform_attn kernel"
    return ""


# ------------------------------------------------------------------------------------------------
# transformers names -> original detectron2 names (the documented mapping, run backwards), to build
# original-format checkpoints from random transformers models
# ------------------------------------------------------------------------------------------------

_ENC = r"model\.pixel_level_module\.encoder\."
_BLK = _ENC + r"encoder\.layers\.(\d+)\.blocks\.(\d+)\."
_PD, _D2PD = r"model\.pixel_level_module\.decoder\.", "sem_seg_head.pixel_decoder."
_PDL, _D2PDL = _PD + r"encoder\.layers\.(\d+)\.", r"sem_seg_head.pixel_decoder.transformer.encoder.layers.\1."
_TM, _D2P = r"model\.transformer_module\.", "sem_seg_head.predictor."
_TML = _TM + r"decoder\.layers\.(\d+)\."
_HF_TO_D2 = [  # (regex matching the start of a transformers key, replacement of that start; None drops)
    (_ENC + r"(?:swin\.)?layernorm\..*", None),
    (_ENC + r"embeddings\.patch_embeddings\.projection\.", "backbone.patch_embed.proj."),
    (_ENC + r"embeddings\.norm\.", "backbone.patch_embed.norm."),
    (_BLK + r"layernorm_before\.", r"backbone.layers.\1.blocks.\2.norm1."),
    (_BLK + r"layernorm_after\.", r"backbone.layers.\1.blocks.\2.norm2."),
    (_BLK + r"attention\.self\.relative_position_bias_table",
     r"backbone.layers.\1.blocks.\2.attn.relative_position_bias_table"),
    (_BLK + r"attention\.output\.dense\.", r"backbone.layers.\1.blocks.\2.attn.proj."),
    (_BLK + r"intermediate\.dense\.", r"backbone.layers.\1.blocks.\2.mlp.fc1."),
    (_BLK + r"output\.dense\.", r"backbone.layers.\1.blocks.\2.mlp.fc2."),
    (_ENC + r"encoder\.layers\.(\d+)\.downsample\.", r"backbone.layers.\1.downsample."),
    (_ENC + r"hidden_states_norms\.stage(\d)\.", lambda m: f"backbone.norm{int(m[1]) - 1}."),
    (_PD + r"level_embed", _D2PD + "transformer.level_embed"),
    (_PD + r"input_projections\.", _D2PD + "input_proj."),
    (_PDL + r"self_attn_layer_norm\.", _D2PDL + "norm1."),
    (_PDL + r"final_layer_norm\.", _D2PDL + "norm2."),
    (_PDL + r"fc([12])\.", _D2PDL + r"linear\2."),
    (_PDL + r"self_attn\.", _D2PDL + "self_attn."),
    (_PD + r"mask_projection\.", _D2PD + "mask_features."),
    (_PD + r"(adapter|layer)_(\d+)\.0\.weight", _D2PD + r"\1_\2.weight"),
    (_PD + r"(adapter|layer)_(\d+)\.1\.", _D2PD + r"\1_\2.norm."),
    (_TM + r"queries_embedder\.", _D2P + "query_embed."),
    (_TM + r"queries_features\.", _D2P + "query_feat."),
    (_TM + r"level_embed\.", _D2P + "level_embed."),
    (_TM + r"input_projections\.", _D2P + "input_proj."),
    (_TML + r"self_attn\.out_proj\.", _D2P + r"transformer_self_attention_layers.\1.self_attn.out_proj."),
    (_TML + r"self_attn_layer_norm\.", _D2P + r"transformer_self_attention_layers.\1.norm."),
    (_TML + r"cross_attn\.", _D2P + r"transformer_cross_attention_layers.\1.multihead_attn."),
    (_TML + r"cross_attn_layer_norm\.", _D2P + r"transformer_cross_attention_layers.\1.norm."),
    (_TML + r"fc([12])\.", _D2P + r"transformer_ffn_layers.\1.linear\2."),
    (_TML + r"final_layer_norm\.", _D2P + r"transformer_ffn_layers.\1.norm."),
    (_TM + r"decoder\.layernorm\.", _D2P + "decoder_norm."),
    (_TM + r"decoder\.mask_predictor\.mask_embedder\.(\d+)\.0\.", _D2P + r"mask_embed.layers.\1."),
    (r"class_predictor\.", _D2P + "class_embed."),
    (r"criterion\.empty_weight", "criterion.empty_weight"),
]
_MERGED = [  # (pattern of one part -> (its index, the merged detectron2 name))
    (_BLK + r"attention\.self\.(query|key|value)\.(weight|bias)",
     lambda m: ({"query": 0, "key": 1, "value": 2}[m[3]], f"backbone.layers.{m[1]}.blocks.{m[2]}.attn.qkv.{m[4]}")),
    (_TML + r"self_attn\.(q|k|v)_proj\.(weight|bias)",
     lambda m: ("qkv".index(m[2]), f"{_D2P}transformer_self_attention_layers.{m[1]}.self_attn.in_proj_{m[3]}")),
]


def hf_to_d2_state_dict(state_dict):
    """A transformers Mask2Former (Swin) state dict in the original repository's names."""
    import re

    out, parts = {}, {}
    for key, value in state_dict.items():
        for pattern, target in _MERGED:
            m = re.fullmatch(pattern, key)
            if m:
                index, name = target(m)
                parts.setdefault(name, {})[index] = value
                break
        else:
            for pattern, target in _HF_TO_D2:
                m = re.match(pattern, key)
                if m:
                    if target is not None:
                        new = target(m) if callable(target) else m.expand(target)
                        out[new + key[m.end():]] = value
                    break
            else:
                raise KeyError(f"test mapping misses {key}")
    for name, chunks in parts.items():
        out[name] = torch.cat([chunks[i] for i in range(3)])
    for name in [k for k in out if k.endswith("relative_position_bias_table")]:  # buffers the original stores
        w = int((out[name].shape[0] ** 0.5 + 1) // 2)
        out[name.replace("bias_table", "index")] = torch.zeros(w * w, w * w, dtype=torch.int64)
    return out
