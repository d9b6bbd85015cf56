"""Tiny Mask2Former and OneFormer models of every shipped backbone, for the torch.compile / graph tests."""

from __future__ import annotations

import torch

from maskformers.models import build_mask2former, build_oneformer
from maskformers.models.config import Mask2FormerConfig, OneFormerConfig
from maskformers.ops import set_backend

BACKBONES = {
    "swin": {"name": "swin", "embed_dim": 16, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 2, 2], "window_size": 7},
    "resnet": {"name": "resnet", "depth": 50},
    "convnext": {"name": "convnext", "depths": [1, 1, 1, 1], "dims": [16, 24, 32, 40]},
    "dinat": {"name": "dinat", "embed_dim": 16, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 2, 2], "kernel_size": 3,
              "dilations": [[2], [1], [1], [1]]},
}
HEADS = dict(num_classes=4, num_queries=6, hidden_dim=32, conv_dim=32, mask_dim=32, num_heads=2, encoder_layers=1,
             encoder_ffn_dim=16, decoder_layers=3, decoder_ffn_dim=24)
# "the task is panoptic" as CLIP ids, zero-padded to 77 (what OneFormerProcessor gives)
TASK_IDS = [49406, 518, 6157, 533, 7728, 12714, 49407]


def task_inputs(batch: int, device: torch.device | str = "cpu") -> torch.Tensor:
    ids = torch.zeros(batch, 77, dtype=torch.int64, device=device)
    ids[:, : len(TASK_IDS)] = torch.tensor(TASK_IDS)
    return ids


def tiny_model(kind: str, backbone: str, *, backend: str = "native", seed: int = 0) -> torch.nn.Module:
    """kind "mask2former" or "oneformer"; backbone one of BACKBONES. Eval mode, op backend set."""
    torch.manual_seed(seed)
    if kind == "mask2former":
        model = build_mask2former(Mask2FormerConfig(backbone=dict(BACKBONES[backbone]), **HEADS))
    else:
        model = build_oneformer(OneFormerConfig(backbone=dict(BACKBONES[backbone]), query_dec_layers=1, **HEADS))
    return set_backend(model, backend).eval()


def model_inputs(model: torch.nn.Module, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The positional inputs of ``model`` for these images (OneFormer: the panoptic task prompt too)."""
    if hasattr(model, "task_encoder"):
        return pixel_values, task_inputs(pixel_values.shape[0], pixel_values.device)
    return (pixel_values,)


def flat_outputs(out) -> list[torch.Tensor]:
    """Every tensor of a model output, in a fixed order (final prediction, auxiliary ones, the rest)."""
    tensors = [out.class_logits, out.mask_logits, out.hidden_states]
    for aux in out.aux_outputs:
        tensors += [aux["class_logits"], aux["mask_logits"]]
    for name in ("task_token", "contrastive_queries"):
        if hasattr(out, name):
            tensors.append(getattr(out, name))
    return tensors
