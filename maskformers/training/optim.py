"""Optimizer and learning-rate schedule of the Mask2Former recipe.

AdamW over parameter groups: backbone parameters get ``backbone_lr_multiplier`` x the learning rate;
normalisation layers (LayerNorm, GroupNorm, BatchNorm) and embeddings (``nn.Embedding`` tables, Swin's
relative position bias tables and absolute position embeddings) get no weight decay, as detectron2's
``WEIGHT_DECAY_NORM = WEIGHT_DECAY_EMBED = 0`` in the original configs. Extra modules (a criterion with
parameters, e.g. OneFormer's logit scale) join with the base learning rate and weight decay.

Schedule: linear warm-up from ``warmup_factor`` to 1 over ``warmup_steps``, times the poly decay
``(1 - step / max_steps) ** power`` (detectron2's WarmupPolyLR, power 0.9).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

__all__ = ["parameter_groups", "build_optimizer", "poly_schedule", "build_scheduler"]

_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm, nn.LocalResponseNorm)
_EMBEDDING_NAMES = ("relative_position_bias_table", "absolute_pos_embed")


def parameter_groups(
    model: nn.Module,
    *,
    lr: float,
    weight_decay: float,
    backbone_lr_multiplier: float = 0.1,
    extra_modules: Iterable[nn.Module] = (),
) -> list[dict]:
    """AdamW parameter groups (see the module doc). Each group has ``name`` for logging."""
    backbone = getattr(model, "backbone", None)
    backbone_ids = {id(p) for p in backbone.parameters()} if backbone is not None else set()
    no_decay: set[int] = set()
    for module_name, module in model.named_modules():
        for name, p in module.named_parameters(recurse=False):
            if isinstance(module, (*_NORMS, nn.Embedding)) or any(k in name for k in _EMBEDDING_NAMES):
                no_decay.add(id(p))
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    seen: set[int] = set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        groups.setdefault((id(p) in backbone_ids, id(p) in no_decay), []).append(p)
    out = []
    for (is_backbone, is_no_decay), params in sorted(groups.items()):
        out.append({
            "params": params,
            "lr": lr * (backbone_lr_multiplier if is_backbone else 1.0),
            "weight_decay": 0.0 if is_no_decay else weight_decay,
            "name": f"{'backbone' if is_backbone else 'heads'}{'/no_decay' if is_no_decay else ''}",
        })
    extra = [p for m in extra_modules for p in m.parameters() if p.requires_grad and id(p) not in seen]
    if extra:
        out.append({"params": extra, "lr": lr, "weight_decay": weight_decay, "name": "criterion"})
    return out


def build_optimizer(model: nn.Module, *, lr: float = 1e-4, weight_decay: float = 0.05,
                    backbone_lr_multiplier: float = 0.1, extra_modules: Iterable[nn.Module] = ()) -> torch.optim.AdamW:
    """AdamW (betas 0.9/0.999, eps 1e-8) over :func:`parameter_groups`."""
    groups = parameter_groups(model, lr=lr, weight_decay=weight_decay, backbone_lr_multiplier=backbone_lr_multiplier,
                              extra_modules=extra_modules)
    return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)


def poly_schedule(step: int, *, max_steps: int, power: float = 0.9, warmup_steps: int = 0,
                  warmup_factor: float = 1.0) -> float:
    """Multiplier of the base learning rate at ``step`` (0-based)."""
    if max_steps < 1:
        raise ValueError(f"max_steps must be >= 1, got {max_steps}")
    warm = 1.0
    if step < warmup_steps:
        alpha = step / warmup_steps
        warm = warmup_factor * (1 - alpha) + alpha
    return warm * max(0.0, 1.0 - step / max_steps) ** power


def build_scheduler(optimizer: torch.optim.Optimizer, *, max_steps: int, power: float = 0.9,
                    warmup_steps: int = 0, warmup_factor: float = 1.0) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR applying :func:`poly_schedule` (step it once per optimizer step)."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: poly_schedule(step, max_steps=max_steps, power=power, warmup_steps=warmup_steps,
                                   warmup_factor=warmup_factor),
    )
