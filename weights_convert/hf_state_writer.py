"""Our Mask2Former / OneFormer state dicts -> transformers checkpoint state dicts: the inverse of
:mod:`weights_convert.hf_mask2former` and :mod:`weights_convert.hf_oneformer`.

The renames, splits and merges are those modules' rule tables run backwards (:mod:`weights_convert.inverse`),
so the names written are the ones transformers 5 ``save_pretrained`` writes (the 4.x file names, which both
versions read). The keys those tables drop on purpose are written back at the values a freshly built
transformers model holds, because transformers expects them in a file:

* ``criterion.empty_weight`` (1 per class, ``no_object_weight`` 0.1 for "no object") and, for OneFormer,
  ``criterion.logit_scale`` (log(1 / 0.07), float64): loss state, not part of our models;
* ``...encoder.swin.layernorm``: transformers 5's ``SwinBackbone`` holds the classifier's final LayerNorm
  and never uses it (ones and zeros);
* ``...normalization.num_batches_tracked`` of a ResNet (0): a training counter; our batch norms are frozen.

Transformers -> ours -> transformers gives back the same tensors, bit for bit, wherever those hold their
initial values (tests/test_export_transformers.py).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from . import hf_backbones, hf_mask2former, hf_oneformer
from .hf_mask2former import HF_BACKBONE
from .inverse import invert_rules
from .rules import ConversionError

__all__ = ["state_dict_to_hf", "NO_OBJECT_WEIGHT", "CONTRASTIVE_TEMPERATURE"]

NO_OBJECT_WEIGHT = 0.1  # transformers' default no_object_weight (the config.json we write leaves it)
CONTRASTIVE_TEMPERATURE = 0.07  # transformers' default OneFormer contrastive_temperature
_CLASS_HEAD = "transformer_decoder.head.class_embed.weight"


def _regenerated(state: dict[str, torch.Tensor], ours: Mapping[str, torch.Tensor], model_type: str,
                 backbone_type: str) -> None:
    """Add, in place, the keys the forward tables drop (see the module docstring)."""
    if _CLASS_HEAD not in ours:
        raise ConversionError(f"cannot export to transformers: the state dict has no {_CLASS_HEAD}")
    empty_weight = torch.ones(ours[_CLASS_HEAD].shape[0])
    empty_weight[-1] = NO_OBJECT_WEIGHT
    state["criterion.empty_weight"] = empty_weight
    if model_type == "oneformer":
        state["criterion.logit_scale"] = torch.tensor(math.log(1 / CONTRASTIVE_TEMPERATURE), dtype=torch.float64)
    if backbone_type == "swin":  # as wide as the last stage, whose output norm is backbone.norms.{last}
        last = max((k for k in ours if k.startswith("backbone.norms.") and k.endswith(".weight")),
                   key=lambda k: int(k.split(".")[2]))
        state[f"{HF_BACKBONE}swin.layernorm.weight"] = torch.ones_like(ours[last])
        state[f"{HF_BACKBONE}swin.layernorm.bias"] = torch.zeros_like(ours[last])
    if backbone_type == "resnet":
        for key in [k for k in state if k.endswith(".normalization.running_mean")]:
            state[key.replace("running_mean", "num_batches_tracked")] = torch.tensor(0, dtype=torch.int64)


def state_dict_to_hf(
    state_dict: Mapping[str, torch.Tensor], *, model_type: str, backbone_type: str, source: str = "model"
) -> dict[str, torch.Tensor]:
    """Our ``state_dict`` of a ``model_type`` ("mask2former" / "oneformer") model with a ``backbone_type``
    backbone, in transformers' checkpoint names; raises ``ConversionError`` listing every key of ours no rule
    produces (a module transformers does not have)."""
    tables = {"mask2former": hf_mask2former, "oneformer": hf_oneformer}
    if model_type not in tables:
        raise ConversionError(f"cannot export a {model_type!r} model to transformers (only {', '.join(tables)})")
    ours = hf_backbones.before_inverse(backbone_type, state_dict)
    state = invert_rules(ours, tables[model_type].rules(backbone_type), source=source)
    _regenerated(state, state_dict, model_type, backbone_type)
    return state
