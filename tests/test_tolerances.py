"""The shared comparison helpers accept float32 reordering noise and nothing more."""

from __future__ import annotations

import pytest
import torch

from tolerances import assert_float32_rounding, assert_segments_info_match


def test_float32_rounding_accepts_a_reordered_sum_and_rejects_a_real_change():
    g = torch.Generator().manual_seed(0)
    terms = torch.rand(64, 1000, generator=g)
    forward = terms.sum(0)
    backward = terms.flip(0).cumsum(0)[-1]  # the same sum in another order
    assert not torch.equal(forward, backward)
    assert_float32_rounding(backward, forward)
    with pytest.raises(AssertionError, match="beyond float32 rounding"):
        assert_float32_rounding(forward * (1 + 1e-5), forward)
    with pytest.raises(AssertionError, match="dtype"):
        assert_float32_rounding(forward.double(), forward)


def test_segments_info_ids_exact_scores_within_rounding():
    ref = [{"id": 1, "label_id": 3, "was_fused": False, "score": 0.912345}]
    assert_segments_info_match([dict(ref[0], score=0.912346)], ref)  # one step of round(score, 6)
    for bad in (dict(ref[0], score=0.91236), dict(ref[0], label_id=2), dict(ref[0], id=2)):
        with pytest.raises(AssertionError):
            assert_segments_info_match([bad], ref)
    with pytest.raises(AssertionError, match="segments"):
        assert_segments_info_match([], ref)
