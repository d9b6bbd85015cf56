"""Original detectron2 backbone weights (Mask2Former / OneFormer ``model_final*.pkl``/``.pth``) ->
``maskformers.models.backbone`` modules (timm names).

Swin (D2SwinTransformer): ``backbone.patch_embed.{proj,norm}``, ``backbone.layers.{i}.blocks.{j}.{norm1,
attn.qkv, attn.proj, attn.relative_position_bias_table, norm2, mlp.fc1, mlp.fc2}`` keep their names;
``attn.relative_position_index`` buffers are dropped (regenerated); ``layers.{i}.downsample`` (end of
stage i) becomes ``layers.{i+1}.downsample`` (start of stage i+1); ``norm{i}`` becomes ``norms.{i}``.

ResNet (detectron2 ``build_resnet_backbone``, e.g. the torchvision-initialised R-50 of Mask2Former):
``stem.conv1`` -> ``conv1``/``bn1``, ``res{k}.{b}.conv{n}`` -> ``layer{k-1}.{b}.conv{n}``/``bn{n}``,
``res{k}.{b}.shortcut`` -> ``layer{k-1}.{b}.downsample.{0,1}``. The mapping is only faithful for
STRIDE_IN_1X1=False (Mask2Former's setting), RES5_DILATION=1, one group and a basic stem; those settings
do not show in the weights, so ``detect_d2_backbone`` cannot check them. Arrays from a ``.pkl`` must be
turned into tensors (``torch.as_tensor``) before conversion.

ConvNeXt (OneFormer's D2ConvNeXt): ``downsample_layers.0.{0,1}`` (stem conv, LayerNorm) -> ``stem.{0,1}``;
``downsample_layers.{i}.{0,1}`` (LayerNorm, 2x2 conv opening stage i) -> ``stages.{i}.downsample.{0,1}``;
``stages.{i}.{j}.{dwconv, norm, pwconv1, pwconv2, gamma}`` -> ``stages.{i}.blocks.{j}.{conv_dw, norm, mlp.fc1,
mlp.fc2, gamma}``; ``norm{i}`` -> ``norms.{i}``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import torch

from weights_convert.rules import ConversionError, Rule

__all__ = ["swin_rules", "resnet_rules", "convnext_rules", "backbone_rules", "detect_d2_backbone"]

_PARAM = r"(weight|bias)"
_BN = r"(weight|bias|running_mean|running_var)"


def swin_rules(src_prefix: str = "backbone.", dst_prefix: str = "") -> list[Rule]:
    """Rename table for a D2SwinTransformer state dict (keys under ``src_prefix``)."""
    p = re.escape(src_prefix)
    block = p + r"layers\.(\d+)\.blocks\.(\d+)\."
    return [
        Rule(p + r"patch_embed\.(proj|norm)\." + _PARAM, lambda m: f"{dst_prefix}patch_embed.{m[1]}.{m[2]}"),
        Rule(block + r"(norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\." + _PARAM,
             lambda m: f"{dst_prefix}layers.{m[1]}.blocks.{m[2]}.{m[3]}.{m[4]}"),
        Rule(block + r"attn\.relative_position_bias_table",
             lambda m: f"{dst_prefix}layers.{m[1]}.blocks.{m[2]}.attn.relative_position_bias_table"),
        Rule(block + r"attn\.relative_position_index", None),
        Rule(p + r"layers\.(\d+)\.downsample\.(reduction\.weight|norm\.weight|norm\.bias)",
             lambda m: f"{dst_prefix}layers.{int(m[1]) + 1}.downsample.{m[2]}"),
        Rule(p + r"norm(\d+)\." + _PARAM, lambda m: f"{dst_prefix}norms.{m[1]}.{m[2]}"),
    ]


def resnet_rules(src_prefix: str = "backbone.", dst_prefix: str = "") -> list[Rule]:
    """Rename table for a detectron2 ResNet state dict (keys under ``src_prefix``)."""
    p = re.escape(src_prefix)
    block = p + r"res([2-5])\.(\d+)\."

    def layer(m: re.Match) -> str:
        return f"{dst_prefix}layer{int(m[1]) - 1}.{m[2]}."

    return [
        Rule(p + r"stem\.conv1\.weight", lambda m: f"{dst_prefix}conv1.weight"),
        Rule(p + r"stem\.conv1\.norm\." + _BN, lambda m: f"{dst_prefix}bn1.{m[1]}"),
        Rule(block + r"conv([123])\.weight", lambda m: layer(m) + f"conv{m[3]}.weight"),
        Rule(block + r"conv([123])\.norm\." + _BN, lambda m: layer(m) + f"bn{m[3]}.{m[4]}"),
        Rule(block + r"shortcut\.weight", lambda m: layer(m) + "downsample.0.weight"),
        Rule(block + r"shortcut\.norm\." + _BN, lambda m: layer(m) + f"downsample.1.{m[3]}"),
        # a (Sync)BN-trained checkpoint counts batches; frozen or eval-mode norms do not need it
        Rule(p + r"(?:stem|res[2-5]\.\d+)\.\w+\.norm\.num_batches_tracked", None),
    ]


def convnext_rules(src_prefix: str = "backbone.", dst_prefix: str = "") -> list[Rule]:
    """Rename table for a D2ConvNeXt state dict (keys under ``src_prefix``)."""
    p, d = re.escape(src_prefix), dst_prefix
    block = p + r"stages\.(\d+)\.(\d+)\."
    return [
        Rule(p + r"downsample_layers\.0\.([01])\." + _PARAM, rf"{d}stem.\1.\2"),
        Rule(p + r"downsample_layers\.([1-9]\d*)\.([01])\." + _PARAM, rf"{d}stages.\1.downsample.\2.\3"),
        Rule(block + r"dwconv\." + _PARAM, rf"{d}stages.\1.blocks.\2.conv_dw.\3"),
        Rule(block + r"pwconv([12])\." + _PARAM, rf"{d}stages.\1.blocks.\2.mlp.fc\3.\4"),
        Rule(block + r"(norm\.weight|norm\.bias|gamma)", rf"{d}stages.\1.blocks.\2.\3"),
        Rule(p + r"norm(\d+)\." + _PARAM, rf"{d}norms.\1.\2"),
    ]


def backbone_rules(kind: str, src_prefix: str = "backbone.", dst_prefix: str = "") -> list[Rule]:
    """The rename table of a backbone kind as :func:`detect_d2_backbone` names it."""
    from .d2_dinat import rules as dinat_rules

    tables = {"swin": swin_rules, "resnet": resnet_rules, "convnext": convnext_rules, "dinat": dinat_rules}
    if kind not in tables:
        raise ValueError(f"backbone kind must be one of {sorted(tables)}, got {kind!r}")
    return tables[kind](src_prefix, dst_prefix)


def _count(keys: list[str], pattern: str) -> dict[int, set[int]]:
    found: dict[int, set[int]] = {}
    for key in keys:
        m = re.fullmatch(pattern, key)
        if m:
            found.setdefault(int(m[1]), set()).add(int(m[2]))
    return found


def detect_d2_backbone(state_dict: Mapping[str, torch.Tensor], prefix: str = "backbone.") -> tuple[str, dict[str, Any]]:
    """Which backbone a detectron2 state dict holds, read from its keys and shapes.

    Returns ``("swin", kwargs for swin_backbone)`` with embed_dim, depths, num_heads, window_size,
    mlp_ratio and qkv_bias, ``("resnet", {"depth": 50 | 101})``, or ``("convnext", kwargs for
    convnext_backbone)`` with depths, dims, kernel_size, layer_scale_init_value and in_chans. Raises
    ``ConversionError`` when the keys fit none or describe an unsupported variant.
    """
    p = re.escape(prefix)
    keys = list(state_dict)
    if prefix + "patch_embed.proj.weight" in state_dict:
        if prefix + "absolute_pos_embed" in state_dict:
            raise ConversionError("unsupported Swin: absolute position embedding (ape=True)")
        proj = state_dict[prefix + "patch_embed.proj.weight"]
        embed_dim = int(proj.shape[0])
        if tuple(proj.shape[2:]) != (4, 4):
            raise ConversionError(f"unsupported Swin patch size {tuple(proj.shape[2:])} (only 4x4)")
        blocks = _count(keys, p + r"layers\.(\d+)\.blocks\.(\d+)\.attn\.qkv\.weight")
        if not blocks or sorted(blocks) != list(range(len(blocks))):
            raise ConversionError(f"Swin stages are not numbered 0..n-1 under {prefix}layers: {sorted(blocks)}")
        depths = [len(blocks[s]) for s in sorted(blocks)]
        needed = [f"{prefix}layers.{s}.blocks.0.attn.relative_position_bias_table" for s in sorted(blocks)]
        needed.append(prefix + "layers.0.blocks.0.mlp.fc1.weight")
        if any(k not in state_dict for k in needed):
            raise ConversionError(f"incomplete Swin: missing {[k for k in needed if k not in state_dict]}")
        tables = [state_dict[k] for k in needed[:-1]]
        num_heads = [int(t.shape[1]) for t in tables]
        windows = {(math.isqrt(int(t.shape[0])) + 1) // 2 for t in tables}
        window = windows.pop()
        if windows or (2 * window - 1) ** 2 != int(tables[0].shape[0]):
            shapes = [tuple(t.shape) for t in tables]
            raise ConversionError(f"cannot read one square window size from bias tables {shapes}")
        hidden = state_dict[prefix + "layers.0.blocks.0.mlp.fc1.weight"].shape[0]
        return "swin", {
            "embed_dim": embed_dim, "depths": depths, "num_heads": num_heads, "window_size": window,
            "mlp_ratio": hidden / embed_dim, "qkv_bias": prefix + "layers.0.blocks.0.attn.qkv.bias" in state_dict,
        }
    if prefix + "stem.conv1.weight" in state_dict:
        blocks = _count(keys, p + r"res(\d)\.(\d+)\.conv1\.weight")
        depths = tuple(len(blocks.get(k, ())) for k in (2, 3, 4, 5))
        depth = {(3, 4, 6, 3): 50, (3, 4, 23, 3): 101}.get(depths)
        if depth is None:
            raise ConversionError(f"unsupported ResNet blocks per stage res2..res5 = {depths}; "
                                  f"supported: (3, 4, 6, 3) and (3, 4, 23, 3)")
        if prefix + "res2.0.conv3.weight" not in state_dict:
            raise ConversionError("unsupported ResNet: basic blocks (ResNet-18/34); only bottleneck blocks")
        stem = tuple(state_dict[prefix + "stem.conv1.weight"].shape)
        conv2 = tuple(state_dict[prefix + "res2.0.conv2.weight"].shape)
        if stem != (64, 3, 7, 7) or conv2 != (64, 64, 3, 3):
            raise ConversionError(f"unsupported ResNet variant: stem {stem}, res2.0.conv2 {conv2} "
                                  f"(expected (64, 3, 7, 7) and (64, 64, 3, 3): basic stem, one group, width 64)")
        return "resnet", {"depth": depth}
    if prefix + "downsample_layers.0.0.weight" in state_dict:
        return "convnext", _convnext_kwargs(state_dict, prefix)
    if prefix + "patch_embed.proj.0.weight" in state_dict and prefix + "levels.0.blocks.0.attn.rpb" in state_dict:
        return "dinat", _dinat_kwargs(state_dict, prefix)
    heads = sorted({k[len(prefix):].split(".")[0] for k in keys if k.startswith(prefix)})
    raise ConversionError(
        f"no Swin, ResNet, ConvNeXt or DiNAT backbone under {prefix!r}: found {heads or 'no such keys'}"
    )


# The dilations of a DiNAT do not show in its weights. The published OneFormer DiNAT-L checkpoints: kernel 11
# with the 640-crop schedule (ADE20K 640/896, COCO, Mapillary Vistas; the ADE20K 1280 model needs the "1280"
# schedule of maskformers.models.dinat.DINAT_L_DILATIONS, given with a config) and kernel 7 (Cityscapes).
_DINAT_SCHEDULES = {
    11: ((1, 20, 1), (1, 5, 1, 10), (1, 2, 1, 3, 1, 4, 1, 5) * 2 + (1, 5), (1, 2, 1, 2, 1)),
    7: ((1, 18, 1), (1, 5, 1, 9), (1, 2, 1, 3, 1, 4) * 3, (1, 2, 1, 2, 1)),
}


def _dinat_kwargs(state_dict: Mapping[str, torch.Tensor], prefix: str) -> dict[str, Any]:
    p = re.escape(prefix)
    blocks = _count(list(state_dict), p + r"levels\.(\d+)\.blocks\.(\d+)\.attn\.rpb")
    depths = [len(blocks[level]) for level in sorted(blocks)]
    rpbs = [state_dict[f"{prefix}levels.{level}.blocks.0.attn.rpb"] for level in sorted(blocks)]
    kernels = {(int(r.shape[-1]) + 1) // 2 for r in rpbs}
    if len(kernels) != 1:
        raise ConversionError(f"DiNAT levels disagree on the kernel size: bias tables {[tuple(r.shape) for r in rpbs]}")
    kernel = kernels.pop()
    if kernel not in _DINAT_SCHEDULES or len(depths) != 4 or any(
        len(d) != n for d, n in zip(_DINAT_SCHEDULES[kernel], depths)
    ):
        raise ConversionError(
            f"a DiNAT with kernel {kernel} and depths {depths}: its dilations cannot be read from the weights and it "
            "is not a published OneFormer DiNAT-L; give the backbone spec (with 'dilations') in a config"
        )
    embed_dim = int(state_dict[prefix + "patch_embed.proj.1.weight"].shape[0])  # the tokenizer's second conv
    hidden = int(state_dict[prefix + "levels.0.blocks.0.mlp.fc1.weight"].shape[0])
    return {
        "embed_dim": embed_dim, "depths": depths, "num_heads": [int(r.shape[0]) for r in rpbs],
        "kernel_size": kernel, "dilations": [list(level) for level in _DINAT_SCHEDULES[kernel]],
        "mlp_ratio": hidden / embed_dim, "qkv_bias": prefix + "levels.0.blocks.0.attn.qkv.bias" in state_dict,
        "layer_scale": 1.0 if prefix + "levels.0.blocks.0.gamma1" in state_dict else None,
    }


def _convnext_kwargs(state_dict: Mapping[str, torch.Tensor], prefix: str) -> dict[str, Any]:
    p = re.escape(prefix)
    stem = state_dict[prefix + "downsample_layers.0.0.weight"]
    if stem.dim() != 4 or tuple(stem.shape[2:]) != (4, 4):
        raise ConversionError(f"unsupported ConvNeXt stem {tuple(stem.shape)} (only a 4x4 stride-4 conv)")
    blocks = _count(list(state_dict), p + r"stages\.(\d+)\.(\d+)\.dwconv\.weight")
    if not blocks or sorted(blocks) != list(range(len(blocks))):
        raise ConversionError(f"ConvNeXt stages are not numbered 0..n-1 under {prefix}stages: {sorted(blocks)}")
    for s, found in blocks.items():
        if sorted(found) != list(range(len(found))):
            raise ConversionError(f"ConvNeXt stage {s} blocks are not numbered 0..n-1: {sorted(found)}")
    dw = [state_dict[f"{prefix}stages.{s}.0.dwconv.weight"] for s in sorted(blocks)]
    dims = [int(w.shape[0]) for w in dw]
    kernels = {tuple(w.shape[2:]) for w in dw}
    needed = [f"{prefix}norm{s}.weight" for s in sorted(blocks)] + [f"{prefix}stages.0.0.pwconv1.weight"]
    if any(k not in state_dict for k in needed) or len(kernels) != 1:
        raise ConversionError(f"unsupported ConvNeXt: per-stage output norms or blocks missing "
                              f"({[k for k in needed if k not in state_dict]}), or kernels {sorted(kernels)}")
    kernel = kernels.pop()
    hidden = int(state_dict[prefix + "stages.0.0.pwconv1.weight"].shape[0])
    if kernel[0] != kernel[1] or hidden != 4 * dims[0]:
        raise ConversionError(f"unsupported ConvNeXt: depthwise kernel {kernel}, MLP width {hidden} for {dims[0]} "
                              "channels (only square kernels and the 4x MLP)")
    return {
        "depths": [len(blocks[s]) for s in sorted(blocks)], "dims": dims, "kernel_size": kernel[0],
        # the value is only an initialisation; the weights show whether there is a layer scale at all
        "layer_scale_init_value": 1.0 if prefix + "stages.0.0.gamma" in state_dict else None,
        "in_chans": int(stem.shape[1]),
    }
