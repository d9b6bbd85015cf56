"""Fine-tuning on a new label set: swap the class head, keep every other weight.

``replace_class_head(model, id2label)`` gives ``model.transformer_decoder.head.class_embed`` (the same head in
Mask2Former and OneFormer) a fresh ``Linear(hidden, K + 1)`` for the new classes (PyTorch's default init, as
the original builds it), updates ``model.id2label``, ``model.config.num_classes`` and the head's class
count, so saving and loading the fine-tuned model works. With ``keep_matching=True`` the rows of classes whose
names exist in the old label set, and the "no object" row, are copied from the old head.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

__all__ = ["replace_class_head"]


def replace_class_head(model: nn.Module, id2label: Mapping[int, str], *, keep_matching: bool = False) -> nn.Module:
    """Re-head ``model`` (a Mask2Former or a OneFormer) for ``id2label`` (contiguous ids 0..K-1). Returns the model."""
    ids = sorted(int(k) for k in id2label)
    if not ids or ids != list(range(len(ids))):
        raise ValueError(f"id2label must have contiguous ids 0..K-1, got {ids[:10]}{'...' if len(ids) > 10 else ''}")
    head = model.transformer_decoder.head
    old: nn.Linear = head.class_embed
    new = nn.Linear(old.in_features, len(ids) + 1, device=old.weight.device, dtype=old.weight.dtype)
    if keep_matching:
        old_index = {str(name): int(i) for i, name in (getattr(model, "id2label", {}) or {}).items()}
        with torch.no_grad():
            for i in ids:
                j = old_index.get(str(id2label[i]))
                if j is not None and j < old.out_features - 1:
                    new.weight[i] = old.weight[j]
                    new.bias[i] = old.bias[j]
            new.weight[-1], new.bias[-1] = old.weight[-1], old.bias[-1]
    head.class_embed = new
    head.num_classes = len(ids)
    model.id2label = {i: str(id2label[i]) for i in ids}
    if getattr(model, "config", None) is not None:
        model.config.num_classes = len(ids)
    return model
