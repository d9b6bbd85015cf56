"""Mask2Former's pixel decoder: a deformable-attention encoder over the coarsest backbone levels plus
an FPN up to the mask resolution.

Works with any backbone that reports its feature channels and strides (features ordered by
increasing stride): the ``num_levels`` coarsest maps (1/32, 1/16, 1/8 for a 4-level pyramid) are
projected to ``conv_dim`` (1x1 conv + GroupNorm), get a sine position embedding plus a learned level
embedding, and go through the deformable encoder; finer maps down to ``common_stride`` are merged
FPN-style (lateral 1x1 conv + bilinear upsampling of the coarser output, then 3x3 conv); a 1x1 conv
of the finest output gives the mask features.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..layers.deformable_encoder import DeformableEncoder
from ..layers.position_encoding import SinePositionEmbedding

__all__ = ["MSDeformAttnPixelDecoder", "PixelDecoderOutput"]

_GN_GROUPS = 32


class PixelDecoderOutput(NamedTuple):
    """mask_features (B, mask_dim, H/common_stride, W/common_stride); multi_scale_features: the
    ``num_levels`` encoder outputs (B, conv_dim, h, w), coarsest first (1/32, 1/16, 1/8). These are
    views of the encoder's (B, S, C) output, i.e. channels-last strided; ``x.flatten(2).transpose(1, 2)``
    gives back the (B, h*w, C) sequence without a copy."""

    mask_features: torch.Tensor
    multi_scale_features: list[torch.Tensor]


def _conv_gn(in_ch: int, out_ch: int, kernel_size: int, *, bias: bool, relu: bool = False) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(in_ch, out_ch, kernel_size, padding=kernel_size // 2, bias=bias),
        nn.GroupNorm(_GN_GROUPS, out_ch),
    ]
    if relu:
        layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class MSDeformAttnPixelDecoder(nn.Module):
    """Pixel decoder of Mask2Former.

    in_channels / in_strides: the backbone's features, ordered by increasing stride (e.g. Swin-T:
    (96, 192, 384, 768) / (4, 8, 16, 32)). The last ``num_levels`` go through the deformable encoder;
    earlier ones with stride >= ``common_stride`` go through the FPN.

    Parameters: ``input_projs.{l}`` (l = 0 is the coarsest level), ``level_embed`` (L, C),
    ``encoder``, ``lateral_convs.{i}`` / ``output_convs.{i}`` for backbone feature i, ``mask_features``.
    """

    def __init__(
        self,
        *,
        in_channels: Sequence[int],
        in_strides: Sequence[int],
        conv_dim: int = 256,
        mask_dim: int = 256,
        num_heads: int = 8,
        num_layers: int = 6,
        ffn_dim: int = 1024,
        num_points: int = 4,
        num_levels: int = 3,
        common_stride: int = 4,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        in_channels, in_strides = [int(c) for c in in_channels], [int(s) for s in in_strides]
        if len(in_channels) != len(in_strides):
            raise ValueError(
                f"in_channels and in_strides must have one entry per feature, got {in_channels} and {in_strides}"
            )
        if any(b <= a for a, b in zip(in_strides, in_strides[1:])):
            raise ValueError(
                f"in_strides must be strictly increasing (features ordered fine to coarse), got {in_strides}"
            )
        if not 1 <= num_levels <= len(in_channels):
            raise ValueError(
                f"num_levels must be in [1, {len(in_channels)}] for {len(in_channels)} features, got {num_levels}"
            )
        if conv_dim % _GN_GROUPS or conv_dim % 2:
            raise ValueError(f"conv_dim must be a multiple of {_GN_GROUPS} (GroupNorm groups), got {conv_dim}")
        self.in_channels = in_channels
        self.in_strides = in_strides
        self.conv_dim = conv_dim
        self.mask_dim = mask_dim
        self.num_levels = num_levels
        self.common_stride = common_stride

        first_level = len(in_channels) - num_levels
        # level l of the encoder is backbone feature first_level + num_levels - 1 - l (coarsest first)
        self.input_projs = nn.ModuleList(
            _conv_gn(in_channels[i], conv_dim, 1, bias=True) for i in reversed(range(first_level, len(in_channels)))
        )
        self.level_embed = nn.Parameter(torch.empty(num_levels, conv_dim))
        nn.init.normal_(self.level_embed)
        self.position_embedding = SinePositionEmbedding(num_pos_feats=conv_dim // 2, normalize=True)
        self.encoder = DeformableEncoder(
            num_layers=num_layers,
            embed_dim=conv_dim,
            num_heads=num_heads,
            num_levels=num_levels,
            num_points=num_points,
            ffn_dim=ffn_dim,
            dropout=dropout,
        )
        self.fpn_indices = [i for i in range(first_level) if in_strides[i] >= common_stride]
        self.lateral_convs = nn.ModuleList(_conv_gn(in_channels[i], conv_dim, 1, bias=False) for i in self.fpn_indices)
        self.output_convs = nn.ModuleList(
            _conv_gn(conv_dim, conv_dim, 3, bias=False, relu=True) for _ in self.fpn_indices
        )
        self.mask_features = nn.Conv2d(conv_dim, mask_dim, 1)
        finest = self.fpn_indices[0] if self.fpn_indices else first_level
        self.mask_stride = in_strides[finest]
        self.level_strides = in_strides[first_level:][::-1]
        self._init_weights()

    def _init_weights(self) -> None:
        """The original initialisation: Xavier-uniform input projections with zero bias; c2-Xavier
        (Kaiming-uniform a=1, zero bias) for the FPN and mask-feature convolutions; N(0, 1) level embedding."""
        for proj in self.input_projs:
            nn.init.xavier_uniform_(proj[0].weight, gain=1)
            nn.init.zeros_(proj[0].bias)
        for conv in [c[0] for c in (*self.lateral_convs, *self.output_convs)] + [self.mask_features]:
            nn.init.kaiming_uniform_(conv.weight, a=1)
            if conv.bias is not None:
                nn.init.zeros_(conv.bias)

    def _check(self, features: Sequence[torch.Tensor]) -> None:
        if len(features) != len(self.in_channels):
            raise ValueError(
                f"expected {len(self.in_channels)} features with strides {self.in_strides}, got {len(features)}"
            )
        for i, (f, c) in enumerate(zip(features, self.in_channels)):
            if f.dim() != 4 or f.shape[1] != c:
                raise ValueError(
                    f"expected features[{i}] (B, {c}, H, W) at stride {self.in_strides[i]}, got {tuple(f.shape)}"
                )

    def forward(self, features: Sequence[torch.Tensor]) -> PixelDecoderOutput:
        """features: backbone maps (B, C_i, H_i, W_i) ordered by increasing stride."""
        self._check(features)
        B = features[0].shape[0]
        levels = list(features[len(features) - self.num_levels :])[::-1]  # coarsest first
        shapes = [(x.shape[-2], x.shape[-1]) for x in levels]

        srcs, poss = [], []
        for lvl, (x, (h, w)) in enumerate(zip(levels, shapes)):
            srcs.append(self.input_projs[lvl](x).flatten(2).transpose(1, 2))  # (B, h*w, C)
            pos = self.position_embedding(h, w, dtype=x.dtype, device=x.device).view(h * w, self.conv_dim)
            poss.append(pos + self.level_embed[lvl])
        src = torch.cat(srcs, dim=1)  # (B, S, C)
        pos = torch.cat(poss, dim=0)[None]  # (1, S, C)
        memory = self.encoder(src, pos, shapes)  # (B, S, C)
        outs = [
            m.view(B, h, w, self.conv_dim).permute(0, 3, 1, 2)  # (B, C, h, w), channels-last strides
            for m, (h, w) in zip(memory.split([h * w for h, w in shapes], dim=1), shapes)
        ]

        # The FPN runs channels-last: the encoder maps already are, and mixing layouts in the sum would
        # take a slow strided path (mkldnn convolutions accept either).
        y = outs[-1]
        for j in reversed(range(len(self.fpn_indices))):
            x = features[self.fpn_indices[j]].contiguous(memory_format=torch.channels_last)
            lateral = self.lateral_convs[j](x)
            y = lateral + F.interpolate(y, size=lateral.shape[-2:], mode="bilinear", align_corners=False)
            y = self.output_convs[j](y)
        return PixelDecoderOutput(self.mask_features(y), outs)

    def extra_repr(self) -> str:
        return (
            f"in_channels={self.in_channels}, in_strides={self.in_strides}, conv_dim={self.conv_dim}, "
            f"mask_dim={self.mask_dim}, level_strides={self.level_strides}, mask_stride={self.mask_stride}"
        )

