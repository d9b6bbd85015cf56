"""Mask-classification prediction heads and the masked-attention mask derived from their masks.

From decoder queries (B, Q, C): a shared LayerNorm, then a linear classifier over K classes + "no
object" and a 3-layer MLP giving one mask embedding per query, whose dot product with the per-pixel
mask features (B, C_m, H, W) gives mask logits (B, Q, H, W).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .mlp import MLP

__all__ = ["MaskClassificationHead", "masked_attention_mask"]


class MaskClassificationHead(nn.Module):
    """Parameters: ``norm`` (LayerNorm C unless another module is passed as ``norm``), ``class_embed``
    (C -> num_classes + 1), ``mask_embed`` (MLP C -> C -> C -> mask_dim, 3 layers)."""

    def __init__(
        self,
        *,
        hidden_dim: int = 256,
        num_classes: int,
        mask_dim: int = 256,
        mask_mlp_layers: int = 3,
        norm: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.norm = nn.LayerNorm(hidden_dim) if norm is None else norm
        self.class_embed = nn.Linear(hidden_dim, num_classes + 1)
        self.mask_embed = MLP(
            input_dim=hidden_dim, hidden_dim=hidden_dim, output_dim=mask_dim, num_layers=mask_mlp_layers
        )

    def forward(self, queries: torch.Tensor, mask_features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """queries (B, Q, C), mask_features (B, C_m, H, W) -> class logits (B, Q, K+1), mask logits (B, Q, H, W)."""
        B, Q, _ = queries.shape
        if mask_features.dim() != 4 or mask_features.shape[0] != B:
            raise ValueError(f"expected mask_features (B={B}, C, H, W), got {tuple(mask_features.shape)}")
        h = self.norm(queries)
        class_logits = self.class_embed(h)
        mask_embed = self.mask_embed(h)  # (B, Q, C_m)
        H, W = mask_features.shape[-2:]
        # (B, Q, C_m) @ (B, C_m, H*W); flatten is a view for contiguous and channels-last features
        mask_logits = torch.bmm(mask_embed, mask_features.flatten(2)).view(B, Q, H, W)
        return class_logits, mask_logits


@torch.no_grad()
def masked_attention_mask(mask_logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Where each query may attend on a (h, w) map: (B, 1, Q, h*w) bool, True = attend (SDPA convention).

    The mask logits (B, Q, H, W) are resized bilinearly to ``size``; a query attends where its mask
    probability is >= 0.5. A query whose mask is empty at that size attends everywhere instead (the
    published models' reset; otherwise its softmax row would be all -inf). One mask is shared by all
    heads through broadcasting.
    """
    resized = F.interpolate(mask_logits, size=size, mode="bilinear", align_corners=False)
    blocked = resized.sigmoid().flatten(2) < 0.5  # (B, Q, h*w); sigmoid kept for bit-exact thresholds
    blocked &= ~blocked.all(dim=-1, keepdim=True)
    return blocked.logical_not_().unsqueeze(1)
