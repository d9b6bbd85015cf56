"""The FlexAttention form of neighborhood attention that benchmarks/neighborhood_attention.py times against
the CUDA kernels must compute the op itself: float64 against our reference (FlexAttention runs eagerly,
forward only, on the CPU), with dilation groups of different sizes, border windows and K = 11."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest
import torch

from maskformers.ops import neighborhood_attention_2d_reference

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from na_flex import flex_neighborhood_attention  # noqa: E402


@pytest.mark.parametrize("case", [(1, 9, 10, 2, 8, 3, 2), (2, 13, 11, 3, 4, 5, 2), (1, 12, 12, 1, 6, 3, 4),
                                  (1, 11, 13, 2, 8, 11, 1)], ids=lambda c: f"{c[1]}x{c[2]}-K{c[5]}-d{c[6]}")
@pytest.mark.parametrize("bias", [True, False], ids=["rpb", "no-rpb"])
def test_flex_form_matches_the_reference_float64(case, bias):
    B, H, W, heads, D, K, dilation = case
    g = torch.Generator().manual_seed(sum(case))
    q, k, v = (torch.randn(B, H, W, heads, D, generator=g, dtype=torch.float64) for _ in range(3))
    rpb = torch.randn(heads, 2 * K - 1, 2 * K - 1, generator=g, dtype=torch.float64) if bias else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # FlexAttention's note that it runs uncompiled on the CPU
        got = flex_neighborhood_attention(q, k, v, rpb, kernel_size=K, dilation=dilation, scale=0.3)
    want = neighborhood_attention_2d_reference(q, k, v, rpb, kernel_size=K, dilation=dilation, scale=0.3)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
