"""Numerical tests of the native CPU kernel of ms_deform_attn against the grid_sample reference.

float64 forward and all three gradients on random awkward shapes, gradcheck through the functional,
16-bit accuracy measured against a float64 truth next to the reference's own error in that dtype,
border/corner/far-outside locations, the grouped (multi-buffer) backward, empty inputs and the C++
argument checks of direct calls.
"""

from __future__ import annotations

import math
import shutil

import pytest
import torch

from maskformers.ops import build, ms_deform_attn, ms_deform_attn_reference

LEVEL_POOL = ((1, 1), (7, 5), (3, 11), (2, 2), (4, 6), (5, 1), (1, 9), (6, 7))
HEAD_DIMS = (1, 3, 5, 6, 17, 24, 33)


@pytest.fixture(scope="session")
def ext():
    """The CPU extension, built once per session (skipped only when no compiler or ninja exists)."""
    try:
        return build.load_extension("cpu")
    except build.NativeOpUnavailable as exc:
        if shutil.which("c++") is None or shutil.which("ninja") is None:
            pytest.skip(f"native CPU kernel cannot be built here: {exc}")
        raise


def level_table(shapes):
    spatial_shapes = torch.tensor(shapes, dtype=torch.int64)
    areas = spatial_shapes.prod(1)
    level_start_index = torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]])
    return spatial_shapes, level_start_index, int(areas.sum())


def random_problem(seed, dtype=torch.float64, lo=-0.3, hi=1.3):
    """Random sizes: 1-4 levels from LEVEL_POOL, head dims that are not powers of two, 1-8 points."""
    g = torch.Generator().manual_seed(seed)

    def pick(n):
        return int(torch.randint(0, n, (1,), generator=g))

    # levels, points and head dims cycle with the seed so that 16 seeds cover every value
    L, P, D = 1 + seed % 4, 1 + (3 * seed) % 8, HEAD_DIMS[seed % len(HEAD_DIMS)]
    shapes = [LEVEL_POOL[pick(len(LEVEL_POOL))] for _ in range(L)]
    B, Q, H = 1 + pick(3), 1 + pick(13), 1 + pick(4)
    spatial_shapes, level_start_index, S = level_table(shapes)
    value = torch.randn(B, S, H, D, generator=g, dtype=dtype)
    locations = torch.rand(B, Q, H, L, P, 2, generator=g, dtype=dtype) * (hi - lo) + lo
    weights = torch.rand(B, Q, H, L, P, generator=g, dtype=dtype)
    return value, spatial_shapes, level_start_index, locations, weights


def reference_with_grads(value, spatial_shapes, level_start_index, locations, weights, grad_out):
    v, loc, w = (t.detach().clone().requires_grad_() for t in (value, locations, weights))
    out = ms_deform_attn_reference(v, spatial_shapes, level_start_index, loc, w)
    grads = torch.autograd.grad(out, (v, loc, w), grad_out)
    return out.detach(), grads


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


def away_from_kinks(locations, spatial_shapes, margin=1e-3):
    """Move locations whose pixel coordinate is within `margin` of an integer (where bilinear
    interpolation has a kink) so that finite differences see a smooth function."""
    sizes = spatial_shapes.flip(1).to(locations.dtype)  # (L, 2) as (w, h), matching (x, y)
    pix = locations * sizes[:, None, :] - 0.5
    frac = pix - pix.floor()
    near = (frac < margin) | (frac > 1 - margin)
    return torch.where(near, locations + 3 * margin / sizes[:, None, :], locations)


# ----------------------------------------------------------------------------------------------
# float64 agreement with the reference
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(16))
def test_forward_and_gradients_match_reference_float64(ext, seed):
    value, shapes, starts, loc, w = random_problem(seed)
    g = torch.Generator().manual_seed(1000 + seed)
    grad_out = torch.randn(value.shape[0], loc.shape[1], value.shape[2] * value.shape[3], generator=g, dtype=torch.float64)
    ref_out, (ref_gv, ref_gl, ref_gw) = reference_with_grads(value, shapes, starts, loc, w, grad_out)

    out = ext.forward(value, shapes, starts, loc, w)
    gv, gl, gw = ext.backward(value, shapes, starts, loc, w, grad_out)

    assert out.dtype == torch.float64 and out.shape == ref_out.shape
    assert gv.dtype == torch.float64 and gl.dtype == torch.float64 and gw.dtype == torch.float64
    torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-12)
    torch.testing.assert_close(gv, ref_gv, rtol=0, atol=1e-12)
    torch.testing.assert_close(gw, ref_gw, rtol=0, atol=1e-12)
    # location gradients scale with the level size (d x_pixel / d x = w)
    torch.testing.assert_close(gl, ref_gl, rtol=0, atol=1e-10)


@pytest.mark.parametrize("heads", [1, 4])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_backward_work_split_matches_reference(ext, threads, heads):
    # The backward splits (batch, head block, query group) over threads: one head with several threads
    # gives query groups with private grad_value buffers summed at the end; four heads give blocks of
    # 4, 2 or 1 heads depending on the thread count.
    g = torch.Generator().manual_seed(heads * 10 + threads)
    shapes, starts, S = level_table([(7, 5), (3, 11), (1, 1)])
    Q, L, P, D = 23, 3, 4, 6
    value = torch.randn(1, S, heads, D, generator=g, dtype=torch.float64)
    loc = torch.rand(1, Q, heads, L, P, 2, generator=g, dtype=torch.float64) * 1.2 - 0.1
    w = torch.rand(1, Q, heads, L, P, generator=g, dtype=torch.float64)
    grad_out = torch.randn(1, Q, heads * D, generator=g, dtype=torch.float64)
    _, (ref_gv, ref_gl, ref_gw) = reference_with_grads(value, shapes, starts, loc, w, grad_out)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        gv, gl, gw = ext.backward(value, shapes, starts, loc, w, grad_out)
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(gv, ref_gv, rtol=0, atol=1e-12)
    torch.testing.assert_close(gl, ref_gl, rtol=0, atol=1e-10)
    torch.testing.assert_close(gw, ref_gw, rtol=0, atol=1e-12)


def test_backward_is_deterministic(ext):
    value, shapes, starts, loc, w = random_problem(5)
    grad_out = torch.randn(value.shape[0], loc.shape[1], value.shape[2] * value.shape[3], dtype=torch.float64)
    first = ext.backward(value, shapes, starts, loc, w, grad_out)
    second = ext.backward(value, shapes, starts, loc, w, grad_out)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------------------------
# gradcheck through the functional
# ----------------------------------------------------------------------------------------------


def gradcheck_inputs(contiguous: bool):
    g = torch.Generator().manual_seed(7)
    shapes, starts, S = level_table([(3, 2), (1, 1), (2, 5)])
    B, Q, H, D, L, P = 2, 3, 2, 3, 3, 2
    if contiguous:
        value = torch.randn(B, S, H, D, generator=g, dtype=torch.float64)
        loc = torch.rand(B, Q, H, L, P, 2, generator=g, dtype=torch.float64) * 1.4 - 0.2
        w = torch.rand(B, Q, H, L, P, generator=g, dtype=torch.float64)
    else:  # same shapes, strided storage
        value = torch.randn(B, H, S, 2 * D, generator=g, dtype=torch.float64).transpose(1, 2)[..., ::2]
        loc = (torch.rand(Q, B, H, L, P, 2, generator=g, dtype=torch.float64) * 1.4 - 0.2).transpose(0, 1)
        w = torch.rand(B, Q, H, P, L, generator=g, dtype=torch.float64).transpose(3, 4)
        assert not (value.is_contiguous() or loc.is_contiguous() or w.is_contiguous())
    with torch.no_grad():
        loc.copy_(away_from_kinks(loc, shapes))
    return value, shapes, starts, loc, w


@pytest.mark.parametrize("contiguous", [True, False], ids=["contiguous", "strided"])
def test_gradcheck_native(ext, contiguous):
    value, shapes, starts, loc, w = gradcheck_inputs(contiguous)
    inputs = tuple(t.requires_grad_() for t in (value, loc, w))

    def fn(v, l, a):
        return ms_deform_attn(v, shapes, starts, l, a, backend="native")

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------------------------
# 16-bit accuracy
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_error_no_worse_than_twice_reference_error(ext, dtype):
    # Mask2Former-like sizes: locations near their query's own pixel, softmaxed weights
    g = torch.Generator().manual_seed(11)
    shapes, starts, S = level_table([(16, 20), (8, 10), (4, 5)])
    B, Q, H, D, L, P = 2, 40, 4, 24, 3, 4
    value = torch.randn(B, S, H, D, generator=g).to(dtype)
    centers = torch.rand(B, Q, 1, 1, 1, 2, generator=g)
    loc = (centers + 0.05 * torch.randn(B, Q, H, L, P, 2, generator=g)).contiguous()
    w = torch.rand(B, Q, H, L, P, generator=g).flatten(-2).softmax(-1).view(B, Q, H, L, P)
    grad_out = torch.randn(B, Q, H * D, generator=g).to(dtype)

    truth_out, truth_grads = reference_with_grads(value.double(), shapes, starts, loc.double(), w.double(), grad_out.double())
    ref_out, ref_grads = reference_with_grads(value, shapes, starts, loc, w, grad_out)

    v, l, a = (t.detach().clone().requires_grad_() for t in (value, loc, w))
    out = ms_deform_attn(v, shapes, starts, l, a, backend="native")
    nat_grads = torch.autograd.grad(out, (v, l, a), grad_out)
    assert out.dtype == dtype and nat_grads[0].dtype == dtype
    assert nat_grads[1].dtype == torch.float32 and nat_grads[2].dtype == torch.float32

    names = ("output", "grad_value", "grad_locations", "grad_weights")
    for name, nat, ref, truth in zip(names, (out, *nat_grads), (ref_out, *ref_grads), (truth_out, *truth_grads)):
        nat_err, ref_err = max_err(nat, truth), max_err(ref, truth)
        assert ref_err > 0, name
        # asked: <= 2x the reference's error; float32 accumulation gives ~0.1x (0 for the float32 location
        # and weight gradients), so 0.5x also catches a slide back to 16-bit accumulation
        assert nat_err <= 0.5 * ref_err, f"{name}: native error {nat_err:.3g} vs reference {ref_err:.3g} in {dtype}"


def test_float32_matches_float64_truth(ext):
    value, shapes, starts, loc, w = random_problem(2)
    grad_out = torch.randn(value.shape[0], loc.shape[1], value.shape[2] * value.shape[3], dtype=torch.float64,
                           generator=torch.Generator().manual_seed(2))
    truth_out, truth_grads = reference_with_grads(value, shapes, starts, loc, w, grad_out)
    out = ext.forward(value.float(), shapes, starts, loc.float(), w.float())
    grads = ext.backward(value.float(), shapes, starts, loc.float(), w.float(), grad_out.float())
    assert out.dtype == torch.float32 and all(t.dtype == torch.float32 for t in grads)
    assert max_err(out, truth_out) < 1e-5
    for nat, truth in zip(grads, truth_grads):
        assert max_err(nat, truth) < 1e-5 * max(1.0, truth.abs().max().item())


# ----------------------------------------------------------------------------------------------
# borders, corners and far-away locations
# ----------------------------------------------------------------------------------------------


def border_locations(shapes):
    """Per level: exact pixel centres, the image border, the -0.5/+0.5 pixel rings where a corner
    enters or leaves the level, and points far outside. Level sizes are powers of two, so every
    coordinate is exact in floating point."""
    per_level = []
    for h, w in shapes:
        xs = [0.0, 1.0, 0.5 / w, 1 - 0.5 / w, -0.5 / w, 1 + 0.5 / w, -1.0 / w, 1 + 1.0 / w, 0.5, 0.25 / w, -3.0, 7.5, 1e6, -1e6, 1e30]
        ys = [0.0, 1.0, 0.5 / h, 1 - 0.5 / h, -0.5 / h, 1 + 0.5 / h, -1.0 / h, 1 + 1.0 / h, 0.5, 0.75 / h, 2.0, -0.25, -1e6, 1e6, -1e30]
        grid = torch.tensor([(x, y) for x in xs for y in ys], dtype=torch.float64)
        per_level.append(grid)
    return per_level


def test_borders_corners_and_far_outside_match_reference(ext):
    shapes = [(4, 8), (1, 1), (2, 2), (8, 4)]
    spatial_shapes, starts, S = level_table(shapes)
    points = border_locations(shapes)
    P = points[0].shape[0]
    B, H, D = 1, 2, 3
    loc = torch.stack(points, dim=0)[None, None, None].expand(B, 1, H, len(shapes), P, 2).contiguous()
    g = torch.Generator().manual_seed(3)
    value = torch.randn(B, S, H, D, generator=g, dtype=torch.float64)
    w = torch.rand(B, 1, H, len(shapes), P, generator=g, dtype=torch.float64)
    grad_out = torch.randn(B, 1, H * D, generator=g, dtype=torch.float64)

    ref_out, (ref_gv, ref_gl, ref_gw) = reference_with_grads(value, spatial_shapes, starts, loc, w, grad_out)
    out = ext.forward(value, spatial_shapes, starts, loc, w)
    gv, gl, gw = ext.backward(value, spatial_shapes, starts, loc, w, grad_out)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-12)
    torch.testing.assert_close(gv, ref_gv, rtol=0, atol=1e-12)
    torch.testing.assert_close(gl, ref_gl, rtol=0, atol=1e-12)
    torch.testing.assert_close(gw, ref_gw, rtol=0, atol=1e-12)
    # the -0.5 pixel ring has a corner inside with weight 0 but a non-zero location gradient
    assert (gl != 0).any() and torch.isfinite(gl).all()


def test_locations_fully_outside_give_zeros(ext):
    shapes, starts, S = level_table([(3, 4), (2, 2)])
    value = torch.randn(1, S, 2, 4, dtype=torch.float64)
    loc = torch.full((1, 5, 2, 2, 3, 2), -0.75, dtype=torch.float64)
    loc[..., 1] = 1.9
    w = torch.rand(1, 5, 2, 2, 3, dtype=torch.float64)
    out = ext.forward(value, shapes, starts, loc, w)
    gv, gl, gw = ext.backward(value, shapes, starts, loc, w, torch.ones(1, 5, 8, dtype=torch.float64))
    assert torch.equal(out, torch.zeros_like(out))
    for grad in (gv, gl, gw):
        assert torch.equal(grad, torch.zeros_like(grad))


NONFINITE = (
    (math.nan, 0.3), (0.3, math.nan), (math.nan, math.nan), (math.inf, 0.4), (-math.inf, 0.6), (0.2, math.inf),
    (0.7, -math.inf), (math.inf, -math.inf), (math.nan, 1e30), (1e30, math.inf),
)


def nonfinite_problem(dtype):
    """Two levels, 3 heads; query 0 / head 1 gets one non-finite location per case (one case per batch
    entry), query 2 / head 0 a non-finite location with attention weight 0; everything else is finite
    (including huge finite locations, which read zeros)."""
    g = torch.Generator().manual_seed(21)
    shapes, starts, S = level_table([(4, 5), (3, 3)])
    B, Q, H, D, L, P = len(NONFINITE), 4, 3, 5, 2, 3
    value = torch.randn(B, S, H, D, generator=g, dtype=torch.float64)
    loc = torch.rand(B, Q, H, L, P, 2, generator=g, dtype=torch.float64) * 1.4 - 0.2
    w = torch.rand(B, Q, H, L, P, generator=g, dtype=torch.float64)
    loc[:, 3, 2, 0, 0] = torch.tensor([1e30, -1e30], dtype=torch.float64)  # finite, far outside
    for b, (x, y) in enumerate(NONFINITE):
        loc[b, 0, 1, b % L, b % P] = torch.tensor([x, y], dtype=torch.float64)
        loc[b, 2, 0, 1, 2] = torch.tensor([y, x], dtype=torch.float64)
        w[b, 2, 0, 1, 2] = 0.0
    grad_out = torch.randn(B, Q, H * D, generator=g, dtype=torch.float64)
    return value.to(dtype), shapes, starts, loc.to(dtype), w.to(dtype), grad_out.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_nonfinite_locations_propagate_nan_like_the_reference(ext, dtype):
    # issue 9 item 5: a NaN that vanishes hides a diverging run. Both backends follow grid_sample: the
    # (query, head) row turns NaN, so do its attention-weight gradient and the other coordinate's
    # location gradient; +-inf behaves like NaN (grid_sample gives NaN for +-inf too); grad_value stays finite.
    value, shapes, starts, loc, w, grad_out = nonfinite_problem(dtype)
    ref_out, (ref_gv, ref_gl, ref_gw) = reference_with_grads(value, shapes, starts, loc, w, grad_out)
    out = ext.forward(value, shapes, starts, loc, w)
    gv, gl, gw = ext.backward(value, shapes, starts, loc, w, grad_out)
    tol = dict(rtol=0, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    for name, nat, ref in (("out", out, ref_out), ("grad_value", gv, ref_gv), ("grad_locations", gl, ref_gl),
                           ("grad_weights", gw, ref_gw)):
        assert torch.equal(nat.isnan(), ref.isnan()), f"{name}: NaN pattern differs from the reference"
        torch.testing.assert_close(nat, ref, equal_nan=True, **tol, msg=name)

    B, Q, H, D = out.shape[0], loc.shape[1], value.shape[2], value.shape[3]
    rows = out.view(B, Q, H, D).isnan()
    expected = torch.zeros(B, Q, H, dtype=torch.bool)
    expected[:, 0, 1] = expected[:, 2, 0] = True  # weight 0 does not hide the NaN either
    assert torch.equal(rows.all(-1), expected) and torch.equal(rows.any(-1), expected)
    assert torch.isfinite(gv).all()
    for b, (x, y) in enumerate(NONFINITE):
        l, p = b % loc.shape[3], b % loc.shape[4]
        assert gw[b, 0, 1, l, p].isnan() and gw[b, 2, 0, 1, 2].isnan()
        gx, gy = gl[b, 0, 1, l, p].tolist()
        assert math.isnan(gx) == (not math.isfinite(y)) and math.isnan(gy) == (not math.isfinite(x)), (x, y, gx, gy)
        if math.isfinite(y):
            assert gx == 0.0
    # everything not touched by a non-finite location stays finite
    assert gw.isnan().sum() == 2 * B and gl.isnan().any(-1).sum() == 2 * B
    assert out[:, 3].isfinite().all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_nonfinite_locations_16bit(ext, dtype):
    # grid_sample's own 16-bit CPU path is unreliable here (see reference.py), so this checks the
    # native kernel against its float32 result: same NaN pattern everywhere
    value, shapes, starts, loc, w, grad_out = nonfinite_problem(torch.float32)
    out32 = ext.forward(value, shapes, starts, loc, w)
    grads32 = ext.backward(value, shapes, starts, loc, w, grad_out)
    out = ext.forward(value.to(dtype), shapes, starts, loc, w)
    grads = ext.backward(value.to(dtype), shapes, starts, loc, w, grad_out.to(dtype))
    for a, b in zip((out, *grads), (out32, *grads32)):
        assert torch.equal(a.isnan(), b.isnan())


# ----------------------------------------------------------------------------------------------
# empty inputs and direct-call argument checks
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("empty", ["batch", "queries"])
def test_empty_inputs(ext, empty, dtype):
    value, shapes, starts, loc, w = random_problem(4, dtype=torch.float64)
    cdt = torch.float32
    value, loc, w = value.to(dtype), loc.to(cdt), w.to(cdt)
    if empty == "batch":
        value, loc, w = value[:0], loc[:0], w[:0]
    else:
        loc, w = loc[:, :0].contiguous(), w[:, :0].contiguous()
    B, _, H, D = value.shape
    out = ext.forward(value, shapes, starts, loc, w)
    assert out.shape == (B, loc.shape[1], H * D) and out.dtype == dtype
    gv, gl, gw = ext.backward(value, shapes, starts, loc, w, torch.zeros(B, loc.shape[1], H * D, dtype=dtype))
    assert gv.shape == value.shape and gv.dtype == dtype and not gv.any()
    assert gl.shape == loc.shape and gw.shape == w.shape


def direct_inputs():
    value, shapes, starts, loc, w = random_problem(6)
    return dict(value=value, spatial_shapes=shapes, level_start_index=starts, sampling_locations=loc, attention_weights=w)


BAD_DIRECT_CALLS = {
    "level sizes do not cover S": (
        lambda a: a["spatial_shapes"][-1, 1].add_(1), "spatial_shapes cover more positions than value has"),
    "level sizes cover less than S": (
        lambda a: a["spatial_shapes"][-1, 0].sub_(1) if a["spatial_shapes"][-1, 0] > 1 else a["spatial_shapes"][-1, 1].sub_(1),
        "spatial_shapes cover sum\\(h\\*w\\) = "),
    "inconsistent starts": (
        lambda a: a.update(level_start_index=a["level_start_index"] + 1), "level_start_index\\[0\\] = 1"),
    "zero-sized level": (
        lambda a: a.update(spatial_shapes=a["spatial_shapes"] * 0), "every level needs 1 <= h, w"),
    "int32 level table": (
        lambda a: a.update(spatial_shapes=a["spatial_shapes"].int()), "must be int64"),
    "float32 locations for float64 value": (
        lambda a: a.update(sampling_locations=a["sampling_locations"].float()), "sampling_locations must be Double"),
    "non-contiguous value": (
        lambda a: a.update(value=a["value"].transpose(0, 1).contiguous().transpose(0, 1)), "value must be contiguous"),
    "weights of the wrong shape": (
        lambda a: a.update(attention_weights=a["attention_weights"][..., :-1]), "expected attention_weights"),
    "locations of the wrong rank": (
        lambda a: a.update(sampling_locations=a["sampling_locations"][..., 0]), "expected sampling_locations"),
    "integer value": (
        lambda a: a.update(value=a["value"].long()), "value must be float32, float64, bfloat16 or float16"),
}


@pytest.mark.parametrize("case", list(BAD_DIRECT_CALLS))
def test_direct_call_argument_checks(ext, case):
    args = direct_inputs()
    if case == "non-contiguous value" and args["value"].shape[0] == 1:
        args["value"] = torch.cat([args["value"]] * 2)
        args["sampling_locations"] = torch.cat([args["sampling_locations"]] * 2)
        args["attention_weights"] = torch.cat([args["attention_weights"]] * 2)
    mutate, message = BAD_DIRECT_CALLS[case]
    mutate(args)
    with pytest.raises(RuntimeError, match=message):
        ext.forward(**args)
    grad_out = torch.zeros(3)
    with pytest.raises(RuntimeError, match=message):
        ext.backward(**args, grad_output=grad_out)


def test_direct_call_checks_grad_output(ext):
    args = direct_inputs()
    B, Q = args["value"].shape[0], args["sampling_locations"].shape[1]
    HD = args["value"].shape[2] * args["value"].shape[3]
    with pytest.raises(RuntimeError, match="expected grad_output \\(B, Q, H\\*D\\)"):
        ext.backward(**args, grad_output=torch.zeros(B, Q, HD + 1, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="grad_output must be Double"):
        ext.backward(**args, grad_output=torch.zeros(B, Q, HD, dtype=torch.float32))
