"""Neighborhood attention written with FlexAttention, the comparison point of the CUDA kernels.

``torch.nn.attention.flex_attention`` over the flattened map with a ``mask_mod`` that keeps each pixel's
K x K window of its dilation group (NATTEN's rule: centred, shifted inward at the borders) and a
``score_mod`` that adds the relative position bias: the same semantics as
``maskformers.ops.neighborhood_attention_2d`` (checked in float64 against our reference by
tests/test_benchmark_na_flex.py). On a GPU the call is compiled (``torch.compile(flex_attention)``, Triton
kernels that skip the key blocks the block mask rules out); on a CPU it runs eagerly, forward only.
"""

from __future__ import annotations

import functools

import torch
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

__all__ = ["neighborhood_block_mask", "flex_neighborhood_attention"]


def _window(index: torch.Tensor, length: int, kernel: int, dilation: int):
    """(dilation group, group-local position, group-local first window position) of pixel rows/columns."""
    group, g = index % dilation, index // dilation
    members = (length - group + dilation - 1) // dilation
    first = torch.clamp(torch.minimum(g - kernel // 2, members - kernel), min=0)
    return group, g, first


def _mask_mod(height: int, width: int, kernel: int, dilation: int):
    def mask(b, h, q_idx, kv_idx):
        q_row, q_col = q_idx // width, q_idx % width
        k_row, k_col = kv_idx // width, kv_idx % width
        keep = None
        for q_pos, k_pos, length in ((q_row, k_row, height), (q_col, k_col, width)):
            group, _, first = _window(q_pos, length, kernel, dilation)
            k_g = k_pos // dilation
            inside = (k_pos % dilation == group) & (k_g >= first) & (k_g < first + kernel)
            keep = inside if keep is None else keep & inside
        return keep

    return mask


def _score_mod(rpb: torch.Tensor, width: int, kernel: int, dilation: int):
    side = 2 * kernel - 1

    def score(s, b, h, q_idx, kv_idx):
        # bias entry = neighbour offset in group units + kernel - 1 (clamped: masked pairs are scored too)
        dr = (kv_idx // width) // dilation - (q_idx // width) // dilation + kernel - 1
        dc = (kv_idx % width) // dilation - (q_idx % width) // dilation + kernel - 1
        return s + rpb[h, dr.clamp(0, side - 1), dc.clamp(0, side - 1)]

    return score


@functools.lru_cache(maxsize=16)
def neighborhood_block_mask(height: int, width: int, kernel: int, dilation: int, device: str):
    """FlexAttention's block mask of a height x width map (cached per shape)."""
    n = height * width
    return create_block_mask(_mask_mod(height, width, kernel, dilation), None, None, n, n, device=device,
                             _compile=device != "cpu")


@functools.lru_cache(maxsize=1)
def _compiled_flex():
    return torch.compile(flex_attention, dynamic=False)


def flex_neighborhood_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, rpb: torch.Tensor | None,
                                *, kernel_size: int, dilation: int = 1, scale: float | None = None) -> torch.Tensor:
    """neighborhood_attention_2d's result through FlexAttention; (B, H, W, heads, D) in and out."""
    B, height, width, heads, D = query.shape
    flat = [t.reshape(B, height * width, heads, D).transpose(1, 2) for t in (query, key, value)]  # (B, heads, N, D)
    device = query.device.type
    mask = neighborhood_block_mask(height, width, kernel_size, dilation, device)
    score = _score_mod(rpb, width, kernel_size, dilation) if rpb is not None else None
    attend = flex_attention if device == "cpu" else _compiled_flex()
    out = attend(*flat, score_mod=score, block_mask=mask, scale=scale if scale is not None else D**-0.5)
    return out.transpose(1, 2).reshape(B, height, width, heads, D)
