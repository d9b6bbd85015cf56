"""A CLIP-style text transformer: token + learned position embeddings, pre-norm residual blocks
(attention, then a quick-GELU MLP of width 4C), a final LayerNorm, and the feature of the end-of-text
token as the sentence embedding.

OneFormer's text mapper uses it (width 256, 6 layers, 4 heads, 77 tokens, CLIP's 49,408-token vocabulary).
The original OneFormer attends causally (each token sees itself and the tokens before it), as CLIP
does; transformers' port builds that mask but never applies it, so its tokens attend both ways.
``causal=False`` reproduces transformers.
"""

from __future__ import annotations

import torch
from torch import nn

from .attention import MultiHeadAttention

__all__ = ["TextEncoder", "TextEncoderLayer", "check_token_range", "quick_gelu"]


def check_token_range(ids: torch.Tensor, high: int, what: str) -> None:
    """Raise unless every integer in ``ids`` is in [0, ``high``); ``what`` starts the message.

    On the CPU the values are read and a ``ValueError`` names the range found. Elsewhere (a GPU), and while
    compiling, reading them would make the host wait for the device: a device-side assertion checks them
    instead (a ``RuntimeError`` at the next synchronisation), which CUDA graphs can capture too.
    """
    if ids.numel() == 0:
        return
    if ids.device.type == "cpu" and not torch.compiler.is_compiling():
        low, top = int(ids.min()), int(ids.max())
        if low < 0 or top >= high:
            raise ValueError(f"{what}, got values in [{low}, {top}]")
    else:
        torch._assert_async(((ids >= 0) & (ids < high)).all(), what)


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """CLIP's GELU approximation ``x * sigmoid(1.702 x)``."""
    return x * torch.sigmoid(1.702 * x)


class TextEncoderLayer(nn.Module):
    """``x + attn(norm1(x))`` then ``x + fc2(quick_gelu(fc1(norm2(x))))``.

    Parameters: ``norm1``, ``attn`` (:class:`MultiHeadAttention`), ``norm2``, ``mlp.fc1`` (C -> 4C),
    ``mlp.fc2`` (4C -> C).
    """

    def __init__(self, *, width: int, num_heads: int, mlp_ratio: int = 4) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = MultiHeadAttention(embed_dim=width, num_heads=num_heads)
        self.norm2 = nn.LayerNorm(width)
        hidden = width * mlp_ratio
        self.mlp = nn.ModuleDict({"fc1": nn.Linear(width, hidden), "fc2": nn.Linear(hidden, width)})

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (N, L, C); attn_mask (L, L) bool, True = may attend, or None. Returns (N, L, C)."""
        h = self.norm1(x)
        x = x + self.attn(h, h, h, attn_mask)
        return x + self.mlp["fc2"](quick_gelu(self.mlp["fc1"](self.norm2(x))))


class TextEncoder(nn.Module):
    """Token ids (N, L) -> sentence embeddings (N, C), taken at each row's end-of-text token (the largest
    id in the row, as in CLIP's vocabulary).

    Parameters: ``token_embedding`` (vocab_size x C), ``positional_embedding`` (context_length x C),
    ``layers.{i}`` (:class:`TextEncoderLayer`), ``final_norm``.
    """

    def __init__(
        self,
        *,
        vocab_size: int = 49408,
        context_length: int = 77,
        width: int = 256,
        num_layers: int = 6,
        num_heads: int = 4,
        causal: bool = True,
    ) -> None:
        super().__init__()
        if min(vocab_size, context_length, width, num_heads) < 1 or num_layers < 0:
            raise ValueError(f"expected positive vocab_size, context_length, width, num_heads and num_layers >= 0, got "
                             f"vocab_size={vocab_size}, context_length={context_length}, width={width}, "
                             f"num_heads={num_heads}, num_layers={num_layers}")
        if width % num_heads:
            raise ValueError(f"width must be divisible by num_heads, got width={width}, num_heads={num_heads}")
        self.vocab_size = vocab_size
        self.context_length = context_length
        self.width = width
        self.causal = causal
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, width))
        self.layers = nn.ModuleList(TextEncoderLayer(width=width, num_heads=num_heads) for _ in range(num_layers))
        self.final_norm = nn.LayerNorm(width)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The original (CLIP) initialisation: normal token (std 0.02) and position (std 0.01) embeddings;
        attention q/k/v std C^-0.5, output projections std C^-0.5 (2 layers)^-0.5, MLP input std (2C)^-0.5."""
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        C, n = self.width, max(1, len(self.layers))
        proj_std = C**-0.5 * (2 * n) ** -0.5
        for layer in self.layers:
            for proj in (layer.attn.q_proj, layer.attn.k_proj, layer.attn.v_proj):
                nn.init.normal_(proj.weight, std=C**-0.5)
            nn.init.normal_(layer.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(layer.mlp["fc1"].weight, std=(2 * C) ** -0.5)
            nn.init.normal_(layer.mlp["fc2"].weight, std=proj_std)

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        """token_ids (N, L) int64 with L = context_length. Returns (N, C)."""
        if token_ids.dim() != 2 or token_ids.shape[1] != self.context_length:
            raise ValueError(f"expected token_ids (N, {self.context_length}), got {tuple(token_ids.shape)}")
        if token_ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"token_ids must be integer token ids, got {token_ids.dtype}")
        check_token_range(token_ids, self.vocab_size, f"token ids must be in [0, {self.vocab_size})")
        x = self.token_embedding(token_ids) + self.positional_embedding  # (N, L, C)
        mask = None
        if self.causal:
            L = self.context_length
            mask = torch.ones(L, L, dtype=torch.bool, device=x.device).tril_()  # True = may attend
        for layer in self.layers:
            x = layer(x, mask)
        x = self.final_norm(x)
        eot = token_ids.argmax(dim=-1)  # (N,)
        return x[torch.arange(x.shape[0], device=x.device), eot]

    def extra_repr(self) -> str:
        return f"vocab_size={self.vocab_size}, context_length={self.context_length}, causal={self.causal}"
