"""The backbone inside a transformers Mask2Former / OneFormer checkpoint: which rename table reads it.

transformers builds the backbone from ``backbone_config.model_type``; each type has its table (Swin:
:mod:`.hf_swin`, ResNet: :mod:`.hf_resnet`, ConvNeXt: :mod:`.hf_convnext`, DiNAT: :mod:`.hf_dinat`), and the
same names sit under ``model.pixel_level_module.encoder.`` in both models. :func:`after_rules` /
:func:`before_inverse` are the shape fixes a table cannot express (DiNAT's layer-scale chunks).
"""

from __future__ import annotations

import torch

from .rules import ConversionError, Rule

__all__ = ["BACKBONE_TYPES", "after_rules", "before_inverse", "rules"]

BACKBONE_TYPES = ("swin", "resnet", "convnext", "dinat")


def rules(backbone_type: str, src_prefix: str, dst_prefix: str, *, model: str = "transformers") -> list[Rule]:
    """The rename table of a ``backbone_type`` backbone (keys under ``src_prefix`` -> ours under ``dst_prefix``)."""
    if backbone_type == "swin":
        from . import hf_swin as table
    elif backbone_type == "resnet":
        from . import hf_resnet as table
    elif backbone_type == "convnext":
        from . import hf_convnext as table
    elif backbone_type == "dinat":
        from . import hf_dinat as table
    else:
        raise ConversionError(
            f"{model} checkpoints with a {backbone_type!r} backbone are not supported "
            f"(only {', '.join(BACKBONE_TYPES)})"
        )
    return list(table.rules(src_prefix, dst_prefix))


def after_rules(backbone_type: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Shape fixes after ``apply_rules`` (transformers -> ours), in place."""
    if backbone_type == "dinat":  # layer-scale chunks keep a (1, C) shape from the split; ours are (C,)
        from .hf_dinat import flatten_layer_scale

        flatten_layer_scale(state)
    return state


def before_inverse(backbone_type: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of :func:`after_rules` (ours -> transformers), on a copy."""
    state = dict(state)
    if backbone_type == "dinat":
        from .hf_dinat import unflatten_layer_scale

        unflatten_layer_scale(state)
    return state
