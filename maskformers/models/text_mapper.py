"""OneFormer's text mapper (training only): class prompts -> text queries for the query-text
contrastive loss.

Each image comes with ``num_text`` tokenized prompts ("a photo with a car", ..., padded with the task's
generic prompt); a CLIP-style :class:`~maskformers.layers.TextEncoder` embeds each, an MLP projects it to
the decoder width, and ``n_ctx`` learned prompt-context vectors are appended, so that there is one text
query per decoder query: num_text + n_ctx = num_queries.
"""

from __future__ import annotations

import torch
from torch import nn

from ..layers.mlp import MLP
from ..layers.text_encoder import TextEncoder

__all__ = ["TextMapper"]


class TextMapper(nn.Module):
    """Parameters: ``text_encoder`` (:class:`TextEncoder`), ``projector`` (MLP width -> C -> ... -> C),
    ``prompt_ctx`` (Embedding n_ctx x width, absent when n_ctx = 0)."""

    def __init__(
        self,
        *,
        hidden_dim: int = 256,
        width: int = 256,
        context_length: int = 77,
        num_layers: int = 6,
        num_heads: int = 4,
        vocab_size: int = 49408,
        proj_layers: int = 2,
        n_ctx: int = 16,
        causal: bool = True,
    ) -> None:
        super().__init__()
        if n_ctx and width != hidden_dim:
            raise ValueError(
                f"prompt context vectors (width={width}) are appended to text queries of hidden_dim={hidden_dim}; "
                "they must be equal when n_ctx > 0"
            )
        self.text_encoder = TextEncoder(
            vocab_size=vocab_size, context_length=context_length, width=width, num_layers=num_layers,
            num_heads=num_heads, causal=causal,
        )
        self.projector = MLP(input_dim=width, hidden_dim=hidden_dim, output_dim=hidden_dim, num_layers=proj_layers)
        self.prompt_ctx = nn.Embedding(n_ctx, width) if n_ctx > 0 else None

    def forward(self, text_inputs: torch.Tensor) -> torch.Tensor:
        """text_inputs (B, T, L) token ids. Returns text queries (B, T + n_ctx, C)."""
        L = self.text_encoder.context_length
        if text_inputs.dim() != 3 or text_inputs.shape[-1] != L:
            raise ValueError(f"expected text_inputs (B, num_text, {L}), got {tuple(text_inputs.shape)}")
        if text_inputs.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"text_inputs must be integer token ids, got {text_inputs.dtype}")
        B, T, _ = text_inputs.shape
        queries = self.projector(self.text_encoder(text_inputs.reshape(B * T, L)))
        queries = queries.view(B, T, queries.shape[-1])  # (B, T, C)
        if self.prompt_ctx is not None:
            queries = torch.cat([queries, self.prompt_ctx.weight[None].expand(B, -1, -1).to(queries.dtype)], dim=1)
        return queries
