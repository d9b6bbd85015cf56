"""How exactly we compare with what another library computes (transformers, torchvision, timm, PIL).

Integers, ids, labels, areas and segmentation maps are compared exactly: they are decisions, and a
decision that changes is a real difference.

Floating-point results that another library computes through a reduction (a sum, an einsum, a matmul)
or an interpolation are not bit-stable across its releases, nor across thread counts: the order of the
additions is an implementation detail (transformers 5.24 changed the last float32 bit of its semantic
scores against 5.23, and 2 OpenMP threads sum in another order than 1). Those are compared at float32
rounding: a few units in the last place, relative to the magnitude of the compared values. A real bug
(a wrong formula, a wrong axis, a missing term) moves values by orders of magnitude more than this.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["FLOAT32_ULPS", "assert_float32_rounding", "assert_segments_info_match"]

# Units in the last place allowed between two float32 results of the same formula computed with a
# different summation order: 1-2 ulps seen (transformers 5.23 vs 5.24, 1 vs 2 threads); 8 leaves room
# for longer reductions without admitting any formula change.
FLOAT32_ULPS = 8
_EPS32 = torch.finfo(torch.float32).eps


def assert_float32_rounding(actual: torch.Tensor, expected: torch.Tensor, *, what: str = "values") -> None:
    """``actual`` equals ``expected`` up to float32 rounding: every difference within ``FLOAT32_ULPS``
    ulps of the larger of the element and the tensor's largest magnitude (a reduction's rounding error
    scales with the magnitudes it adds up, not with its result)."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} vs {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} vs {expected.dtype}"
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    bound = FLOAT32_ULPS * _EPS32
    torch.testing.assert_close(
        actual, expected, rtol=bound, atol=bound * scale, msg=lambda m: f"{what} beyond float32 rounding: {m}"
    )


def assert_segments_info_match(ours: Sequence[dict[str, Any]], ref: Sequence[dict[str, Any]]) -> None:
    """Same segments in the same order: ids, labels and fusion flags exactly; scores (float32 products
    rounded to 6 decimals by both sides) within one step of that rounding plus float32 rounding."""
    assert len(ours) == len(ref), f"{len(ours)} segments vs {len(ref)}: {ours} vs {ref}"
    for i, (o, r) in enumerate(zip(ours, ref)):
        assert set(o) == set(r), f"segment {i}: keys {sorted(o)} vs {sorted(r)}"
        for key in o:
            if key == "score":
                assert abs(o[key] - r[key]) <= 1e-6 + FLOAT32_ULPS * _EPS32, f"segment {i} score {o[key]} vs {r[key]}"
            else:
                assert o[key] == r[key], f"segment {i} {key}: {o[key]!r} vs {r[key]!r}"
