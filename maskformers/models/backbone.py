"""Multi-scale backbones over timm modules: the Mask2Former/OneFormer Swin and a detectron2-style ResNet
(OneFormer's ConvNeXt lives in :mod:`maskformers.models.convnext`; ``build_backbone`` builds all three).

Contract shared by every backbone here: ``forward(pixel_values (B, C_in, H, W))`` returns a list of
feature maps ``(B, C_i, H_i, W_i)`` ordered by increasing stride, and the module reports
``channels`` and ``strides`` (tuples, timm ``feature_info`` style). Any H, W >= 1 is accepted.

The Swin follows the published detectron2 Swin (and transformers' ``SwinBackbone``) exactly; timm's
own ``SwinTransformerBlock.forward`` differs from it when a map is not a multiple of the window (timm
rolls before padding, the original pads before rolling), so the blocks are driven by
``swin_block_forward`` below while parameters keep timm's names and so timm checkpoints load.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import PatchEmbed, freeze_batch_norm_2d, trunc_normal_
from timm.models.resnet import Bottleneck, ResNet
from timm.models.swin_transformer import (
    SwinTransformerBlock,
    SwinTransformerStage,
    window_partition,
    window_reverse,
)
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = [
    "SwinBackbone",
    "ResNetBackbone",
    "swin_backbone",
    "swin_tiny",
    "swin_small",
    "swin_base",
    "swin_large",
    "resnet_backbone",
    "build_backbone",
    "swin_block_forward",
    "shifted_window_mask",
    "timm_backbone_state_dict",
]


def _check_pixel_values(pixel_values: torch.Tensor, in_chans: int) -> None:
    if not isinstance(pixel_values, torch.Tensor) or pixel_values.dim() != 4 or pixel_values.shape[1] != in_chans:
        got = tuple(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) else type(pixel_values).__name__
        raise ValueError(f"expected pixel_values (B, {in_chans}, H, W), got {got}")
    if not pixel_values.is_floating_point():
        raise TypeError(f"expected floating-point pixel_values, got {pixel_values.dtype}")
    if pixel_values.numel() == 0:
        raise ValueError(f"expected non-empty pixel_values, got {tuple(pixel_values.shape)}")


def shifted_window_mask(
    height: int, width: int, window: int, shift: int, *, device: torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Additive attention mask (num_windows, window**2, window**2) for shifted windows on a padded map.

    ``height`` and ``width`` are the padded sizes (multiples of ``window``). After a roll by ``-shift``
    the last ``window`` rows/columns hold pixels from up to three regions per axis; tokens may only
    attend within their own region: 0 inside, -100 across (the published value, not -inf).
    """
    if height % window or width % window or not 0 < shift < window:
        raise ValueError(f"expected padded sizes that are multiples of window={window} and 0 < shift < window, "
                         f"got height={height}, width={width}, shift={shift}")

    def regions(n: int) -> torch.Tensor:  # (n,) region id 0/1/2 along one axis of the rolled map
        ids = torch.zeros(n, dtype=torch.long, device=device)
        ids[n - window:] = 1
        ids[n - shift:] = 2
        return ids

    label = regions(height)[:, None] * 3 + regions(width)[None, :]  # (H, W)
    label = label.view(height // window, window, width // window, window).transpose(1, 2)
    label = label.reshape(-1, window * window)  # (num_windows, N), window order of window_partition
    mask = torch.zeros(label.shape[0], window * window, window * window, dtype=dtype, device=device)
    return mask.masked_fill(label[:, :, None] != label[:, None, :], -100.0)


def swin_block_forward(
    block: SwinTransformerBlock, x: torch.Tensor, shift_mask: torch.Tensor | None
) -> torch.Tensor:
    """One Swin block with the published padding order, using ``block``'s timm submodules.

    x: (B, H, W, C). After ``norm1`` the map is zero-padded right/bottom to window multiples, then
    rolled (shifted blocks), partitioned and attended; the window is never clamped to the map size.
    shift_mask: ``shifted_window_mask`` of the padded size, required iff the block is shifted.
    """
    batch, height, width, channels = x.shape
    window, shift = block.window_size[0], block.shift_size[0]
    pad_h, pad_w = (-height) % window, (-width) % window

    y = F.pad(block.norm1(x), (0, 0, 0, pad_w, 0, pad_h))
    if shift:
        if shift_mask is None:
            raise ValueError("a shifted block needs shift_mask (see shifted_window_mask)")
        y = torch.roll(y, shifts=(-shift, -shift), dims=(1, 2))
    windows = window_partition(y, (window, window)).view(-1, window * window, channels)
    windows = block.attn(windows, mask=shift_mask if shift else None)
    y = window_reverse(windows.view(-1, window, window, channels), (window, window), height + pad_h, width + pad_w)
    if shift:
        y = torch.roll(y, shifts=(shift, shift), dims=(1, 2))
    x = x + block.drop_path1(y[:, :height, :width])
    return x + block.drop_path2(block.mlp(block.norm2(x)))


class SwinBackbone(nn.Module):
    """Swin Transformer returning the pre-downsampling output of every stage, each with its own LayerNorm.

    Parameter names follow timm (``patch_embed.*``, ``layers.{i}.downsample.*`` at the START of stage
    i >= 1, ``layers.{i}.blocks.{j}.attn.qkv`` ...) plus ``norms.{i}`` for the per-stage output norms;
    there is no final norm and no head. Outputs: (B, embed_dim * 2**i, ceil(H / 2**(i+2)), ...).
    """

    def __init__(
        self,
        *,
        embed_dim: int,
        depths: Sequence[int],
        num_heads: Sequence[int],
        window_size: int = 7,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        in_chans: int = 3,
        fused_attn: bool = True,
    ) -> None:
        super().__init__()
        depths, num_heads = tuple(depths), tuple(num_heads)
        if not depths or len(depths) != len(num_heads) or min(depths) < 1 or min(num_heads) < 1:
            raise ValueError(f"expected equally long positive depths and num_heads, got {depths} and {num_heads}")
        dims = tuple(embed_dim * 2**i for i in range(len(depths)))
        if embed_dim < 1 or any(d % h for d, h in zip(dims, num_heads)):
            raise ValueError(f"stage widths {dims} must be divisible by num_heads {num_heads}")
        if window_size < 2:
            raise ValueError(f"expected window_size >= 2, got {window_size}")
        self.in_chans = in_chans
        self.window_size = window_size
        self.channels = dims
        self.strides = tuple(4 * 2**i for i in range(len(depths)))
        self.grad_checkpointing = False

        self.patch_embed = PatchEmbed(
            img_size=None, patch_size=4, in_chans=in_chans, embed_dim=embed_dim, norm_layer=nn.LayerNorm,
            output_fmt="NHWC", strict_img_size=False, dynamic_img_pad=True,
        )
        # stochastic depth grows linearly over all blocks (torch.linspace's values, computed in Python so that
        # the model can be built on the meta device)
        n = sum(depths)
        flat = [drop_path_rate * i / (n - 1) if n > 1 else 0.0 for i in range(n)]
        rates = [flat[sum(depths[:i]): sum(depths[: i + 1])] for i in range(len(depths))]
        # always_partition and dynamic_mask make timm's blocks keep the full window and shift and build no
        # size-specific mask buffer, so input_resolution is never used; the forward below drives them.
        self.layers = nn.Sequential(*[
            SwinTransformerStage(
                dim=dims[max(i - 1, 0)], out_dim=dims[i], input_resolution=(window_size, window_size),
                depth=depths[i], downsample=i > 0, num_heads=num_heads[i], window_size=window_size,
                always_partition=True, dynamic_mask=True, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                proj_drop=proj_drop_rate, attn_drop=attn_drop_rate, drop_path=rates[i],
                norm_layer=nn.LayerNorm,
            )
            for i in range(len(depths))
        ])
        self.norms = nn.ModuleList([nn.LayerNorm(d, eps=1e-5) for d in dims])
        for module in self.layers.modules():
            if isinstance(module, SwinTransformerBlock):
                module.attn.fused_attn = fused_attn  # timm's scaled_dot_product_attention path
            elif isinstance(module, nn.Linear):  # the original Swin initialisation
                trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in backward (saves activation memory when training at large sizes)."""
        self.grad_checkpointing = enable

    def forward(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """pixel_values (B, C_in, H, W) -> [(B, C_i, H_i, W_i)] at strides 4, 8, 16, 32."""
        _check_pixel_values(pixel_values, self.in_chans)
        x = self.patch_embed(pixel_values)  # (B, ceil(H/4), ceil(W/4), C), right/bottom zero padding
        features = []
        for stage, norm in zip(self.layers, self.norms):
            x = stage.downsample(x)  # identity in stage 0; odd sizes are zero-padded by PatchMerging
            height, width = x.shape[1:3]
            shift_mask = None
            for block in stage.blocks:
                if block.shift_size[0] and shift_mask is None:
                    w = block.window_size[0]
                    shift_mask = shifted_window_mask(
                        math.ceil(height / w) * w, math.ceil(width / w) * w, w, block.shift_size[0],
                        device=x.device, dtype=x.dtype,
                    )
                if self.grad_checkpointing and torch.is_grad_enabled():
                    x = checkpoint(swin_block_forward, block, x, shift_mask, use_reentrant=False)
                else:
                    x = swin_block_forward(block, x, shift_mask)
            features.append(norm(x).permute(0, 3, 1, 2).contiguous())  # (B, C_i, H_i, W_i)
        return features


def swin_backbone(
    *, embed_dim: int, depths: Sequence[int], num_heads: Sequence[int], window_size: int, **kwargs: Any
) -> SwinBackbone:
    """Any Swin; ``kwargs`` are the remaining ``SwinBackbone`` options (drop_path_rate, mlp_ratio, ...)."""
    return SwinBackbone(embed_dim=embed_dim, depths=depths, num_heads=num_heads, window_size=window_size, **kwargs)


def swin_tiny(*, window_size: int = 7, **kwargs: Any) -> SwinBackbone:
    """Swin-T: 96 channels, depths (2, 2, 6, 2). Mask2Former trains with drop_path_rate=0.3."""
    return swin_backbone(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), window_size=window_size, **kwargs)


def swin_small(*, window_size: int = 7, **kwargs: Any) -> SwinBackbone:
    """Swin-S: 96 channels, depths (2, 2, 18, 2)."""
    return swin_backbone(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24), window_size=window_size,
                         **kwargs)


def swin_base(*, window_size: int = 12, **kwargs: Any) -> SwinBackbone:
    """Swin-B: 128 channels, depths (2, 2, 18, 2); the Mask2Former checkpoints use the 384px window-12 model."""
    return swin_backbone(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), window_size=window_size,
                         **kwargs)


def swin_large(*, window_size: int = 12, **kwargs: Any) -> SwinBackbone:
    """Swin-L: 192 channels, depths (2, 2, 18, 2), window 12."""
    return swin_backbone(embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48), window_size=window_size,
                         **kwargs)


class ResNetBackbone(nn.Module):
    """Bottleneck ResNet (v1.5: stride in the 3x3 conv, as torchvision and detectron2 with
    STRIDE_IN_1X1=False) returning the outputs of layer1..layer4 at strides 4, 8, 16, 32.

    Parameter names follow timm (``conv1``, ``bn1``, ``layer{k}.{b}.conv{n}/bn{n}``,
    ``layer{k}.0.downsample.{0,1}``); no classifier. Batch norms are frozen by default, like
    detectron2's FrozenBN in the Mask2Former ResNet configs.
    """

    def __init__(self, *, layers: Sequence[int], in_chans: int = 3, frozen_bn: bool = True) -> None:
        super().__init__()
        layers = tuple(layers)
        if len(layers) != 4 or min(layers) < 1:
            raise ValueError(f"expected four positive block counts, got layers={layers}")
        net = ResNet(block=Bottleneck, layers=layers, in_chans=in_chans, num_classes=0, global_pool="",
                     zero_init_last=False)
        if frozen_bn:
            net = freeze_batch_norm_2d(net)
        self.in_chans = in_chans
        self.conv1, self.bn1, self.act1, self.maxpool = net.conv1, net.bn1, net.act1, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        self.channels = (256, 512, 1024, 2048)
        self.strides = (4, 8, 16, 32)

    def forward(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """pixel_values (B, C_in, H, W) -> [(B, C_i, H_i, W_i)] at strides 4, 8, 16, 32."""
        _check_pixel_values(pixel_values, self.in_chans)
        x = self.maxpool(self.act1(self.bn1(self.conv1(pixel_values))))
        features = []
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = layer(x)
            features.append(x)
        return features


_RESNET_LAYERS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}


def resnet_backbone(depth: int = 50, *, in_chans: int = 3, frozen_bn: bool = True) -> ResNetBackbone:
    """ResNet-50 or ResNet-101 (timm ``resnet50`` / ``resnet101`` layout)."""
    if depth not in _RESNET_LAYERS:
        raise ValueError(f"unsupported ResNet depth={depth}; supported: {sorted(_RESNET_LAYERS)}")
    return ResNetBackbone(layers=_RESNET_LAYERS[depth], in_chans=in_chans, frozen_bn=frozen_bn)


def timm_backbone_state_dict(state_dict: Mapping[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """A timm ``swin_*`` / ``resnet*`` classifier state dict made loadable (strictly) into ``model``.

    Drops what a backbone lacks (``head.*``, ``fc.*``, Swin's final ``norm.*``) and, since ImageNet
    Swins have no per-stage output norms, takes ``norms.*`` from ``model`` itself (timm's
    ``checkpoint_filter_fn(state_dict, model)`` convention). Everything else must come from timm.
    """
    out = {k: v for k, v in state_dict.items() if not k.startswith(("head.", "fc.", "norm."))}
    for key, value in model.state_dict().items():
        if key.startswith("norms.") and key not in out:
            out[key] = value
    return out


def build_backbone(spec: Mapping[str, Any]) -> nn.Module:
    """Backbone from a spec ``{"name": "swin" | "resnet" | "convnext" | "dinat", **kwargs of swin_backbone /
    resnet_backbone / convnext_backbone / dinat_backbone}``."""
    kwargs = dict(spec)
    name = kwargs.pop("name", None)
    if name == "swin":
        return swin_backbone(**kwargs)
    if name == "resnet":
        return resnet_backbone(**kwargs)
    if name == "convnext":
        from .convnext import convnext_backbone  # its own module (it imports this one)

        return convnext_backbone(**kwargs)
    if name == "dinat":
        from .dinat import dinat_backbone  # neighborhood attention, its own op

        return dinat_backbone(**kwargs)
    raise ValueError(
        f"unknown backbone name {name!r} in spec {dict(spec)}; expected 'swin', 'resnet', 'convnext' or 'dinat'"
    )
