"""OneFormer's task encoder: the tokenized task prompt ("the task is panoptic", 77 CLIP token ids) read
as a vector of 77 numbers by a 2-layer MLP, giving one task token (B, C).

The ids go in as numbers, up to 49,407. transformers casts them to the model's dtype first, which in
bfloat16 (8 bits of mantissa) or float16 (spacing 32 above 32,768) changes the ids themselves; here the
MLP always runs in float32 (the weights upcast, autocast off) and only its output takes the model dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..layers.autocast import autocast_disabled
from ..layers.mlp import MLP
from ..layers.text_encoder import check_token_range

__all__ = ["TaskEncoder"]

_EXACT = 2**24  # every integer below it is a float32


class TaskEncoder(nn.Module):
    """Parameters: ``mlp`` (:class:`~maskformers.layers.MLP` task_seq_len -> C -> C)."""

    def __init__(self, *, task_seq_len: int = 77, hidden_dim: int = 256, num_layers: int = 2) -> None:
        super().__init__()
        if task_seq_len < 1 or hidden_dim < 1:
            raise ValueError(f"expected task_seq_len >= 1 and hidden_dim >= 1, got task_seq_len={task_seq_len}, "
                             f"hidden_dim={hidden_dim}")
        self.task_seq_len = task_seq_len
        self.mlp = MLP(input_dim=task_seq_len, hidden_dim=hidden_dim, output_dim=hidden_dim, num_layers=num_layers)

    def forward(self, task_inputs: torch.Tensor) -> torch.Tensor:
        """task_inputs (B, task_seq_len) integer token ids. Returns (B, C) in the MLP's parameter dtype."""
        if task_inputs.dim() != 2 or task_inputs.shape[1] != self.task_seq_len:
            raise ValueError(f"expected task_inputs (B, {self.task_seq_len}) token ids, got {tuple(task_inputs.shape)}")
        if task_inputs.is_floating_point() or task_inputs.is_complex():
            raise TypeError(
                f"task_inputs must be integer token ids (int64), got {task_inputs.dtype}: a float tensor may "
                "already have rounded the ids"
            )
        check_token_range(task_inputs, _EXACT, "task_inputs must be token ids in [0, 2**24) (exact in float32)")
        out_dtype = self.mlp.layers[0].weight.dtype
        x = task_inputs.to(torch.float64 if out_dtype == torch.float64 else torch.float32)
        with autocast_disabled(x.device.type):
            last = len(self.mlp.layers) - 1
            for i, layer in enumerate(self.mlp.layers):
                x = F.linear(x, layer.weight.to(x.dtype), layer.bias.to(x.dtype))
                if i < last:
                    x = F.relu(x)
        return x.to(out_dtype)
