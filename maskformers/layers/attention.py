"""Multi-head attention on ``F.scaled_dot_product_attention``, batch-first, separate q/k/v projections.

Masks broadcast instead of being repeated per head: pass a boolean ``attn_mask`` of shape
(B, 1, Q, S) (True = may attend, the SDPA convention) or an additive float mask of the same shape,
and every head shares it without a (B*H, Q, S) copy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MultiHeadAttention"]


class MultiHeadAttention(nn.Module):
    """Scaled dot-product attention with ``num_heads`` heads.

    Parameters: ``q_proj``, ``k_proj``, ``v_proj``, ``out_proj`` (Linear C -> C, with bias). A packed
    ``nn.MultiheadAttention.in_proj_weight`` (3C, C) splits row-wise into q, k, v in that order.
    """

    def __init__(self, *, embed_dim: int, num_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(
                f"embed_dim must be divisible by num_heads, got embed_dim={embed_dim}, num_heads={num_heads}"
            )
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.dropout = dropout
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The original decoder's initialisation: Xavier-uniform over the packed (3C, C) q/k/v matrix (as
        ``nn.MultiheadAttention``) and over the output projection, zero biases."""
        packed = nn.init.xavier_uniform_(torch.empty(3 * self.embed_dim, self.embed_dim))
        for proj, w in zip((self.q_proj, self.k_proj, self.v_proj), packed.chunk(3)):
            proj.weight.copy_(w)
        nn.init.xavier_uniform_(self.out_proj.weight)
        for proj in (self.q_proj, self.k_proj, self.v_proj, self.out_proj):
            nn.init.zeros_(proj.bias)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        return x.view(B, N, self.num_heads, self.embed_dim // self.num_heads).transpose(1, 2)  # (B, H, N, D)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """query (B, Q, C), key and value (B, S, C); attn_mask broadcastable to (B, H, Q, S), bool
        (True = attend) or additive float. Returns (B, Q, C)."""
        if query.dim() != 3 or query.shape[-1] != self.embed_dim:
            raise ValueError(f"expected query (B, Q, {self.embed_dim}), got {tuple(query.shape)}")
        B, Q, C = query.shape
        if key.shape != value.shape or key.dim() != 3 or key.shape[0] != B or key.shape[-1] != C:
            raise ValueError(
                f"expected key and value (B={B}, S, {C}), got key {tuple(key.shape)} and value {tuple(value.shape)}"
            )
        q = self._heads(self.q_proj(query))
        k = self._heads(self.k_proj(key))
        v = self._heads(self.v_proj(value))
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0
        )  # (B, H, Q, D)
        return self.out_proj(out.transpose(1, 2).reshape(B, Q, C))

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, dropout={self.dropout}"
