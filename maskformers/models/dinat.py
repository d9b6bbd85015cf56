"""DiNAT backbone (Dilated Neighborhood Attention Transformer, Hassani & Shi 2022) as OneFormer uses it.

Contract of ``backbone.py``: ``forward(pixel_values (B, C_in, H, W))`` returns feature maps
``(B, C_i, H_i, W_i)`` ordered by increasing stride (4, 8, 16, 32); ``channels`` and ``strides`` report
them. Any H, W >= 1 works.

Structure (OneFormer's ``D2DiNAT``, transformers' ``DinatBackbone``): a convolutional tokenizer (two 3x3
stride-2 convolutions, LayerNorm) -> four levels of pre-norm blocks [neighborhood attention with relative
position bias, per-block dilation from the schedule; MLP; optional layer scale], each level but the last
ending in a 3x3 stride-2 convolution + LayerNorm that doubles the width -> a LayerNorm on every level's
output before its downsampler. A map smaller than kernel_size * dilation is zero-padded (after norm1, right
and bottom) for the attention and cropped back, exactly as NATTEN's module and transformers do.

Parameter names follow the original (``patch_embed.proj.{0,1}``, ``levels.{i}.blocks.{j}.attn.{qkv,rpb,proj}``,
``norm1/2``, ``mlp.fc1/fc2``, ``gamma1/2``, ``levels.{i}.downsample.{reduction,norm}``) with ``norms.{i}``
for the output norms (``norm{i}`` in the original); converters: ``weights_convert/hf_dinat.py`` and
``weights_convert/d2_dinat.py``. Attention layers call ``maskformers.ops.neighborhood_attention_2d`` with
their ``op_backend`` (see ``maskformers.ops.set_backend``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, trunc_normal_
from torch import nn
from torch.utils.checkpoint import checkpoint

from maskformers.ops import neighborhood_attention_2d

__all__ = [
    "DiNATBackbone",
    "NeighborhoodAttention2D",
    "DINAT_L_DILATIONS",
    "dinat_backbone",
    "dinat_mini",
    "dinat_tiny",
    "dinat_small",
    "dinat_base",
    "dinat_large",
    ]

# Dilation per block and level. ImageNet (224 px) models: DiNAT paper / NATTEN's classification configs.
IMAGENET_DILATIONS_6 = ((1, 8, 1), (1, 4, 1, 4), (1, 2) * 3, (1,) * 5)
IMAGENET_DILATIONS_18 = ((1, 8, 1), (1, 4, 1, 4), (1, 2) * 9, (1,) * 5)
# OneFormer's DiNAT-L schedules, by training crop (configs/*/dinat/*.yaml): 640 and 896 crops (ADE20K,
# COCO, Mapillary), 1280 crops (ADE20K), and the kernel-7 Cityscapes model.
DINAT_L_DILATIONS = {
    "640": ((1, 20, 1), (1, 5, 1, 10), (1, 2, 1, 3, 1, 4, 1, 5) * 2 + (1, 5), (1, 2, 1, 2, 1)),
    "1280": ((1, 28, 1), (1, 7, 1, 14), (1, 3, 1, 5, 1, 5, 1, 7) * 2 + (1, 7), (1, 3, 1, 3, 1)),
    "cityscapes": ((1, 18, 1), (1, 5, 1, 9), (1, 2, 1, 3, 1, 4) * 3, (1, 2, 1, 2, 1)),
}


class NeighborhoodAttention2D(nn.Module):
    """Multi-head 2-D neighborhood attention: fused qkv projection, relative position bias, output
    projection. x (B, H, W, C) -> (B, H, W, C)."""

    def __init__(
        self, *, dim: int, num_heads: int, kernel_size: int, dilation: int = 1, qkv_bias: bool = True,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim={dim} must be divisible by num_heads={num_heads}")
        if kernel_size < 1 or kernel_size % 2 == 0 or dilation < 1:
            raise ValueError(f"expected an odd kernel_size >= 1 and dilation >= 1, got {kernel_size} and {dilation}")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.kernel_size, self.dilation = kernel_size, dilation
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.rpb = nn.Parameter(torch.zeros(num_heads, 2 * kernel_size - 1, 2 * kernel_size - 1))
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.op_backend: str | None = None  # see maskformers.ops.set_backend
        trunc_normal_(self.rpb, std=0.02, a=-2.0, b=2.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, height, width, channels = x.shape
        window = self.kernel_size * self.dilation
        pad_h, pad_w = max(0, window - height), max(0, window - width)
        if pad_h or pad_w:  # the op needs at least kernel_size * dilation pixels per side
            x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
        qkv = self.qkv(x).view(batch, height + pad_h, width + pad_w, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.unbind(3)  # (B, H', W', heads, D) each
        out = neighborhood_attention_2d(  # the bias in q's dtype, also under autocast
            q, k, v, self.rpb.to(q.dtype), kernel_size=self.kernel_size, dilation=self.dilation, scale=self.scale,
            backend=self.op_backend,
        )
        out = out.reshape(batch, height + pad_h, width + pad_w, channels)[:, :height, :width]
        return self.proj_drop(self.proj(out))


class DiNATBlock(nn.Module):
    """Pre-norm block: x + gamma1 * NA(norm1(x)), then x + gamma2 * MLP(norm2(x)); x (B, H, W, C)."""

    def __init__(
        self, *, dim: int, num_heads: int, kernel_size: int, dilation: int, mlp_ratio: float, qkv_bias: bool,
        drop_rate: float, drop_path: float, layer_scale: float | None, eps: float,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = NeighborhoodAttention2D(
            dim=dim, num_heads=num_heads, kernel_size=kernel_size, dilation=dilation, qkv_bias=qkv_bias,
            proj_drop=drop_rate,
        )
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=nn.GELU, drop=drop_rate)
        self.layer_scale = layer_scale is not None
        if self.layer_scale:
            self.gamma1 = nn.Parameter(torch.full((dim,), float(layer_scale)))
            self.gamma2 = nn.Parameter(torch.full((dim,), float(layer_scale)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.attn(self.norm1(x))
        x = x + self.drop_path(self.gamma1 * y if self.layer_scale else y)
        y = self.mlp(self.norm2(x))
        return x + self.drop_path(self.gamma2 * y if self.layer_scale else y)


class ConvDownsampler(nn.Module):
    """3x3 stride-2 convolution doubling the width, then LayerNorm; (B, H, W, C) -> (B, ceil(H/2), ceil(W/2), 2C)."""

    def __init__(self, *, dim: int, eps: float) -> None:
        super().__init__()
        self.reduction = nn.Conv2d(dim, 2 * dim, kernel_size=3, stride=2, padding=1, bias=False)
        self.norm = nn.LayerNorm(2 * dim, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.reduction(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))


class ConvTokenizer(nn.Module):
    """Two 3x3 stride-2 convolutions (C_in -> dim/2 -> dim) and LayerNorm;
    (B, C_in, H, W) -> (B, ceil(H/4), ceil(W/4), dim)."""

    def __init__(self, *, in_chans: int, dim: int, eps: float) -> None:
        super().__init__()
        self.proj = nn.Sequential(
            nn.Conv2d(in_chans, dim // 2, kernel_size=3, stride=2, padding=1),
            nn.Conv2d(dim // 2, dim, kernel_size=3, stride=2, padding=1),
        )
        self.norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class DiNATLevel(nn.Module):
    """The blocks of one level and the downsampler that follows them (None for the last level)."""

    def __init__(self, *, blocks: Sequence[DiNATBlock], downsample: ConvDownsampler | None) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.downsample = downsample


class DiNATBackbone(nn.Module):
    """DiNAT returning the normalised output of every level: (B, embed_dim * 2**i, ceil(H / 2**(i+2)), ...)."""

    def __init__(
        self,
        *,
        embed_dim: int,
        depths: Sequence[int],
        num_heads: Sequence[int],
        kernel_size: int,
        dilations: Sequence[Sequence[int]],
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        layer_scale: float | None = None,
        in_chans: int = 3,
        layer_norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        depths, num_heads = tuple(depths), tuple(num_heads)
        dilations = tuple(tuple(int(d) for d in level) for level in dilations)
        if not depths or len(depths) != len(num_heads) or min(depths) < 1 or min(num_heads) < 1:
            raise ValueError(f"expected equally long positive depths and num_heads, got {depths} and {num_heads}")
        if [len(level) for level in dilations] != list(depths):
            raise ValueError(f"dilations must give one dilation per block of every level {depths}, got {dilations}")
        dims = tuple(embed_dim * 2**i for i in range(len(depths)))
        if embed_dim < 2 or embed_dim % 2 or any(d % h for d, h in zip(dims, num_heads)):
            raise ValueError(f"expected an even embed_dim and level widths {dims} divisible by num_heads {num_heads}")
        self.in_chans = in_chans
        self.channels = dims
        self.strides = tuple(4 * 2**i for i in range(len(depths)))
        self.grad_checkpointing = False

        self.patch_embed = ConvTokenizer(in_chans=in_chans, dim=embed_dim, eps=layer_norm_eps)
        self.pos_drop = nn.Dropout(drop_rate)
        # on the CPU explicitly: under `with torch.device("meta")` the rates must still be readable numbers
        rates = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").split(depths)
        self.levels = nn.ModuleList([
            DiNATLevel(
                blocks=[
                    DiNATBlock(
                        dim=dims[i], num_heads=num_heads[i], kernel_size=kernel_size, dilation=dilations[i][j],
                        mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, drop_rate=drop_rate, drop_path=float(rates[i][j]),
                        layer_scale=layer_scale, eps=layer_norm_eps,
                    )
                    for j in range(depths[i])
                ],
                downsample=ConvDownsampler(dim=dims[i], eps=layer_norm_eps) if i + 1 < len(depths) else None,
            )
            for i in range(len(depths))
        ])
        self.norms = nn.ModuleList([nn.LayerNorm(d, eps=layer_norm_eps) for d in dims])
        for module in self.levels.modules():
            if isinstance(module, nn.Linear):
                trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in backward (saves activation memory when training at large sizes)."""
        self.grad_checkpointing = enable

    def forward(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """pixel_values (B, C_in, H, W) -> [(B, C_i, H_i, W_i)] at strides 4, 8, 16, 32."""
        is_image = isinstance(pixel_values, torch.Tensor) and pixel_values.dim() == 4
        if not is_image or pixel_values.shape[1] != self.in_chans:
            got = tuple(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) else type(pixel_values).__name__
            raise ValueError(f"expected pixel_values (B, {self.in_chans}, H, W), got {got}")
        if not pixel_values.is_floating_point() or pixel_values.numel() == 0:
            raise ValueError(f"expected non-empty floating-point pixel_values, got {pixel_values.dtype} "
                             f"{tuple(pixel_values.shape)}")
        x = self.pos_drop(self.patch_embed(pixel_values))  # (B, H/4, W/4, C)
        features = []
        for level, norm in zip(self.levels, self.norms):
            for block in level.blocks:
                if self.grad_checkpointing and torch.is_grad_enabled():
                    x = checkpoint(block, x, use_reentrant=False)
                else:
                    x = block(x)
            features.append(norm(x).permute(0, 3, 1, 2).contiguous())  # (B, C_i, H_i, W_i)
            if level.downsample is not None:
                x = level.downsample(x)
        return features


def dinat_backbone(
    *, embed_dim: int, depths: Sequence[int], num_heads: Sequence[int], kernel_size: int,
    dilations: Sequence[Sequence[int]], **kwargs: Any,
) -> DiNATBackbone:
    """Any DiNAT; ``kwargs`` are the remaining ``DiNATBackbone`` options (mlp_ratio, drop_path_rate, ...).
    This is what ``{"name": "dinat", **kwargs}`` backbone specs build."""
    return DiNATBackbone(embed_dim=embed_dim, depths=depths, num_heads=num_heads, kernel_size=kernel_size,
                         dilations=dilations, **kwargs)


def dinat_mini(**kwargs: Any) -> DiNATBackbone:
    """DiNAT-Mini (ImageNet-1k, 224 px): 64 channels, depths (3, 4, 6, 5), kernel 7, MLP ratio 3."""
    options = dict(kernel_size=7, dilations=IMAGENET_DILATIONS_6, mlp_ratio=3.0) | kwargs
    return dinat_backbone(embed_dim=64, depths=(3, 4, 6, 5), num_heads=(2, 4, 8, 16), **options)


def dinat_tiny(**kwargs: Any) -> DiNATBackbone:
    """DiNAT-Tiny: 64 channels, depths (3, 4, 18, 5), kernel 7, MLP ratio 3."""
    options = dict(kernel_size=7, dilations=IMAGENET_DILATIONS_18, mlp_ratio=3.0) | kwargs
    return dinat_backbone(embed_dim=64, depths=(3, 4, 18, 5), num_heads=(2, 4, 8, 16), **options)


def dinat_small(**kwargs: Any) -> DiNATBackbone:
    """DiNAT-Small: 96 channels, depths (3, 4, 18, 5), kernel 7, MLP ratio 2."""
    options = dict(kernel_size=7, dilations=IMAGENET_DILATIONS_18, mlp_ratio=2.0) | kwargs
    return dinat_backbone(embed_dim=96, depths=(3, 4, 18, 5), num_heads=(3, 6, 12, 24), **options)


def dinat_base(**kwargs: Any) -> DiNATBackbone:
    """DiNAT-Base: 128 channels, depths (3, 4, 18, 5), kernel 7, MLP ratio 2, layer scale 1e-5."""
    options = dict(kernel_size=7, dilations=IMAGENET_DILATIONS_18, mlp_ratio=2.0, layer_scale=1e-5) | kwargs
    return dinat_backbone(embed_dim=128, depths=(3, 4, 18, 5), num_heads=(4, 8, 16, 32), **options)


def dinat_large(*, schedule: str = "640", **kwargs: Any) -> DiNATBackbone:
    """DiNAT-L as OneFormer uses it: 192 channels, depths (3, 4, 18, 5), heads (6, 12, 24, 48), MLP ratio 2,
    kernel 11 with the dilations of ``DINAT_L_DILATIONS[schedule]`` ("640": ADE20K 640/896, COCO,
    Mapillary; "1280": ADE20K 1280; "cityscapes": kernel 7). OneFormer trains it with drop_path_rate=0.3."""
    if schedule not in DINAT_L_DILATIONS:
        raise ValueError(f"unknown DiNAT-L schedule {schedule!r}; known: {sorted(DINAT_L_DILATIONS)}")
    options = dict(kernel_size=7 if schedule == "cityscapes" else 11, dilations=DINAT_L_DILATIONS[schedule],
                   mlp_ratio=2.0) | kwargs
    return dinat_backbone(embed_dim=192, depths=(3, 4, 18, 5), num_heads=(6, 12, 24, 48), **options)
