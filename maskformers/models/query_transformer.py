"""OneFormer's task-conditioned query transformer (the original's ``class_transformer``).

It turns the task token into ``num_queries - 1`` object queries before the masked-attention decoder runs:
every query starts as the (normalised) task token, and 2 DETR decoder layers (self-attention, then
cross-attention to the 1/4-resolution map, then an FFN) refine them, each query told apart by its learned
position embedding.

The cross-attention keeps the argument order of the original (and transformers): the memory (values) is
the sine position embedding of the 1/4 map, and the keys add to it the 1x1 projection of the mask
features. So the keys carry the image content and the values only positions (SHI-Labs/OneFormer#110);
the published weights were trained this way.
"""

from __future__ import annotations

import torch
from torch import nn

from ..layers.position_encoding import SinePositionEmbedding
from ..layers.transformer_blocks import CrossAttentionBlock, FeedForwardBlock, SelfAttentionBlock

__all__ = ["QueryTransformer", "QueryTransformerLayer"]


class QueryTransformerLayer(nn.Module):
    """DETR decoder layer: self-attention -> cross-attention -> FFN (post-norm unless ``pre_norm``)."""

    def __init__(
        self, *, embed_dim: int = 256, num_heads: int = 8, ffn_dim: int = 2048, dropout: float = 0.1,
        pre_norm: bool = False,
    ) -> None:
        super().__init__()
        attn = dict(embed_dim=embed_dim, num_heads=num_heads, dropout=dropout, pre_norm=pre_norm)
        self.self_attn = SelfAttentionBlock(**attn)
        self.cross_attn = CrossAttentionBlock(**attn)
        self.ffn = FeedForwardBlock(embed_dim=embed_dim, hidden_dim=ffn_dim, dropout=dropout, pre_norm=pre_norm)

    def forward(
        self, x: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, query_pos: torch.Tensor
    ) -> torch.Tensor:
        """x (B, Q, C); key, value (B, S, C); query_pos (1 or B, Q, C). Returns (B, Q, C)."""
        x = self.self_attn(x, query_pos=query_pos)
        x = self.cross_attn(x, key, value, query_pos=query_pos)
        return self.ffn(x)


class QueryTransformer(nn.Module):
    """Object queries from the task token and the mask features.

    Parameters: ``input_proj`` (1x1 Conv2d mask_dim -> C, the original's ``class_input_proj``),
    ``layers.{i}`` (:class:`QueryTransformerLayer`), ``norm`` (final LayerNorm).
    """

    def __init__(
        self,
        *,
        hidden_dim: int = 256,
        mask_dim: int = 256,
        num_heads: int = 8,
        num_layers: int = 2,
        ffn_dim: int = 2048,
        dropout: float = 0.1,
        pre_norm: bool = False,
    ) -> None:
        super().__init__()
        if hidden_dim < 2 or hidden_dim % 2:
            raise ValueError(f"hidden_dim must be even and >= 2 (sine position embedding), got {hidden_dim}")
        if mask_dim < 1 or ffn_dim < 1 or num_layers < 0:
            raise ValueError(f"expected mask_dim >= 1, ffn_dim >= 1 and num_layers >= 0, got mask_dim={mask_dim}, "
                             f"ffn_dim={ffn_dim}, num_layers={num_layers}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"expected 0 <= dropout < 1, got {dropout}")
        self.hidden_dim = hidden_dim
        self.mask_dim = mask_dim
        self.position_embedding = SinePositionEmbedding(num_pos_feats=hidden_dim // 2, normalize=True)
        self.input_proj = nn.Conv2d(mask_dim, hidden_dim, 1)
        self.layers = nn.ModuleList(
            QueryTransformerLayer(
                embed_dim=hidden_dim, num_heads=num_heads, ffn_dim=ffn_dim, dropout=dropout, pre_norm=pre_norm
            )
            for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(hidden_dim)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The original initialisation. Its ``Transformer`` Xavier-fills every matrix: the layers' own
        initialisation already does (attention over the packed (3C, C) q/k/v matrix, as
        ``nn.MultiheadAttention``; FFN matrices); the input projection is c2-Xavier (Kaiming-uniform a=1,
        zero bias)."""
        nn.init.kaiming_uniform_(self.input_proj.weight, a=1)
        nn.init.zeros_(self.input_proj.bias)

    def forward(
        self, mask_features: torch.Tensor, query_pos: torch.Tensor, task_query: torch.Tensor | None
    ) -> torch.Tensor:
        """mask_features (B, mask_dim, H, W); query_pos (Q, C) position embeddings of the object queries;
        task_query (B, 1, C) the (normalised) task token every query starts from, or None to start from
        zeros. Returns the object queries (B, Q, C)."""
        if mask_features.dim() != 4 or mask_features.shape[1] != self.mask_dim:
            raise ValueError(f"expected mask_features (B, {self.mask_dim}, H, W), got {tuple(mask_features.shape)}")
        B, _, H, W = mask_features.shape
        if query_pos.dim() != 2 or query_pos.shape[1] != self.hidden_dim:
            raise ValueError(f"expected query_pos (Q, {self.hidden_dim}), got {tuple(query_pos.shape)}")
        Q, C = query_pos.shape
        memory = self.position_embedding(H, W, dtype=mask_features.dtype, device=mask_features.device)
        memory = memory.view(1, H * W, C).expand(B, -1, -1)  # (B, HW, C): the values
        key = memory + self.input_proj(mask_features).flatten(2).transpose(1, 2)  # (B, HW, C)
        if task_query is None:
            x = mask_features.new_zeros(B, Q, C)
        else:
            if task_query.shape != (B, 1, C):
                raise ValueError(f"expected task_query (B={B}, 1, {C}), got {tuple(task_query.shape)}")
            x = task_query.expand(B, Q, C)
        for layer in self.layers:
            x = layer(x, key, memory, query_pos=query_pos[None])
        return self.norm(x)
