"""Helpers of the original-checkpoint tests: our OneFormer state dict written back in the original
SHI-Labs/OneFormer names (``oneformer/oneformer_model.py``, ``modeling/transformer_decoder/*``,
``modeling/pixel_decoder/msdeformattn.py``, ``modeling/backbone/{swin,convnext}.py``), random models, inputs.

The table below is written from the original modules' attribute names, independently of the converter
(``weights_convert.d2_oneformer``), so a round trip through both checks the converter against it.
"""

from __future__ import annotations

import re

import torch

from maskformers.models.config import OneFormerConfig
from maskformers.models.oneformer import build_oneformer
from maskformers.ops import set_backend

PD, PR = "sem_seg_head.pixel_decoder.", "sem_seg_head.predictor."
_QT, _TE = r"query_transformer\.layers\.(\d+)\.", r"text_mapper\.text_encoder\.layers\.(\d+)\."
_DEC = r"transformer_decoder\."
_LAY = _DEC + r"layers\.(\d+)\."
_CT = PR + "class_transformer.decoder.layers.{}."
_SA, _CA = PR + r"transformer_self_attention_layers.\1.", PR + r"transformer_cross_attention_layers.\1."

# (our name, original name); a target containing "{qkv}" receives the q, k and v rows packed in that order
OURS_TO_ORIGINAL = [
    # D2SwinTransformer: downsample at the end of stage i (ours: start of i + 1), norm{i} per output
    (r"backbone\.layers\.(\d+)\.downsample\.(.*)", lambda m: f"backbone.layers.{int(m[1]) - 1}.downsample.{m[2]}"),
    (r"backbone\.(patch_embed|layers|levels)\.(.*)", r"backbone.\1.\2"),
    # D2ConvNeXt: downsample_layers[0] is the stem, downsample_layers[i] opens stage i; blocks use dwconv/pwconv
    (r"backbone\.stem\.([01])\.(\w+)", r"backbone.downsample_layers.0.\1.\2"),
    (r"backbone\.stages\.(\d+)\.downsample\.([01])\.(\w+)", r"backbone.downsample_layers.\1.\2.\3"),
    (r"backbone\.stages\.(\d+)\.blocks\.(\d+)\.conv_dw\.(\w+)", r"backbone.stages.\1.\2.dwconv.\3"),
    (r"backbone\.stages\.(\d+)\.blocks\.(\d+)\.mlp\.fc([12])\.(\w+)", r"backbone.stages.\1.\2.pwconv\3.\4"),
    (r"backbone\.stages\.(\d+)\.blocks\.(\d+)\.(norm\.weight|norm\.bias|gamma)", r"backbone.stages.\1.\2.\3"),
    (r"backbone\.norms\.(\d+)\.(\w+)", r"backbone.norm\1.\2"),
    # MSDeformAttnPixelDecoder
    (r"pixel_decoder\.input_projs\.(.*)", PD + r"input_proj.\1"),
    (r"pixel_decoder\.level_embed", PD + "transformer.level_embed"),
    (r"pixel_decoder\.encoder\.(.*)", PD + r"transformer.encoder.\1"),
    (r"pixel_decoder\.mask_features\.(.*)", PD + r"mask_features.\1"),
    (r"pixel_decoder\.lateral_convs\.(\d)\.0\.weight", lambda m: f"{PD}adapter_{int(m[1]) + 1}.weight"),
    (r"pixel_decoder\.lateral_convs\.(\d)\.1\.(\w+)", lambda m: f"{PD}adapter_{int(m[1]) + 1}.norm.{m[2]}"),
    (r"pixel_decoder\.output_convs\.(\d)\.0\.weight", lambda m: f"{PD}layer_{int(m[1]) + 1}.weight"),
    (r"pixel_decoder\.output_convs\.(\d)\.1\.(\w+)", lambda m: f"{PD}layer_{int(m[1]) + 1}.norm.{m[2]}"),
    # ContrastiveMultiScaleMaskedTransformerDecoder
    (r"query_embed\.weight", PR + "query_embed.weight"),
    (_DEC + r"level_embed\.weight", PR + "level_embed.weight"),
    (_DEC + r"input_projs\.(\d+)\.(\w+)", PR + r"input_proj.\1.\2"),
    (_LAY + r"self_attn\.attn\.[qkv]_proj\.(\w+)", _SA + r"self_attn.in_proj_\2{qkv}"),
    (_LAY + r"self_attn\.attn\.out_proj\.(\w+)", _SA + r"self_attn.out_proj.\2"),
    (_LAY + r"self_attn\.norm\.(\w+)", PR + r"transformer_self_attention_layers.\1.norm.\2"),
    (_LAY + r"cross_attn\.attn\.[qkv]_proj\.(\w+)", _CA + r"multihead_attn.in_proj_\2{qkv}"),
    (_LAY + r"cross_attn\.attn\.out_proj\.(\w+)", _CA + r"multihead_attn.out_proj.\2"),
    (_LAY + r"cross_attn\.norm\.(\w+)", PR + r"transformer_cross_attention_layers.\1.norm.\2"),
    (_LAY + r"ffn\.(\w+)\.(\w+)", PR + r"transformer_ffn_layers.\1.\2.\3"),
    (_DEC + r"head\.norm\.(\w+)", PR + r"decoder_norm.\1"),
    (_DEC + r"head\.class_embed\.(\w+)", PR + r"class_embed.\1"),
    (_DEC + r"head\.mask_embed\.layers\.(\d+)\.(\w+)", PR + r"mask_embed.layers.\1.\2"),
    # class_transformer: a DETR Transformer with 0 encoder layers (self_attn/norm1, multihead_attn/norm2, FFN/norm3)
    (r"query_transformer\.input_proj\.(\w+)", PR + r"class_input_proj.\1"),
    (_QT + r"self_attn\.attn\.[qkv]_proj\.(\w+)", _CT.format(r"\1") + r"self_attn.in_proj_\2{qkv}"),
    (_QT + r"self_attn\.attn\.out_proj\.(\w+)", _CT.format(r"\1") + r"self_attn.out_proj.\2"),
    (_QT + r"cross_attn\.attn\.[qkv]_proj\.(\w+)", _CT.format(r"\1") + r"multihead_attn.in_proj_\2{qkv}"),
    (_QT + r"cross_attn\.attn\.out_proj\.(\w+)", _CT.format(r"\1") + r"multihead_attn.out_proj.\2"),
    (_QT + r"self_attn\.norm\.(\w+)", _CT.format(r"\1") + r"norm1.\2"),
    (_QT + r"cross_attn\.norm\.(\w+)", _CT.format(r"\1") + r"norm2.\2"),
    (_QT + r"ffn\.norm\.(\w+)", _CT.format(r"\1") + r"norm3.\2"),
    (_QT + r"ffn\.(linear[12])\.(\w+)", _CT.format(r"\1") + r"\2.\3"),
    (r"query_transformer\.norm\.(\w+)", PR + r"class_transformer.decoder.norm.\1"),
    # OneFormer: task_mlp, and the training-only text_encoder (CLIP TextTransformer), text_projector, prompt_ctx
    (r"task_encoder\.mlp\.layers\.(\d+)\.(\w+)", r"task_mlp.layers.\1.\2"),
    (r"text_mapper\.text_encoder\.(token_embedding\.weight|positional_embedding)", r"text_encoder.\1"),
    (r"text_mapper\.text_encoder\.final_norm\.(\w+)", r"text_encoder.ln_final.\1"),
    (_TE + r"attn\.[qkv]_proj\.(\w+)", r"text_encoder.transformer.resblocks.\1.attn.in_proj_\2{qkv}"),
    (_TE + r"attn\.out_proj\.(\w+)", r"text_encoder.transformer.resblocks.\1.attn.out_proj.\2"),
    (_TE + r"norm([12])\.(\w+)", r"text_encoder.transformer.resblocks.\1.ln_\2.\3"),
    (_TE + r"mlp\.fc1\.(\w+)", r"text_encoder.transformer.resblocks.\1.mlp.c_fc.\2"),
    (_TE + r"mlp\.fc2\.(\w+)", r"text_encoder.transformer.resblocks.\1.mlp.c_proj.\2"),
    (r"text_mapper\.projector\.layers\.(\d+)\.(\w+)", r"text_projector.layers.\1.\2"),
    (r"text_mapper\.prompt_ctx\.weight", "prompt_ctx.weight"),
]


def ours_to_original(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our OneFormer state dict in the original's names, with the extras an original file carries (Swin's
    relative position index buffers; the criterion's state when the text mapper is there)."""
    out: dict[str, torch.Tensor] = {}
    packed: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        for pattern, target in OURS_TO_ORIGINAL:
            m = re.fullmatch(pattern, key)
            if m is None:
                continue
            name = target(m) if callable(target) else m.expand(target)
            if name.endswith("{qkv}"):
                packed.setdefault(name[: -len("{qkv}")], {})[re.search(r"([qkv])_proj\.\w+$", key)[1]] = value
            else:
                out[name] = value.clone()
            break
        else:
            raise KeyError(f"the test's mapping misses {key}")
    for name, parts in packed.items():
        out[name] = torch.cat([parts["q"], parts["k"], parts["v"]])
    for key in [k for k in out if k.endswith("attn.relative_position_bias_table")]:
        window = (int(out[key].shape[0] ** 0.5) + 1) // 2
        out[key.replace("bias_table", "index")] = torch.zeros(window**2, window**2, dtype=torch.int64)
    out["criterion.empty_weight"] = torch.ones(5)
    if any(k.startswith("text_encoder.") for k in out):
        out["criterion.logit_scale"] = torch.tensor(2.659)
    return out


SWIN = {"name": "swin", "embed_dim": 16, "depths": [1, 1, 2, 1], "num_heads": [1, 1, 2, 2], "window_size": 7,
        "mlp_ratio": 4.0, "qkv_bias": True}
# a DiNAT-L layout (depths, kernel 7 with the Cityscapes dilations: what the converter can recognise) at a tiny width
DINAT = {"name": "dinat", "embed_dim": 16, "depths": [3, 4, 18, 5], "num_heads": [1, 1, 2, 2], "kernel_size": 7,
         "dilations": [[1, 18, 1], [1, 5, 1, 9], [1, 2, 1, 3, 1, 4] * 3, [1, 2, 1, 2, 1]], "mlp_ratio": 2.0,
         "qkv_bias": True, "layer_scale": None}
CONVNEXT = {"name": "convnext", "depths": [1, 1, 2, 1], "dims": [16, 24, 32, 40], "kernel_size": 7,
            "layer_scale_init_value": 1.0, "in_chans": 3}


def tiny_config(backbone: dict, *, with_text_mapper: bool, **kw) -> OneFormerConfig:
    """A small OneFormer with what the converter assumes of the published models (8 heads, dropout 0.1,
    task norm, text heads = width // 64)."""
    fields = dict(
        backbone=dict(backbone), num_classes=4, num_queries=10, hidden_dim=64, conv_dim=64, mask_dim=64,
        num_heads=8, encoder_layers=2, encoder_ffn_dim=32, encoder_dropout=0.1, decoder_layers=3,
        decoder_ffn_dim=48, query_dropout=0.1, with_text_mapper=with_text_mapper,
    )
    if with_text_mapper:  # else the text fields keep their defaults, as when read from an inference file
        fields.update(text_width=64, text_layers=2, text_heads=1, text_vocab_size=99, text_n_ctx=4)
    return OneFormerConfig(**{**fields, **kw})


def random_oneformer(config: OneFormerConfig, seed: int = 0):
    """A OneFormer with noise on every parameter (so a parameter loaded into the wrong place shows)."""
    torch.manual_seed(seed)
    model = set_backend(build_oneformer(config), "reference").eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def task_ids(batch: int = 2) -> torch.Tensor:
    """Token ids of "the task is {semantic, panoptic}" (start, words, end, zero padding to 77)."""
    ids = torch.zeros(batch, 77, dtype=torch.int64)
    for b in range(batch):
        ids[b, :6] = torch.tensor([49406, 518, 2246, 533, (13089, 26765)[b % 2], 49407])
    return ids


def text_ids(batch: int, num_text: int, vocab: int, seed: int = 0) -> torch.Tensor:
    """Random prompts (B, T, 77): start token, words, end token (each row's largest id), zeros."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(batch, num_text, 77, dtype=torch.int64)
    for b in range(batch):
        for t in range(num_text):
            n = int(torch.randint(1, 9, (1,), generator=g))
            ids[b, t, 0], ids[b, t, n + 1] = vocab - 2, vocab - 1
            ids[b, t, 1 : n + 1] = torch.randint(1, vocab - 2, (n,), generator=g)
    return ids
