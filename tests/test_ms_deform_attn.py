"""API-level tests of maskformers.ops.ms_deform_attn: validation, backend choice, custom-op plumbing.

Numerical agreement of the native kernels with the reference is in test_ms_deform_attn_native.py.
"""

from __future__ import annotations

import math
import re
import warnings

import pytest
import torch
import torch.nn.functional as F

from maskformers.ops import ms_deform_attn, ms_deform_attn_reference, resolve_backend
from maskformers.ops import build, toolchain
import maskformers.ops.functional as msda_impl


def make_inputs(
    shapes=((3, 4), (1, 1), (7, 5)), batch=2, queries=6, heads=2, head_dim=5, points=3,
    dtype=torch.float64, seed=0,
):
    g = torch.Generator().manual_seed(seed)
    spatial_shapes = torch.tensor(shapes, dtype=torch.int64)
    areas = spatial_shapes.prod(1)
    level_start_index = torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]])
    S, L = int(areas.sum()), len(shapes)
    value = torch.randn(batch, S, heads, head_dim, generator=g, dtype=dtype)
    locations = torch.rand(batch, queries, heads, L, points, 2, generator=g, dtype=dtype) * 1.4 - 0.2
    weights = torch.rand(batch, queries, heads, L, points, generator=g, dtype=dtype)
    return value, spatial_shapes, level_start_index, locations, weights


def naive_msda(value, spatial_shapes, level_start_index, locations, weights):
    """Loop-by-loop bilinear sampling in float64, independent of grid_sample."""
    B, S, H, D = value.shape
    _, Q, _, L, P, _ = locations.shape
    out = torch.zeros(B, Q, H, D, dtype=torch.float64)
    v = value.double()
    for b in range(B):
        for q in range(Q):
            for h in range(H):
                for lvl in range(L):
                    hl, wl = (int(t) for t in spatial_shapes[lvl])
                    start = int(level_start_index[lvl])
                    for p in range(P):
                        x = float(locations[b, q, h, lvl, p, 0]) * wl - 0.5
                        y = float(locations[b, q, h, lvl, p, 1]) * hl - 0.5
                        x0, y0 = math.floor(x), math.floor(y)
                        acc = torch.zeros(D, dtype=torch.float64)
                        for yy, xx, wgt in ((y0, x0, (y0 + 1 - y) * (x0 + 1 - x)), (y0, x0 + 1, (y0 + 1 - y) * (x - x0)),
                                            (y0 + 1, x0, (y - y0) * (x0 + 1 - x)), (y0 + 1, x0 + 1, (y - y0) * (x - x0))):
                            if 0 <= yy < hl and 0 <= xx < wl:
                                acc += wgt * v[b, start + yy * wl + xx, h]
                        out[b, q, h] += float(weights[b, q, h, lvl, p]) * acc
    return out.view(B, Q, H * D)


# The native CPU kernel must work wherever a C++ compiler and ninja exist (CI included): a failed build
# there fails these tests instead of skipping them.
needs_native_cpu = pytest.mark.skipif(
    toolchain.cxx_compiler() is None or toolchain.ninja_path() is None,
    reason="no C++ compiler or ninja to build the native kernel",
)


# ----------------------------------------------------------------------------------------------
# reference semantics
# ----------------------------------------------------------------------------------------------


def test_reference_matches_loop_implementation():
    inputs = make_inputs()
    torch.testing.assert_close(ms_deform_attn_reference(*inputs), naive_msda(*inputs), rtol=1e-12, atol=1e-12)


def test_reference_single_level_equals_grid_sample_of_the_map():
    # one point with weight 1 at every pixel centre reproduces the value map exactly
    h, w, D = 4, 6, 3
    value = torch.randn(1, h * w, 1, D, dtype=torch.float64)
    ys, xs = torch.meshgrid(
        (torch.arange(h, dtype=torch.float64) + 0.5) / h, (torch.arange(w, dtype=torch.float64) + 0.5) / w, indexing="ij"
    )
    loc = torch.stack([xs, ys], -1).reshape(1, h * w, 1, 1, 1, 2)
    out = ms_deform_attn_reference(
        value, torch.tensor([[h, w]]), torch.tensor([0]), loc, torch.ones(1, h * w, 1, 1, 1, dtype=torch.float64)
    )
    torch.testing.assert_close(out, value.view(1, h * w, D), rtol=0, atol=1e-14)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reference_is_sound_in_16_bit(dtype):
    # torch's CPU grid_sample gives NaN (bfloat16) or wrong values (float16) for 16-bit inputs with the
    # (B*H, D, h, w) strides a plain permute of value produces; the reference must not inherit that.
    value, shapes, starts, loc, w = make_inputs(
        shapes=((12, 12), (6, 6)), batch=1, queries=400, heads=8, head_dim=32, points=4, dtype=torch.float64
    )
    loc = loc.clamp(0, 1)  # inside the levels: the error bound below is then the rounding of the inputs
    out = ms_deform_attn_reference(value.to(dtype), shapes, starts, loc.to(dtype), w.to(dtype))
    truth = ms_deform_attn_reference(value, shapes, starts, loc, w)
    assert torch.isfinite(out).all()
    # 16-bit coordinates move a sample by up to one grid step of the level (12 * 2**-8 px in bfloat16)
    torch.testing.assert_close(out.double(), truth, rtol=0, atol=0.5 if dtype == torch.bfloat16 else 0.05)  # seen: 0.27, 0.028


# ----------------------------------------------------------------------------------------------
# validation: every bad input raises a clear error naming the argument
# ----------------------------------------------------------------------------------------------


def _replace(inputs, index, new):
    inputs = list(inputs)
    inputs[index] = new
    return inputs


BAD_INPUTS = [
    ("value rank", lambda i: _replace(i, 0, i[0][0]), ValueError, "expected value (B, S, H, D)"),
    ("value int", lambda i: _replace(i, 0, i[0].long()), TypeError, "value must be float32"),
    ("shapes rank", lambda i: _replace(i, 1, i[1].flatten()), ValueError, "expected spatial_shapes (L, 2)"),
    ("shapes float", lambda i: _replace(i, 1, i[1].double()), TypeError, "spatial_shapes must be int64"),
    ("start len", lambda i: _replace(i, 2, i[2][:2]), ValueError, "level_start_index (3,)"),
    ("loc rank", lambda i: _replace(i, 3, i[3][..., 0]), ValueError, "expected sampling_locations (B, Q, H, L, P, 2)"),
    ("loc batch", lambda i: _replace(i, 3, i[3][:1]), ValueError, "got B=1"),
    ("loc heads", lambda i: _replace(i, 3, i[3][:, :, :1]), ValueError, "H=1"),
    ("loc levels", lambda i: _replace(i, 3, i[3][:, :, :, :2]), ValueError, "L=2"),
    ("weights shape", lambda i: _replace(i, 4, i[4][..., :2]), ValueError, "expected attention_weights (B, Q, H, L, P)"),
    ("weights int", lambda i: _replace(i, 4, i[4].long()), TypeError, "attention_weights must be a floating-point"),
    ("list with a start index", lambda i: _replace(i, 1, [[3, 4], [1, 1], [7, 5]]), ValueError,
     "pass level_start_index=None with spatial_shapes as a list"),
    ("not a table", lambda i: _replace(_replace(i, 1, "3x4"), 2, None), TypeError,
     "spatial_shapes must be an (L, 2) int64 tensor or a list of (h, w) pairs"),
    ("list that does not cover S", lambda i: _replace(_replace(i, 1, [(3, 4), (1, 1), (7, 6)]), 2, None), ValueError,
     "cover sum(h*w) = 55 positions but value has S = 48"),
    ("meta device", lambda i: _replace(i, 3, i[3].to("meta")), ValueError, "sampling_locations is on meta"),
]

BAD_VALUES = [
    ("sum h*w", lambda i: _replace(i, 1, torch.tensor([[3, 4], [1, 1], [7, 6]])), "sum(h*w) = 55 positions but value has S = 48"),
    ("zero level", lambda i: _replace(i, 1, torch.tensor([[0, 4], [1, 1], [7, 5]])), "spatial_shapes[0] = (0, 4)"),
    ("negative", lambda i: _replace(i, 1, torch.tensor([[-3, -4], [1, 1], [7, 5]])), "spatial_shapes[0] = (-3, -4)"),
    ("starts", lambda i: _replace(i, 2, torch.tensor([0, 12, 14])), "level_start_index [0, 12, 14] is inconsistent"),
]


@pytest.mark.parametrize("case", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_metadata_raises(case):
    # checked before a backend is chosen, so this holds for every backend
    _, mutate, exc, message = case
    with pytest.raises(exc, match=re.escape(message)):
        ms_deform_attn(*mutate(make_inputs()))


@pytest.mark.parametrize("backend", ["reference", pytest.param("native", marks=needs_native_cpu)])
@pytest.mark.parametrize("case", BAD_VALUES, ids=[c[0] for c in BAD_VALUES])
def test_bad_level_table_raises(case, backend):
    _, mutate, message = case
    with pytest.raises(ValueError, match=re.escape(message)):
        ms_deform_attn(*mutate(make_inputs()), backend=backend)




def test_unknown_backend_raises():
    with pytest.raises(ValueError, match="backend must be None, 'native' or 'reference', got 'cuda'"):
        ms_deform_attn(*make_inputs(), backend="cuda")


# ----------------------------------------------------------------------------------------------
# backend choice and fallback
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def native_broken(monkeypatch):
    def fail(device_type, op="ms_deform_attn"):
        raise build.NativeOpUnavailable("simulated: compiler missing")

    monkeypatch.setattr(build, "load_extension", fail)
    monkeypatch.setattr(msda_impl, "_warned_fallback", set())
    monkeypatch.delenv(msda_impl.STRICT_ENV, raising=False)
    return monkeypatch


def test_fallback_warns_once_with_reason_and_matches_reference(native_broken):
    inputs = make_inputs()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out1 = ms_deform_attn(*inputs)
        out2 = ms_deform_attn(*inputs)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1
    assert "simulated: compiler missing" in messages[0] and "reference" in messages[0]
    torch.testing.assert_close(out1, ms_deform_attn_reference(*inputs), rtol=0, atol=0)
    torch.testing.assert_close(out2, out1, rtol=0, atol=0)


def test_strict_mode_turns_fallback_into_error(native_broken):
    native_broken.setenv(msda_impl.STRICT_ENV, "1")
    with pytest.raises(RuntimeError, match="MASKFORMERS_STRICT_OPS is set.*simulated: compiler missing"):
        ms_deform_attn(*make_inputs())
    # asking for the reference explicitly is not a fallback
    ms_deform_attn(*make_inputs(), backend="reference")


def test_explicit_native_never_falls_back(native_broken):
    with pytest.raises(RuntimeError, match="backend='native' is unavailable on cpu: simulated"):
        ms_deform_attn(*make_inputs(), backend="native")


@needs_native_cpu
def test_none_picks_native_when_available():
    assert resolve_backend(None, torch.device("cpu")) == "native"


# ----------------------------------------------------------------------------------------------
# native custom op plumbing
# ----------------------------------------------------------------------------------------------


@needs_native_cpu
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_non_contiguous_inputs_give_correct_results(dtype):
    value, shapes, starts, loc, w = make_inputs(dtype=dtype, head_dim=4)
    # build non-contiguous views holding the same numbers
    value_nc = value.transpose(2, 3).contiguous().transpose(2, 3)
    loc_nc = loc.flip(-1).contiguous().flip(-1)
    w_nc = torch.cat([w, w], dim=-1)[..., : w.shape[-1]]
    assert not (value_nc.is_contiguous() or w_nc.is_contiguous())
    out = ms_deform_attn(value_nc, shapes, starts, loc_nc, w_nc, backend="native")
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(out, naive_msda(value, shapes, starts, loc, w).to(dtype), rtol=tol, atol=tol)


@needs_native_cpu
def test_low_precision_locations_and_weights_are_accepted():
    value, shapes, starts, loc, w = make_inputs(dtype=torch.float32)
    out = ms_deform_attn(value.bfloat16(), shapes, starts, loc.bfloat16(), w.half(), backend="native")
    assert out.dtype == torch.bfloat16
    ref = naive_msda(value.bfloat16().float(), shapes, starts, loc.bfloat16().float(), w.half().float())
    torch.testing.assert_close(out.double(), ref, rtol=2e-2, atol=2e-2)


@needs_native_cpu
def test_empty_batch_and_queries():
    value, shapes, starts, loc, w = make_inputs()
    out = ms_deform_attn(value[:0], shapes, starts, loc[:0], w[:0], backend="native")
    assert out.shape == (0, loc.shape[1], value.shape[2] * value.shape[3])
    out = ms_deform_attn(value, shapes, starts, loc[:, :0], w[:, :0], backend="native")
    assert out.shape == (value.shape[0], 0, value.shape[2] * value.shape[3])


@needs_native_cpu
def test_spatial_shapes_given_as_int32():
    value, shapes, starts, loc, w = make_inputs()
    out = ms_deform_attn(value, shapes.int(), starts.int(), loc, w, backend="native")
    torch.testing.assert_close(out, ms_deform_attn_reference(value, shapes, starts, loc, w), rtol=1e-12, atol=1e-12)


@needs_native_cpu
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_opcheck(dtype):
    value, shapes, starts, loc, w = make_inputs(dtype=dtype)
    for t in (value, loc, w):
        t.requires_grad_(True)
    torch.library.opcheck(torch.ops.maskformers.ms_deform_attn.default, (value, shapes, starts, loc, w))
    grad = torch.randn(value.shape[0], loc.shape[1], value.shape[2] * value.shape[3], dtype=dtype)
    torch.library.opcheck(
        torch.ops.maskformers.ms_deform_attn_backward.default,
        (value.detach(), shapes, starts, loc.detach(), w.detach(), grad),
    )


@needs_native_cpu
def test_torch_compile_fullgraph_matches_eager():
    value, shapes, starts, loc, w = make_inputs(dtype=torch.float32)

    def layer(value, offsets, logits):
        # a miniature MSDeformAttn: locations from offsets, softmax over levels*points, then the op
        B, Q, H, L, P = logits.shape
        weights = logits.flatten(-2).softmax(-1).view(B, Q, H, L, P)
        out = ms_deform_attn(value, shapes, starts, (loc + offsets).clamp(-0.5, 1.5), weights)
        return F.relu(out).sum()

    offsets = torch.randn_like(loc) * 0.01
    logits = torch.randn_like(w)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    args = [t.clone().requires_grad_(True) for t in (value, offsets, logits)]
    args_c = [t.clone().requires_grad_(True) for t in (value, offsets, logits)]
    eager = layer(*args)
    eager.backward()
    comp = compiled(*args_c)
    comp.backward()
    torch.testing.assert_close(comp, eager)
    for a, b in zip(args_c, args):
        torch.testing.assert_close(a.grad, b.grad)


# ----------------------------------------------------------------------------- one switch per model
def test_set_backend_and_use_backend(monkeypatch):
    from maskformers.layers import DeformableEncoder
    from maskformers.ops import functional, set_backend, use_backend

    calls = []
    real = functional.ms_deform_attn_reference
    monkeypatch.setattr(functional, "ms_deform_attn_reference", lambda *a: calls.append(1) or real(*a))
    encoder = DeformableEncoder(num_layers=3, embed_dim=16, num_heads=2, num_levels=2, num_points=1, ffn_dim=8)
    layers = [m for m in encoder.modules() if hasattr(m, "op_backend")]
    assert len(layers) == 3 and all(m.op_backend is None for m in layers)
    assert set_backend(encoder, "reference") is encoder
    assert all(m.op_backend == "reference" for m in layers)
    x = torch.randn(1, 4 * 4 + 2 * 2, 16)
    shapes = [(4, 4), (2, 2)]
    encoder(x, torch.zeros_like(x), shapes)
    assert len(calls) == 3
    set_backend(encoder, None)
    calls.clear()
    with use_backend("reference"):
        encoder(x, torch.zeros_like(x), shapes)
        assert functional.resolve_backend(None, x.device) == "reference"
    assert len(calls) == 3
    with use_backend("native"):  # a layer's own choice wins over the thread default
        assert functional.resolve_backend("reference", x.device) == "reference"
    from maskformers.ops.backend import default_backend

    assert default_backend() is None  # restored on exit
    with pytest.raises(ValueError, match="backend must be None, 'native' or 'reference', got 'cuda'"):
        set_backend(encoder, "cuda")
    with pytest.raises(ValueError, match="backend must be"):
        with use_backend("fast"):
            pass
    with pytest.raises(ValueError, match="Linear has no layer that calls a maskformers op"):
        set_backend(torch.nn.Linear(2, 2), "reference")


def test_native_reason_carries_the_constant_result_marker():
    """functional.py marks _native_reason by hand (the decorator would import torch._dynamo at import time)."""
    from maskformers.ops import functional

    def probe(device_type: str) -> str:
        return device_type

    marked = torch.compiler.assume_constant_result(probe)
    markers = {k: v for k, v in vars(marked).items()}
    assert markers and all(getattr(functional._native_reason, k, None) == v for k, v in markers.items())


def test_import_is_cheap():
    """import maskformers / maskformers.ops import neither torch._dynamo, timm, PIL, huggingface_hub nor scipy."""
    import subprocess
    import sys

    code = (
        "import sys, maskformers, maskformers.ops; "
        "print(sorted(m for m in ('torch._dynamo', 'timm', 'PIL', 'huggingface_hub', 'scipy', 'transformers') "
        "if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


@pytest.mark.parametrize("backend", ["reference", pytest.param("native", marks=needs_native_cpu)])
def test_level_shapes_as_python_ints_match_the_tensor_form(backend):
    value, shapes, starts, loc, w = make_inputs(dtype=torch.float64)
    as_list = [tuple(int(v) for v in row) for row in shapes.tolist()]
    expected = ms_deform_attn(value, shapes, starts, loc, w, backend=backend)
    torch.testing.assert_close(ms_deform_attn(value, as_list, None, loc, w, backend=backend), expected, rtol=0, atol=0)


# ----------------------------------------------------------------------------- double backward
@needs_native_cpu
def test_double_backward_through_native_raises_at_the_first_backward():
    # issue 9 item 17: the first gradients used to claim requires_grad=True and the second backward failed
    # with torch's generic "no autograd formula"; now the first backward refuses and names the way out
    value, shapes, starts, loc, w = make_inputs()
    inputs = tuple(t.requires_grad_() for t in (value, loc, w))
    out = ms_deform_attn(value, shapes, starts, loc, w, backend="native")
    with pytest.raises(RuntimeError, match=r"no double backward.*create_graph=True.*backend='reference'"):
        torch.autograd.grad(out.square().sum(), inputs, create_graph=True)
    # only the graph-building backward is refused: plain first-order gradients are unaffected
    grads = torch.autograd.grad(ms_deform_attn(value, shapes, starts, loc, w, backend="native").sum(), inputs)
    assert not any(g.requires_grad for g in grads)


def _grid_sample_has_double_backward() -> bool:
    x = torch.zeros(1, 1, 2, 2, dtype=torch.float64, requires_grad=True)
    grid = torch.zeros(1, 1, 1, 2, dtype=torch.float64, requires_grad=True)
    (gx,) = torch.autograd.grad(torch.nn.functional.grid_sample(x, grid, align_corners=False).sum(), grid,
                                create_graph=True)
    try:
        torch.autograd.grad(gx.sum(), x)
    except RuntimeError:
        return False
    return True


@pytest.mark.skipif(not _grid_sample_has_double_backward(),
                    reason="this torch's grid_sample has no second derivative (torch 2.11 lacks it, 2.13 has it)")
def test_reference_backend_gives_second_derivatives():
    value, shapes, starts, loc, w = make_inputs(
        shapes=((3, 2), (2, 3)), batch=1, queries=2, heads=1, head_dim=2, points=2)
    with torch.no_grad():  # keep finite differences away from the bilinear kinks
        pix = loc * torch.tensor([[2.0, 3.0], [3.0, 2.0]], dtype=loc.dtype)[:, None, :] - 0.5
        loc.add_(torch.where((pix - pix.round()).abs() < 1e-2, 0.02, 0.0))

    def fn(v, l, a):
        return ms_deform_attn(v, shapes, starts, l, a, backend="reference")

    inputs = tuple(t.requires_grad_() for t in (value, loc, w))
    assert torch.autograd.gradgradcheck(fn, inputs, eps=1e-6, atol=1e-6)
