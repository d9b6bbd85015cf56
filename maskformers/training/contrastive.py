"""OneFormer's query-text contrastive loss, as an extra term of :class:`MaskFormerCriterion`.

Each image's object queries (B, Q, C) and the text queries of its annotation (B, Q_t, C) are each
flattened to one vector per image and L2-normalised; the image-text similarity matrix, scaled by a
learned ``exp(logit_scale)`` (initially 1 / temperature, capped at 100), is trained with a symmetric
cross-entropy whose positives are the pairs of the same image (CLIP style). With ``torch.distributed``
initialised, the negatives come from every process's batch (a differentiable all-gather), as in the
original OneFormer.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ContrastiveLoss", "contrastive_loss"]


class _AllGather(torch.autograd.Function):
    """Differentiable all-gather of equally shaped (B, D) tensors along dim 0: the backward sums every
    process's gradient for the gathered tensor and keeps this process's rows (the gradient of this rank's
    input in the sum of all ranks' losses; DDP then averages it like the other gradients). Written here
    because torch's differentiable gathers are deprecated or private."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        ctx.rank, ctx.rows = dist.get_rank(), x.shape[0]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())  # the list form: gloo (CPU) has it everywhere
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]


def _gather(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(B, D) -> (world * B, D) with gradients flowing back to this rank's slice, and this rank's offset."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x, 0
    return _AllGather.apply(x), dist.get_rank() * x.shape[0]


def contrastive_loss(
    image_queries: torch.Tensor, text_queries: torch.Tensor, logit_scale: torch.Tensor
) -> torch.Tensor:
    """image_queries (B, Q, C), text_queries (B, Q_t, C) with Q * C == Q_t * C_t; logit_scale () (log of
    the inverse temperature). Returns ``CE(image -> text) + CE(text -> image)``; float32 at least."""
    if image_queries.shape[0] != text_queries.shape[0]:
        raise ValueError(f"expected image_queries and text_queries with one row per image, got "
                         f"{tuple(image_queries.shape)} and {tuple(text_queries.shape)}")
    if image_queries[0].numel() != text_queries[0].numel():
        raise ValueError(f"image and text queries must flatten to the same size per image, got "
                         f"{tuple(image_queries.shape)} and {tuple(text_queries.shape)}")
    dtype = torch.float64 if image_queries.dtype == torch.float64 else torch.float32
    image = F.normalize(image_queries.to(dtype).flatten(1), dim=-1)  # (B, D)
    text = F.normalize(text_queries.to(dtype).flatten(1), dim=-1)
    scale = logit_scale.exp().clamp(max=100)
    all_text, offset = _gather(text)
    all_image, _ = _gather(image)
    labels = torch.arange(image.shape[0], device=image.device) + offset
    logits_per_image = image @ all_text.t() * scale  # (B, world * B)
    logits_per_text = text @ all_image.t() * scale
    return F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)


class ContrastiveLoss(nn.Module):
    """Extra criterion term: reads ``contrastive_queries`` (B, Q, C) and ``text_queries`` (B, Q_t, C) from
    the model output and returns ``{"loss_contrastive": ...}`` (OneFormer weighs it 0.5).

    Parameter: ``logit_scale`` (scalar), initialised to ``log(1 / temperature)``; it is trained with the
    model (the training loop optimises the criterion's parameters too).
    """

    def __init__(self, *, temperature: float = 0.07) -> None:
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = temperature
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / temperature)))

    def forward(self, outputs: Any, targets: Sequence[Mapping[str, torch.Tensor]] | None = None) -> dict[str, Any]:
        def get(name: str) -> torch.Tensor | None:
            return outputs.get(name) if isinstance(outputs, Mapping) else getattr(outputs, name, None)

        image, text = get("contrastive_queries"), get("text_queries")
        if image is None or text is None:
            raise ValueError("the contrastive loss needs contrastive_queries and text_queries in the model output "
                             "(OneFormer in training mode)")
        return {"loss_contrastive": contrastive_loss(image, text, self.logit_scale)}
