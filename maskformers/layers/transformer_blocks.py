"""Residual transformer blocks of the Mask2Former decoder: cross-attention, self-attention, FFN.

Each block is ``norm(x + f(x))`` (post-norm, the published models) or ``x + f(norm(x))`` (pre-norm).
Positional embeddings are added to queries and keys, never to values (DETR convention).
Layouts are batch-first: queries (B, Q, C), memory (B, S, C).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .attention import MultiHeadAttention

__all__ = ["CrossAttentionBlock", "SelfAttentionBlock", "FeedForwardBlock"]


def _add(x: torch.Tensor, pos: torch.Tensor | None) -> torch.Tensor:
    return x if pos is None else x + pos


class CrossAttentionBlock(nn.Module):
    """Queries attend to a memory; the caller passes ``key`` (memory + its position embedding) and
    ``value`` (memory) so a memory shared by several layers is offset once, not once per layer."""

    def __init__(self, *, embed_dim: int, num_heads: int, dropout: float = 0.0, pre_norm: bool = False) -> None:
        super().__init__()
        self.attn = MultiHeadAttention(embed_dim=embed_dim, num_heads=num_heads, dropout=dropout)
        self.norm = nn.LayerNorm(embed_dim)
        self.dropout = nn.Dropout(dropout)
        self.pre_norm = pre_norm

    def forward(
        self,
        x: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        *,
        query_pos: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x (B, Q, C); key, value (B, S, C); query_pos broadcastable to x; attn_mask as in
        :class:`MultiHeadAttention` ((B, 1, Q, S) bool, True = attend). Returns (B, Q, C)."""
        if self.pre_norm:
            y = self.attn(_add(self.norm(x), query_pos), key, value, attn_mask)
            return x + self.dropout(y)
        y = self.attn(_add(x, query_pos), key, value, attn_mask)
        return self.norm(x + self.dropout(y))


class SelfAttentionBlock(nn.Module):
    """Queries attend to each other: q = k = x + query_pos, v = x."""

    def __init__(self, *, embed_dim: int, num_heads: int, dropout: float = 0.0, pre_norm: bool = False) -> None:
        super().__init__()
        self.attn = MultiHeadAttention(embed_dim=embed_dim, num_heads=num_heads, dropout=dropout)
        self.norm = nn.LayerNorm(embed_dim)
        self.dropout = nn.Dropout(dropout)
        self.pre_norm = pre_norm

    def forward(self, x: torch.Tensor, *, query_pos: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, Q, C); query_pos broadcastable to x. Returns (B, Q, C)."""
        h = self.norm(x) if self.pre_norm else x
        qk = _add(h, query_pos)
        y = self.dropout(self.attn(qk, qk, h))
        return x + y if self.pre_norm else self.norm(x + y)


class FeedForwardBlock(nn.Module):
    """Linear -> ReLU -> Linear with a residual connection and a LayerNorm."""

    def __init__(self, *, embed_dim: int, hidden_dim: int, dropout: float = 0.0, pre_norm: bool = False) -> None:
        super().__init__()
        self.linear1 = nn.Linear(embed_dim, hidden_dim)
        self.linear2 = nn.Linear(hidden_dim, embed_dim)
        self.norm = nn.LayerNorm(embed_dim)
        self.dropout = nn.Dropout(dropout)
        self.pre_norm = pre_norm
        for linear in (self.linear1, self.linear2):  # the original: Xavier weights, default biases
            nn.init.xavier_uniform_(linear.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., C) -> (..., C)."""
        h = self.norm(x) if self.pre_norm else x
        y = self.dropout(self.linear2(self.dropout(F.relu(self.linear1(h)))))
        return x + y if self.pre_norm else self.norm(x + y)
