"""Mask2Former's masked-attention transformer decoder with its prediction heads.

Initial queries (content + positional embedding, given by the model) are refined by ``num_layers`` layers,
each: masked cross-attention to one level of the pixel decoder's multi-scale features
(levels cycle coarsest first: 1/32, 1/16, 1/8, 1/32, ...) -> self-attention -> FFN. Before the first
layer and after every layer the heads predict class logits and mask logits; each mask, resized to the
next layer's level, restricts that layer's cross-attention to the query's predicted foreground.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import nn

from ..layers.position_encoding import SinePositionEmbedding
from ..layers.prediction_heads import MaskClassificationHead, masked_attention_mask
from ..layers.transformer_blocks import CrossAttentionBlock, FeedForwardBlock, SelfAttentionBlock

__all__ = ["DecoderOutput", "MaskedAttentionDecoderLayer", "MultiScaleMaskedTransformerDecoder"]


class MaskedAttentionDecoderLayer(nn.Module):
    """Masked cross-attention -> self-attention -> FFN (post-norm unless ``pre_norm``)."""

    def __init__(
        self,
        *,
        embed_dim: int = 256,
        num_heads: int = 8,
        ffn_dim: int = 2048,
        dropout: float = 0.0,
        pre_norm: bool = False,
    ) -> None:
        super().__init__()
        attn = dict(embed_dim=embed_dim, num_heads=num_heads, dropout=dropout, pre_norm=pre_norm)
        self.cross_attn = CrossAttentionBlock(**attn)
        self.self_attn = SelfAttentionBlock(**attn)
        self.ffn = FeedForwardBlock(embed_dim=embed_dim, hidden_dim=ffn_dim, dropout=dropout, pre_norm=pre_norm)

    def forward(
        self,
        x: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        *,
        query_pos: torch.Tensor,
        attn_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """x (B, Q, C); key = memory + pos, value = memory (B, S, C); query_pos (1 or B, Q, C);
        attn_mask (B, 1, Q, S) bool, True = attend. Returns (B, Q, C)."""
        x = self.cross_attn(x, key, value, query_pos=query_pos, attn_mask=attn_mask)
        x = self.self_attn(x, query_pos=query_pos)
        return self.ffn(x)


class DecoderOutput(NamedTuple):
    """predictions: ``num_layers + 1`` (class logits (B, Q, K+1), mask logits (B, Q, H, W)), the first
    from the initial queries; hidden_states (B, Q, C): the last layer's output (before the head's norm)."""

    predictions: list[tuple[torch.Tensor, torch.Tensor]]
    hidden_states: torch.Tensor


class MultiScaleMaskedTransformerDecoder(nn.Module):
    """Masked-attention decoder + heads. The initial queries come from the caller: Mask2Former passes
    learned embeddings, OneFormer the output of its task-conditioned query transformer.

    Parameters: ``level_embed`` (Embedding L x C), ``input_projs.{l}`` (1x1 Conv2d when in_channels !=
    hidden_dim or enforce_input_projection, else Identity), ``layers.{i}``
    (:class:`MaskedAttentionDecoderLayer`), ``head`` (:class:`MaskClassificationHead`, whose ``norm``
    may be passed in as ``head_norm``).
    """

    def __init__(
        self,
        *,
        in_channels: int = 256,
        hidden_dim: int = 256,
        num_classes: int,
        num_heads: int = 8,
        num_layers: int = 9,
        ffn_dim: int = 2048,
        mask_dim: int = 256,
        num_levels: int = 3,
        pre_norm: bool = False,
        enforce_input_projection: bool = False,
        dropout: float = 0.0,
        head_norm: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if hidden_dim % 2:
            raise ValueError(f"hidden_dim must be even (sine position embedding), got {hidden_dim}")
        if num_levels < 1:
            raise ValueError(f"num_levels must be >= 1, got {num_levels}")
        self.hidden_dim = hidden_dim
        self.num_levels = num_levels
        self.num_heads = num_heads
        self.position_embedding = SinePositionEmbedding(num_pos_feats=hidden_dim // 2, normalize=True)
        self.level_embed = nn.Embedding(num_levels, hidden_dim)
        project = in_channels != hidden_dim or enforce_input_projection
        self.input_projs = nn.ModuleList(
            nn.Conv2d(in_channels, hidden_dim, 1) if project else nn.Identity() for _ in range(num_levels)
        )
        for proj in self.input_projs:
            if isinstance(proj, nn.Conv2d):  # the original's c2_xavier_fill: Kaiming-uniform (a=1), zero bias
                nn.init.kaiming_uniform_(proj.weight, a=1)
                nn.init.zeros_(proj.bias)
        self.layers = nn.ModuleList(
            MaskedAttentionDecoderLayer(
                embed_dim=hidden_dim, num_heads=num_heads, ffn_dim=ffn_dim, dropout=dropout, pre_norm=pre_norm
            )
            for _ in range(num_layers)
        )
        self.head = MaskClassificationHead(
            hidden_dim=hidden_dim, num_classes=num_classes, mask_dim=mask_dim, norm=head_norm
        )

    def memory(
        self, multi_scale_features: Sequence[torch.Tensor]
    ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[tuple[int, int]]]:
        """Keys (memory + position), values (memory) as (B, h*w, C), and (h, w) of every level."""
        if len(multi_scale_features) != self.num_levels:
            raise ValueError(
                f"expected {self.num_levels} multi-scale features (coarsest first), got {len(multi_scale_features)}"
            )
        B = multi_scale_features[0].shape[0]
        keys, values, sizes = [], [], []
        for lvl, x in enumerate(multi_scale_features):
            if x.dim() != 4 or x.shape[0] != B:
                raise ValueError(f"expected multi_scale_features[{lvl}] (B={B}, C, h, w), got {tuple(x.shape)}")
            h, w = x.shape[-2:]
            pos = self.position_embedding(h, w, dtype=x.dtype, device=x.device).view(h * w, self.hidden_dim)
            # (B, C, h, w) -> (B, h*w, C); a view when x is channels-last strided (pixel decoder output)
            src = self.input_projs[lvl](x).flatten(2).transpose(1, 2) + self.level_embed.weight[lvl]
            keys.append(src + pos)
            values.append(src)
            sizes.append((h, w))
        return keys, values, sizes

    def forward(
        self,
        multi_scale_features: Sequence[torch.Tensor],
        mask_features: torch.Tensor,
        queries: torch.Tensor,
        query_pos: torch.Tensor,
    ) -> DecoderOutput:
        """multi_scale_features: ``num_levels`` maps (B, C_in, h_l, w_l), coarsest first; mask_features
        (B, mask_dim, H, W); queries (B, Q, C) initial content; query_pos (B or 1, Q, C) positional
        embedding added to queries at every attention. Returns :class:`DecoderOutput`."""
        B = mask_features.shape[0]
        if queries.dim() != 3 or queries.shape[0] != B or queries.shape[-1] != self.hidden_dim:
            raise ValueError(f"expected queries (B={B}, Q, {self.hidden_dim}), got {tuple(queries.shape)}")
        Q = queries.shape[1]
        if query_pos.dim() != 3 or query_pos.shape[0] not in (1, B) or tuple(query_pos.shape[1:]) != (Q, self.hidden_dim):
            raise ValueError(
                f"expected query_pos (B={B} or 1, Q={Q}, {self.hidden_dim}), got {tuple(query_pos.shape)}"
            )
        keys, values, sizes = self.memory(multi_scale_features)
        x = queries
        class_logits, mask_logits = self.head(x, mask_features)
        predictions = [(class_logits, mask_logits)]
        for i, layer in enumerate(self.layers):
            lvl = i % self.num_levels
            attn_mask = masked_attention_mask(mask_logits, sizes[lvl])
            x = layer(x, keys[lvl], values[lvl], query_pos=query_pos, attn_mask=attn_mask)
            class_logits, mask_logits = self.head(x, mask_features)
            predictions.append((class_logits, mask_logits))
        return DecoderOutput(predictions, x)
