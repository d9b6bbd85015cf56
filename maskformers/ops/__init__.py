"""The multi-scale deformable attention op: ``ms_deform_attn`` with native (C++/CUDA) and reference backends."""

from .functional import BACKENDS, ms_deform_attn, resolve_backend
from .reference import ms_deform_attn_reference

__all__ = ["BACKENDS", "ms_deform_attn", "ms_deform_attn_reference", "resolve_backend"]
