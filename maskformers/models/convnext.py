"""ConvNeXt backbone over timm's ConvNeXt stages: the ``D2ConvNeXt`` of the original OneFormer ConvNeXt-L/XL
models.

What the original computes, and this module does: a 4x4 stride-4 stem convolution and a channels-first
LayerNorm; four stages, each (but the first) opened by a channels-first LayerNorm and a 2x2 stride-2
convolution, then ConvNeXt blocks (7x7 depthwise conv -> LayerNorm -> Linear 4C -> GELU -> Linear C ->
layer scale ``gamma`` -> stochastic depth -> residual); every stage's output goes through its own
channels-first LayerNorm (``norm{i}`` in the original, ``norms.{i}`` here) and is returned. All LayerNorms
use eps 1e-6; drop-path rates grow linearly from 0 over all blocks.

Sizes: the original model only sees images padded to multiples of 32, where its stride convolutions tile
the map exactly. Any other size is accepted here by zero-padding right/bottom before each stride
convolution (the stem to a multiple of 4, a downsampling to an even size), so stage i is
ceil(H / 2**(i+2)) high, as with :class:`~maskformers.models.backbone.SwinBackbone`; on multiples of 32
nothing is padded and the result is the original's.

Parameter names follow timm (``stem.{0,1}``, ``stages.{i}.downsample.{0,1}``, ``stages.{i}.blocks.{j}.{conv_dw,
norm, mlp.fc1, mlp.fc2, gamma}``) plus ``norms.{i}``, so timm's ImageNet ConvNeXt weights load with
:func:`~maskformers.models.backbone.timm_backbone_state_dict`.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch
import torch.nn.functional as F
from timm.layers import LayerNorm, LayerNorm2d, trunc_normal_
from timm.models.convnext import ConvNeXtStage
from torch import nn
from torch.utils.checkpoint import checkpoint

from .backbone import _check_pixel_values

__all__ = ["ConvNeXtBackbone", "convnext_backbone", "CONVNEXT_SIZES"]

# depths and widths of the published variants (OneFormer uses large and xlarge, ImageNet-22k pretrained)
CONVNEXT_SIZES: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "tiny": ((3, 3, 9, 3), (96, 192, 384, 768)),
    "small": ((3, 3, 27, 3), (96, 192, 384, 768)),
    "base": ((3, 3, 27, 3), (128, 256, 512, 1024)),
    "large": ((3, 3, 27, 3), (192, 384, 768, 1536)),
    "xlarge": ((3, 3, 27, 3), (256, 512, 1024, 2048)),
}


def _pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Zero-pad (B, C, H, W) right/bottom to multiples of ``multiple`` (no copy when already there)."""
    pad_h, pad_w = (-x.shape[-2]) % multiple, (-x.shape[-1]) % multiple
    return F.pad(x, (0, pad_w, 0, pad_h)) if pad_h or pad_w else x


class ConvNeXtBackbone(nn.Module):
    """ConvNeXt returning every stage's output, each through its own channels-first LayerNorm.

    depths, dims: blocks and channels per stage (four stages in the published models, any number >= 1
    here; strides 4, 8, 16, ...). layer_scale_init_value: initial ``gamma`` (OneFormer's LSIT, 1.0); None
    or <= 0 builds the blocks without layer scale. Outputs: (B, dims[i], ceil(H / 2**(i+2)), ...).
    """

    def __init__(
        self,
        *,
        depths: Sequence[int],
        dims: Sequence[int],
        kernel_size: int = 7,
        layer_scale_init_value: float | None = 1.0,
        drop_path_rate: float = 0.0,
        in_chans: int = 3,
    ) -> None:
        super().__init__()
        depths, dims = tuple(depths), tuple(dims)
        if not depths or len(depths) != len(dims) or min(depths) < 1 or min(dims) < 1:
            raise ValueError(f"expected equally long positive depths and dims, got depths={depths}, dims={dims}")
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"expected an odd kernel_size >= 1 (same-size depthwise conv), got {kernel_size}")
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"expected 0 <= drop_path_rate < 1, got {drop_path_rate}")
        ls = layer_scale_init_value if layer_scale_init_value is not None and layer_scale_init_value > 0 else None
        self.in_chans = in_chans
        self.channels = dims
        self.strides = tuple(4 * 2**i for i in range(len(depths)))
        self.grad_checkpointing = False

        norm2d = partial(LayerNorm2d, eps=1e-6)  # channels-first LayerNorm of (B, C, H, W)
        self.stem = nn.Sequential(nn.Conv2d(in_chans, dims[0], kernel_size=4, stride=4), norm2d(dims[0]))
        n = sum(depths)  # linearly growing stochastic depth, as torch.linspace(0, rate, n) (Python: meta-safe)
        flat = [drop_path_rate * i / (n - 1) if n > 1 else 0.0 for i in range(n)]
        self.stages = nn.Sequential(*[
            ConvNeXtStage(
                in_chs=dims[max(i - 1, 0)], out_chs=dims[i], kernel_size=kernel_size, stride=2 if i else 1,
                depth=depths[i], drop_path_rates=flat[sum(depths[:i]): sum(depths[: i + 1])], ls_init_value=ls,
                norm_layer=norm2d, norm_layer_cl=partial(LayerNorm, eps=1e-6),
            )
            for i in range(len(depths))
        ])
        self.norms = nn.ModuleList(norm2d(d) for d in dims)
        for module in self.modules():  # the ConvNeXt initialisation (the checkpoints replace it)
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in backward (saves activation memory when training at large sizes)."""
        self.grad_checkpointing = enable

    def forward(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """pixel_values (B, C_in, H, W) -> [(B, dims[i], H_i, W_i)] at strides 4, 8, 16, 32."""
        _check_pixel_values(pixel_values, self.in_chans)
        x = self.stem(_pad_to_multiple(pixel_values, 4))
        features = []
        for i, (stage, norm) in enumerate(zip(self.stages, self.norms)):
            if i:  # LayerNorm, then the 2x2 stride-2 conv over a map padded to even sizes
                x = stage.downsample[1](_pad_to_multiple(stage.downsample[0](x), 2))
            for block in stage.blocks:
                if self.grad_checkpointing and torch.is_grad_enabled():
                    x = checkpoint(block, x, use_reentrant=False)
                else:
                    x = block(x)
            features.append(norm(x))
        return features


def convnext_backbone(
    size: str | None = None, *, depths: Sequence[int] | None = None, dims: Sequence[int] | None = None, **kwargs
) -> ConvNeXtBackbone:
    """A ConvNeXt by size name ("tiny" ... "xlarge", see ``CONVNEXT_SIZES``) or by ``depths`` and ``dims``;
    ``kwargs`` are the remaining ``ConvNeXtBackbone`` options (drop_path_rate, layer_scale_init_value, ...)."""
    if size is not None:
        if size not in CONVNEXT_SIZES:
            raise ValueError(f"unknown ConvNeXt size {size!r}; expected one of {list(CONVNEXT_SIZES)}")
        if depths is not None or dims is not None:
            raise ValueError(f"give either size={size!r} or depths and dims, not both")
        depths, dims = CONVNEXT_SIZES[size]
    if depths is None or dims is None:
        raise ValueError(f"give size or both depths and dims, got depths={depths}, dims={dims}")
    return ConvNeXtBackbone(depths=depths, dims=dims, **kwargs)
