"""Layers against transformers' Mask2Former submodules (float64, same weights) and against plain math."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from maskformers.layers import (
    MLP,
    CrossAttentionBlock,
    MSDeformAttn,
    MultiHeadAttention,
    SinePositionEmbedding,
    grid_reference_points,
    masked_attention_mask,
    sine_position_embedding,
)
import maskformers.layers.ms_deform_attn as msda_layer
from tolerances import assert_float32_rounding

hfm = pytest.importorskip("transformers.models.mask2former.modeling_mask2former")

F64 = dict(rtol=1e-7, atol=1e-10)


def perturb_(module: torch.nn.Module, scale: float = 0.2, seed: int = 0) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)
    return module


# ------------------------------------------------------------------------------------------------
# sine position embedding
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("hw", [(1, 1), (7, 9), (25, 40), (13, 5)])
def test_sine_position_embedding_matches_transformers(dtype, hw):
    h, w = hw
    ref = hfm.Mask2FormerSinePositionEmbedding(num_position_features=64, normalize=True)(
        torch.Size([2, 3, h, w]), "cpu", dtype
    )  # (B, C, H, W)
    ours = sine_position_embedding(h, w, num_pos_feats=64, dtype=dtype)  # (H, W, C)
    assert ours.shape == (h, w, 128)
    if dtype == torch.float32:
        assert_float32_rounding(ours, ref[0].permute(1, 2, 0), what="sine position embedding")
    else:
        torch.testing.assert_close(ours, ref[0].permute(1, 2, 0), **F64)
    assert torch.equal(ref[0], ref[1])  # batch-independent, so computing it once is exact


def test_sine_position_embedding_formula():
    h, w, f = 3, 4, 8
    pe = sine_position_embedding(h, w, num_pos_feats=f, dtype=torch.float64)
    i, j, k = 2, 1, 5  # row 2, column 1, channel 5 of the x half (odd: cos)
    x = (j + 1) / (w + 1e-6) * 2 * math.pi
    assert pe[i, j, f + k].item() == pytest.approx(math.cos(x / 10000 ** (2 * (k // 2) / f)), abs=1e-12)
    y = (i + 1) / (h + 1e-6) * 2 * math.pi
    assert pe[i, j, 2].item() == pytest.approx(math.sin(y / 10000 ** (2 / f)), abs=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sine_position_embedding_16bit_is_float32_rounded(dtype):
    pe = SinePositionEmbedding(num_pos_feats=16)(30, 50, dtype=dtype)
    assert pe.dtype == dtype
    assert torch.equal(pe, sine_position_embedding(30, 50, num_pos_feats=16, dtype=torch.float32).to(dtype))


def test_sine_position_embedding_bad_args():
    with pytest.raises(ValueError, match=r"height >= 1.*got \(0, 3\)"):
        sine_position_embedding(0, 3)
    with pytest.raises(ValueError, match="num_pos_feats must be even"):
        sine_position_embedding(3, 3, num_pos_feats=7)
    with pytest.raises(ValueError, match="normalize"):
        SinePositionEmbedding(normalize=False, scale=1.0)


# ------------------------------------------------------------------------------------------------
# reference points and MSDeformAttn
# ------------------------------------------------------------------------------------------------


def test_grid_reference_points_match_transformers():
    shapes = [(3, 5), (6, 10), (12, 19)]
    valid = torch.ones(2, 3, 2, dtype=torch.float64)
    ref = hfm.Mask2FormerPixelDecoderEncoderOnly.get_reference_points(shapes, valid, device="cpu")  # (B, S, L, 2)
    ours = grid_reference_points(shapes, dtype=torch.float64)  # (S, 2)
    torch.testing.assert_close(ours[None, :, None, :].expand_as(ref), ref, **F64)
    assert ours[0].tolist() == [0.1, 0.5 / 3]  # (x, y) of the first pixel centre


def msda_pair(embed=32, heads=4, levels=3, points=2, seed=0):
    hf = hfm.Mask2FormerPixelDecoderEncoderMultiscaleDeformableAttention(embed, heads, levels, points)
    perturb_(hf, seed=seed)
    ours = MSDeformAttn(embed_dim=embed, num_heads=heads, num_levels=levels, num_points=points, op_backend="reference")
    ours.load_state_dict(hf.state_dict())
    return hf.double().eval(), ours.double().eval()


def msda_inputs(shapes=((2, 3), (4, 5), (7, 9)), batch=2, embed=32, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    S = sum(h * w for h, w in shapes)
    x = torch.randn(batch, S, embed, generator=g, dtype=dtype)
    pos = torch.randn(1, S, embed, generator=g, dtype=dtype)
    spatial_shapes = torch.tensor(shapes, dtype=torch.int64)
    starts = torch.tensor([0] + [sum(h * w for h, w in shapes[:i]) for i in range(1, len(shapes))])
    ref = grid_reference_points(list(shapes), dtype=dtype)[None, :, None].expand(1, S, len(shapes), 2)
    return x, pos, spatial_shapes, starts, ref


def test_msdeformattn_matches_transformers_float64():
    hf, ours = msda_pair()
    x, pos, shapes, starts, ref = msda_inputs()
    with torch.no_grad():
        expected, _ = hf(
            x, encoder_hidden_states=x, position_embeddings=pos, reference_points=ref.expand(2, -1, -1, -1),
            spatial_shapes_list=[tuple(s) for s in shapes.tolist()], level_start_index=starts,
        )
        got = ours(x + pos, ref, x, shapes, starts)
    torch.testing.assert_close(got, expected, **F64)


def test_msdeformattn_padding_mask_zeroes_values():
    _, ours = msda_pair()
    x, pos, shapes, starts, ref = msda_inputs()
    mask = torch.zeros(x.shape[:2], dtype=torch.bool)
    mask[1, 10:40] = True
    with torch.no_grad():
        masked = ours(x + pos, ref, x, shapes, starts, value_padding_mask=mask)
        # same as feeding values that project to exactly zero at the masked positions
        v = ours.value_proj(x).masked_fill(mask[..., None], 0.0)
        proj = ours.value_proj
        ours.value_proj = torch.nn.Identity()
        manual = ours(x + pos, ref, v, shapes, starts)
        ours.value_proj = proj
    torch.testing.assert_close(masked, manual, **F64)


def test_msdeformattn_locations_float32_for_16bit_and_autocast(monkeypatch):
    seen = {}

    def spy(value, spatial_shapes, level_start_index, locations, weights, *, backend=None):
        seen.update(value=value.dtype, locations=locations.dtype, weights=weights.dtype)
        return value.new_zeros(value.shape[0], locations.shape[1], value.shape[2] * value.shape[3])

    monkeypatch.setattr(msda_layer, "ms_deform_attn", spy)
    _, ours = msda_pair()
    x, pos, shapes, starts, ref = msda_inputs(dtype=torch.float32)
    ours.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours(x + pos, ref, x, shapes, starts)
    assert seen == {"value": torch.bfloat16, "locations": torch.float32, "weights": torch.float32}
    seen.clear()
    ours.to(torch.bfloat16)
    ours(x.bfloat16(), ref, x.bfloat16(), shapes, starts)
    assert seen == {"value": torch.bfloat16, "locations": torch.float32, "weights": torch.float32}


def test_msdeformattn_16bit_locations_are_accurate(monkeypatch):
    """A bf16 layer computes the same sampling locations as a float32 layer holding the same (bf16-exact)
    weights and inputs: the location sum is not rounded to bf16, whose step near 0.5 is 2**-9
    (a quarter pixel of a 120-wide map)."""
    captured = []

    def spy(value, spatial_shapes, level_start_index, locations, weights, *, backend=None):
        captured.append((locations, weights))
        return value.new_zeros(value.shape[0], locations.shape[1], value.shape[2] * value.shape[3])

    monkeypatch.setattr(msda_layer, "ms_deform_attn", spy)
    _, ours = msda_pair()
    ours.bfloat16().float()  # bf16-exact weights
    x, pos, shapes, starts, ref = msda_inputs(shapes=((5, 7), (40, 60), (80, 120)), dtype=torch.float32)
    q = (x + pos).bfloat16().float()
    ours(q, ref, x, shapes, starts)
    ours.bfloat16()
    ours(q.bfloat16(), ref, x.bfloat16(), shapes, starts)
    (loc32, w32), (loc16, w16) = captured
    assert loc16.dtype == torch.float32 and w16.dtype == torch.float32
    torch.testing.assert_close(loc16, loc32, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(w16, w32, rtol=1e-6, atol=1e-6)
    assert (loc16 - loc16.bfloat16().float()).abs().max() > 1e-4  # bf16 rounding would have shown


def test_msdeformattn_initialisation():
    """Deformable-DETR init: point p of head h sits p+1 pixels out along direction h (scaled to the unit
    square), on every level; attention starts uniform."""
    layer = MSDeformAttn(embed_dim=32, num_heads=8, num_levels=3, num_points=2)
    bias = layer.sampling_offsets.bias.view(8, 3, 2, 2)
    assert torch.equal(bias[0, :, 0], torch.tensor([[1.0, 0.0]] * 3))  # head 0: +x
    assert torch.equal(bias[0, :, 1], torch.tensor([[2.0, 0.0]] * 3))
    torch.testing.assert_close(bias[2, 1, 1], torch.tensor([0.0, 2.0]))  # head 2 of 8: +y
    torch.testing.assert_close(bias[1, 2, 0], torch.tensor([1.0, 1.0]))  # 45 degrees: corner of the square
    assert not layer.sampling_offsets.weight.any() and not layer.attention_weights.weight.any()
    assert not layer.attention_weights.bias.any() and not layer.value_proj.bias.any()


def test_msdeformattn_gradcheck():
    _, ours = msda_pair(embed=8, heads=2, levels=2, points=2)
    x, pos, shapes, starts, ref = msda_inputs(shapes=((2, 3), (3, 2)), batch=1, embed=8)
    q = (x + pos).requires_grad_()
    v = x.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda q, v: ours(q, ref, v, shapes, starts), (q, v), atol=1e-6)


def test_msdeformattn_bad_inputs():
    _, ours = msda_pair()
    x, pos, shapes, starts, ref = msda_inputs()
    with pytest.raises(ValueError, match=r"expected query \(B, Q, 32\)"):
        ours(x[..., :16], ref, x, shapes, starts)
    with pytest.raises(ValueError, match="reference_points"):
        ours(x, ref[:, :, :2], x, shapes, starts)
    with pytest.raises(ValueError, match="spatial_shapes"):
        ours(x, ref, x, shapes[:2], starts[:2])
    with pytest.raises(ValueError, match="value_padding_mask"):
        ours(x, ref, x, shapes, starts, value_padding_mask=torch.zeros(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="divisible"):
        MSDeformAttn(embed_dim=30, num_heads=4)


# ------------------------------------------------------------------------------------------------
# attention, masks, MLP
# ------------------------------------------------------------------------------------------------


def test_multihead_attention_matches_nn_multiheadattention_with_per_head_mask():
    torch.manual_seed(0)
    B, Q, S, C, H = 2, 5, 11, 16, 4
    ref = perturb_(torch.nn.MultiheadAttention(C, H)).double().eval()
    ours = MultiHeadAttention(embed_dim=C, num_heads=H).double().eval()
    w, b = ref.in_proj_weight.chunk(3), ref.in_proj_bias.chunk(3)
    with torch.no_grad():
        for proj, wi, bi in zip((ours.q_proj, ours.k_proj, ours.v_proj), w, b):
            proj.weight.copy_(wi)
            proj.bias.copy_(bi)
        ours.out_proj.load_state_dict(ref.out_proj.state_dict())
    q, k, v = (torch.randn(B, n, C, dtype=torch.float64) for n in (Q, S, S))
    blocked = torch.rand(B, Q, S) < 0.5
    blocked[:, :, 0] = False  # no empty rows here (nn.MultiheadAttention would give NaN)
    with torch.no_grad():
        expected, _ = ref(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                          attn_mask=blocked.repeat_interleave(H, dim=0))  # (B*H, Q, S), head-major per sample
        got = ours(q, k, v, attn_mask=~blocked[:, None])  # (B, 1, Q, S) broadcast over heads
    torch.testing.assert_close(got, expected.transpose(0, 1), **F64)


def test_masked_attention_mask_matches_transformers_rule():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 6, 16, 20, generator=g, dtype=torch.float64) * 3
    logits[0, 2] = -torch.rand(16, 20, generator=g, dtype=torch.float64) - 0.1  # empty mask: reset row
    logits[1, 4] = 5.0  # full mask
    size = (4, 5)
    # transformers: interpolate, sigmoid < 0.5, repeat per head, then un-mask rows that are all masked
    r = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
    hf_mask = (r.sigmoid().flatten(2).unsqueeze(1).repeat(1, 3, 1, 1).flatten(0, 1) < 0.5)
    hf_mask = hf_mask * (hf_mask.sum(-1) != hf_mask.shape[-1])[..., None]
    ours = masked_attention_mask(logits, size)  # (B, 1, Q, hw), True = attend
    assert ours.shape == (2, 1, 6, 20) and ours.dtype == torch.bool
    assert torch.equal(~ours.expand(2, 3, 6, 20).flatten(0, 1), hf_mask)
    assert ours[0, 0, 2].all() and ours[1, 0, 4].all()
    assert 0 < ours.float().mean() < 1


def test_masked_rows_reset_keeps_attention_finite():
    attn = MultiHeadAttention(embed_dim=8, num_heads=2).double()
    x = torch.randn(1, 3, 8, dtype=torch.float64)
    logits = torch.full((1, 3, 4, 4), -1.0, dtype=torch.float64)  # every mask empty
    out = attn(x, torch.randn(1, 16, 8, dtype=torch.float64), torch.randn(1, 16, 8, dtype=torch.float64),
               attn_mask=masked_attention_mask(logits, (4, 4)))
    assert torch.isfinite(out).all()


def test_mlp_matches_transformers_prediction_head():
    hf = perturb_(hfm.Mask2FormerMLPPredictionHead(16, 24, 8, num_layers=3)).double()
    ours = MLP(input_dim=16, hidden_dim=24, output_dim=8, num_layers=3).double()
    ours.load_state_dict({f"layers.{k[0]}.{k.split('.')[-1]}": v for k, v in hf.state_dict().items()})
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    torch.testing.assert_close(ours(x), hf(x), **F64)
    with pytest.raises(ValueError, match="num_layers"):
        MLP(input_dim=2, hidden_dim=2, output_dim=2, num_layers=0)


def test_cross_attention_block_pre_and_post_norm():
    torch.manual_seed(0)
    x, mem, pos = torch.randn(2, 4, 8).double(), torch.randn(2, 9, 8).double(), torch.randn(1, 4, 8).double()
    for pre in (False, True):
        blk = perturb_(CrossAttentionBlock(embed_dim=8, num_heads=2, pre_norm=pre)).double()
        got = blk(x, mem, mem, query_pos=pos)
        h = blk.norm(x) if pre else x
        y = blk.attn(h + pos, mem, mem)
        torch.testing.assert_close(got, x + y if pre else blk.norm(x + y), **F64)
