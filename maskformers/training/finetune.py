"""Fine-tuning on a new label set: swap the class head, keep every other weight.

``replace_class_head(model, id2label)`` gives ``model.transformer_decoder.head.class_embed`` (the same head in
Mask2Former and OneFormer) a fresh ``Linear(hidden, K + 1)`` for the new classes (PyTorch's default init, as
the original builds it, drawn from a generator seeded by ``seed``), updates ``model.id2label``,
``model.config.num_classes`` and the head's class count, so saving and loading the fine-tuned model works.
With ``keep_matching=True`` the rows of classes whose names exist in the old label set, and the "no object"
row, are copied from the old head.

:func:`match_class_head` is the rule :func:`maskformers.finetune` (and so ``maskformers train``) applies: a
model whose labels differ from the data's gets a new head; :func:`labels_mismatch` is the check
:func:`maskformers.training.loop.train` runs, which never changes the model.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn

__all__ = ["replace_class_head", "match_class_head", "labels_mismatch"]


def replace_class_head(model: nn.Module, id2label: Mapping[int, str], *, keep_matching: bool = False,
                       seed: int | None = None) -> nn.Module:
    """Re-head ``model`` (a Mask2Former or a OneFormer) for ``id2label`` (contiguous ids 0..K-1). Returns the model.

    seed: the new rows are drawn from ``torch.manual_seed(seed)`` inside a forked RNG (the global RNG is left
    as it was); None draws from the global RNG."""
    ids = sorted(int(k) for k in id2label)
    if not ids or ids != list(range(len(ids))):
        raise ValueError(f"id2label must have contiguous ids 0..K-1, got {ids[:10]}{'...' if len(ids) > 10 else ''}")
    head = model.transformer_decoder.head
    old: nn.Linear = head.class_embed
    with torch.random.fork_rng(devices=[], enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
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


def _names(id2label: Mapping[int, str]) -> str:
    items = [f"{i}: {id2label[i]}" for i in sorted(id2label)]
    return ", ".join(items[:6]) + (f", ... ({len(items)} classes)" if len(items) > 6 else "")


def labels_mismatch(model: nn.Module, id2label: Mapping[int, str], num_classes: int) -> str | None:
    """Why ``model`` cannot train on data of these classes as it is (None when it can). A model without
    names (built from a config) fits any data of its class count."""
    own = {int(k): str(v) for k, v in (getattr(model, "id2label", {}) or {}).items()}
    data = {int(k): str(v) for k, v in id2label.items()}
    if own and data and own != data:
        return f"the model's classes ({_names(own)}) differ from the data's ({_names(data)})"
    if model.num_classes != num_classes:
        return f"the model predicts {model.num_classes} classes, the data has {num_classes}"
    return None


def match_class_head(model: nn.Module, id2label: Mapping[int, str], *, seed: int,
                     say: Callable[[str], None] | None = None) -> bool:
    """Give ``model`` a new class head for ``id2label`` when its classes differ (rows of classes whose names it
    already knows are kept; new rows seeded by ``seed``). A model without names takes the data's. Returns
    whether the head was replaced."""
    if labels_mismatch(model, id2label, len(id2label)) is None:
        if not getattr(model, "id2label", None):
            model.id2label = {int(k): str(v) for k, v in id2label.items()}
        return False
    before = model.num_classes
    replace_class_head(model, id2label, keep_matching=True, seed=seed)
    if say is not None:
        say(f"fine-tuning: new class head for {len(id2label)} classes (was {before}; rows of classes with the "
            "same name kept)")
    return True
