"""Native ops with reference implementations: ``ms_deform_attn`` (multi-scale deformable attention) and
``neighborhood_attention_2d`` (2-D neighborhood attention with relative position bias, as in DiNAT).

``set_backend(model, backend)`` / ``use_backend(backend)`` choose the backend of every op call of a model;
``kernel_variants()`` / ``use_kernel_variant(op, name)`` (or MASKFORMERS_MSDA_VARIANT / MASKFORMERS_NA_VARIANT)
choose among the CUDA kernel variants of an op. Importing this package compiles nothing: kernels are built
on first use.
"""

from .backend import BACKENDS, set_backend, use_backend
from .functional import ms_deform_attn, resolve_backend
from .neighborhood_attention import neighborhood_attention_2d
from .reference import ms_deform_attn_reference, neighborhood_attention_2d_reference
from .variants import kernel_variants, use_kernel_variant

__all__ = [
    "BACKENDS",
    "kernel_variants",
    "ms_deform_attn",
    "ms_deform_attn_reference",
    "neighborhood_attention_2d",
    "neighborhood_attention_2d_reference",
    "resolve_backend",
    "set_backend",
    "use_backend",
    "use_kernel_variant",
]
