"""Architecture configs (no loss or training settings): the fields Mask2Former and OneFormer share, and
OneFormer's task and text fields on top.

Plain dataclasses that round-trip through dicts (``to_dict`` / ``from_dict``), which is what our
checkpoint folders store. Translating transformers' ``config.json`` into these is the job of
``weights_convert.hf_config`` (dict -> dict).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

__all__ = ["MaskFormerConfig", "Mask2FormerConfig", "OneFormerConfig", "SWIN_SPECS"]

# backbone specs: {"name": ..., **kwargs of the builder}
SWIN_SPECS: dict[str, dict[str, Any]] = {
    size: {"name": "swin", "embed_dim": dim, "depths": depths, "num_heads": heads, "window_size": window}
    for size, dim, depths, heads, window in (
        ("swin-tiny", 96, [2, 2, 6, 2], [3, 6, 12, 24], 7),
        ("swin-small", 96, [2, 2, 18, 2], [3, 6, 12, 24], 7),
        ("swin-base", 128, [2, 2, 18, 2], [4, 8, 16, 32], 12),
        ("swin-large", 192, [2, 2, 18, 2], [6, 12, 24, 48], 12),
    )
}

C = TypeVar("C", bound="MaskFormerConfig")


def _check_flags(config: Any, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(config, name)
        if not isinstance(value, bool):
            raise ValueError(f"{type(config).__name__}.{name} must be True or False, got {value!r}")


def _check_rates(config: Any, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
            raise ValueError(f"{type(config).__name__}.{name} must be a probability in [0, 1), got {value!r}")


@dataclass
class MaskFormerConfig:
    """Fields shared by Mask2Former and OneFormer.

    backbone: ``{"name": "swin" | "resnet" | ..., **builder kwargs}`` (see
    :func:`maskformers.models.backbone.build_backbone`). decoder_layers counts real layers (transformers'
    ``decoder_layers`` is this + 1); the model makes ``decoder_layers + 1`` predictions. conv_dim is the
    pixel decoder width (transformers' ``feature_size`` / ``conv_dim``). encoder_dropout is the pixel
    decoder's deformable encoder dropout (active in training mode only).
    """

    model_type: ClassVar[str] = ""

    backbone: dict[str, Any] = field(default_factory=lambda: dict(SWIN_SPECS["swin-tiny"]))
    num_classes: int = 133
    num_queries: int = 100
    hidden_dim: int = 256
    conv_dim: int = 256
    mask_dim: int = 256
    num_heads: int = 8
    encoder_layers: int = 6
    encoder_ffn_dim: int = 1024
    encoder_points: int = 4
    encoder_dropout: float = 0.0
    num_feature_levels: int = 3
    common_stride: int = 4
    decoder_layers: int = 9
    decoder_ffn_dim: int = 2048
    pre_norm: bool = False
    enforce_input_projection: bool = False

    def __post_init__(self) -> None:
        positive = (
            "num_classes", "num_queries", "hidden_dim", "conv_dim", "mask_dim", "num_heads", "encoder_ffn_dim",
            "encoder_points", "num_feature_levels", "common_stride", "decoder_ffn_dim",
        )
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{type(self).__name__}.{name} must be a positive integer, got {value!r}")
        for name in ("encoder_layers", "decoder_layers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{type(self).__name__}.{name} must be an integer >= 0, got {value!r}")
        _check_flags(self, ("pre_norm", "enforce_input_projection"))
        _check_rates(self, ("encoder_dropout",))
        if not isinstance(self.backbone, Mapping) or "name" not in self.backbone:
            raise ValueError(f"{type(self).__name__}.backbone must be a dict with a 'name', got {self.backbone!r}")
        if self.hidden_dim % self.num_heads:
            raise ValueError(
                f"{type(self).__name__}.hidden_dim={self.hidden_dim} must be divisible by num_heads={self.num_heads}"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls: type[C], data: Mapping[str, Any]) -> C:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} field(s) {unknown}; known: {sorted(names)}")
        return cls(**dict(data))


@dataclass
class Mask2FormerConfig(MaskFormerConfig):
    """Architecture of a Mask2Former: the shared fields, learned queries."""

    model_type: ClassVar[str] = "mask2former"


@dataclass
class OneFormerConfig(MaskFormerConfig):
    """Architecture of a OneFormer: the shared fields plus the task and text parts.

    The last of the ``num_queries`` queries is the task token. task_seq_len: length of the tokenized
    task prompt (the task MLP's input width). query_dec_layers / query_dropout: the task-conditioned
    query transformer. text_*: the text mapper used for the contrastive loss in training; it is built
    only when ``with_text_mapper`` (transformers' ``is_training``). text_causal_mask: the original
    OneFormer text encoder attends causally; transformers builds the mask but never applies it
    (``False`` reproduces transformers).
    """

    model_type: ClassVar[str] = "oneformer"

    num_queries: int = 150
    task_seq_len: int = 77
    task_mlp_layers: int = 2
    query_dec_layers: int = 2
    query_dropout: float = 0.1
    use_task_norm: bool = True
    with_text_mapper: bool = False
    text_width: int = 256
    text_context_length: int = 77
    text_layers: int = 6
    text_heads: int = 4
    text_vocab_size: int = 49408
    text_proj_layers: int = 2
    text_n_ctx: int = 16
    text_causal_mask: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_queries < 2:
            raise ValueError(f"OneFormerConfig.num_queries must be >= 2 (objects + task token), got {self.num_queries}")
        for name in ("task_seq_len", "task_mlp_layers", "text_width", "text_context_length", "text_heads",
                     "text_vocab_size", "text_proj_layers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"OneFormerConfig.{name} must be a positive integer, got {value!r}")
        _check_flags(self, ("use_task_norm", "with_text_mapper", "text_causal_mask"))
        _check_rates(self, ("query_dropout",))
        for name in ("query_dec_layers", "text_layers", "text_n_ctx"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"OneFormerConfig.{name} must be an integer >= 0, got {value!r}")
        if self.with_text_mapper and self.text_n_ctx >= self.num_queries:
            raise ValueError(
                f"OneFormerConfig.text_n_ctx={self.text_n_ctx} must be < num_queries={self.num_queries} "
                "(text queries = num_queries - text_n_ctx)"
            )
