"""Training settings (losses, points, optimisation, schedule, logging), kept apart from the model config."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["TrainingConfig"]


@dataclass
class TrainingConfig:
    """Defaults are the Mask2Former COCO recipe where one exists (AdamW 1e-4, weight decay 0.05, backbone
    lr x0.1, poly 0.9, full-model gradient clipping at 0.01, loss weights 2/5/5, no-object 0.1, 12544
    points, oversampling 3, importance 0.75); OneFormer's contrastive term has weight 0.5 and temperature
    0.07, as its original configs.

    batch_size is per process and per micro-batch: the global batch is
    ``batch_size * grad_accumulation * world_size``.
    """

    task: str = "panoptic"
    max_steps: int = 1000
    batch_size: int = 2
    grad_accumulation: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.05
    backbone_lr_multiplier: float = 0.1
    poly_power: float = 0.9
    warmup_steps: int = 0
    warmup_factor: float = 0.001  # the lr multiplier warm-up starts from (detectron2's default)
    clip_grad_norm: float | None = 0.01
    amp: str | None = None  # None, "bf16" or "fp16"
    class_weight: float = 2.0
    mask_weight: float = 5.0
    dice_weight: float = 5.0
    no_object_weight: float = 0.1
    contrastive_weight: float = 0.5  # OneFormer with a text mapper: query-text contrastive term
    contrastive_temperature: float = 0.07
    num_points: int = 12544
    oversample_ratio: float = 3.0
    importance_sample_ratio: float = 0.75
    seed: int = 0
    num_workers: int = 0
    log_every: int = 10
    eval_every: int = 0  # 0: never during training
    checkpoint_every: int = 100
    keep_checkpoints: int = 2  # 0: keep every checkpoint
    freeze_backbone: bool = False  # train the pixel decoder and transformer decoder only
    max_skip_rate: float = 0.1  # on_error="skip": stop once more than this share of the dataset proved unusable
    early_stopping_patience: int = 0  # stop after this many evaluations without a better main metric (0: never)

    def __post_init__(self) -> None:
        if self.task not in ("panoptic", "instance", "semantic"):
            raise ValueError(f"task must be 'panoptic', 'instance' or 'semantic', got {self.task!r}")
        if self.amp not in (None, "bf16", "fp16"):
            raise ValueError(f"amp must be None, 'bf16' or 'fp16', got {self.amp!r}")
        for name in ("max_steps", "batch_size", "grad_accumulation", "num_points", "log_every", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "eval_every", "keep_checkpoints", "num_workers", "early_stopping_patience"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.max_skip_rate <= 1.0:
            raise ValueError(f"max_skip_rate must be in [0, 1], got {self.max_skip_rate}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not self.contrastive_temperature > 0:
            raise ValueError(f"contrastive_temperature must be > 0, got {self.contrastive_temperature}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainingConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown TrainingConfig field(s) {unknown}; known: {sorted(names)}")
        return cls(**dict(data))
