"""API-level tests of maskformers.ops.neighborhood_attention_2d: NATTEN semantics of the reference,
validation, backend choice and the custom-op plumbing (opcheck, torch.compile, double backward).

Numerical agreement of the native kernels with the reference is in test_neighborhood_attention_native.py.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import maskformers.ops.functional as dispatch
from maskformers.ops import build, neighborhood_attention_2d, neighborhood_attention_2d_reference, toolchain
from maskformers.ops.reference import neighborhood_windows

from natten_loops import natten2dav, natten2dqkrpb, natten_bias_start, natten_window_start

needs_native_cpu = pytest.mark.skipif(
    toolchain.cxx_compiler() is None or toolchain.ninja_path() is None,
    reason="no C++ compiler or ninja to build the native kernel",
)


def make_inputs(B=2, H=9, W=11, heads=2, D=5, kernel_size=3, dtype=torch.float64, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, W, heads, D, generator=g, dtype=dtype) for _ in range(3))
    side = 2 * kernel_size - 1
    rpb = torch.randn(heads, side, side, generator=g, dtype=dtype) if bias else None
    return q, k, v, rpb


def natten_loop_attention(q, k, v, rpb, kernel_size, dilation, scale):
    """softmax(natten2dqkrpb) -> natten2dav in NATTEN's layout, from the independent loop implementation."""
    to_natten = lambda t: t.permute(0, 3, 1, 2, 4)  # (B, H, W, heads, D) -> (B, heads, H, W, D)
    logits = natten2dqkrpb(to_natten(q) * scale, to_natten(k), rpb, kernel_size, dilation)
    out = natten2dav(logits.softmax(-1), to_natten(v), kernel_size, dilation)
    return out.permute(0, 2, 3, 1, 4)


# ----------------------------------------------------------------------------------------------
# semantics of the reference
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kernel_size", [1, 3, 5, 7, 11])
def test_windows_follow_natten(kernel_size):
    for dilation in range(1, 6):
        for length in range(kernel_size * dilation, kernel_size * dilation + 2 * dilation + 3):
            keys, bias = neighborhood_windows(length, kernel_size, dilation)
            for i in range(length):
                start = natten_window_start(i, length, kernel_size, dilation)
                assert keys[i].tolist() == [start + k * dilation for k in range(kernel_size)], (length, dilation, i)
                first = natten_bias_start(i, length, kernel_size, dilation)
                assert bias[i].tolist() == list(range(first, first + kernel_size)), (length, dilation, i)
            # every window lies inside the axis and in the query's dilation group
            assert keys.min() >= 0 and keys.max() < length
            assert ((keys - torch.arange(length)[:, None]) % dilation == 0).all()


@pytest.mark.parametrize("case", [(9, 11, 3, 1), (9, 11, 3, 3), (13, 10, 5, 2), (11, 12, 11, 1), (7, 15, 7, 1)])
def test_reference_matches_loop_implementation(case):
    H, W, K, d = case
    q, k, v, rpb = make_inputs(B=2, H=H, W=W, heads=2, D=3, kernel_size=K, seed=H * W + d)
    ours = neighborhood_attention_2d_reference(q, k, v, rpb, kernel_size=K, dilation=d, scale=0.7)
    theirs = natten_loop_attention(q, k, v, rpb, K, d, 0.7)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)


def test_full_window_is_global_attention():
    # kernel covering the whole map: every pixel attends to all pixels, with the bias at its offset
    q, k, v, _ = make_inputs(B=1, H=5, W=5, heads=1, D=4, kernel_size=5, bias=False)
    out = neighborhood_attention_2d_reference(q, k, v, kernel_size=5)
    flat = lambda t: t.reshape(1, 25, 4)
    expected = torch.softmax(flat(q) @ flat(k).transpose(1, 2) / 2.0, -1) @ flat(v)
    torch.testing.assert_close(out.reshape(1, 25, 4), expected, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------

BAD_INPUTS = {
    "even kernel": (dict(kernel_size=4), ValueError, "kernel_size must be odd"),
    "kernel zero": (dict(kernel_size=0), ValueError, "kernel_size must be >= 1, got 0"),
    "kernel float": (dict(kernel_size=3.0), TypeError, "kernel_size must be an int"),
    "dilation zero": (dict(dilation=0), ValueError, "dilation must be >= 1, got 0"),
    "kernel times dilation above the map": (
        dict(kernel_size=5, dilation=2), ValueError, r"\(H, W\) = \(9, 11\).*kernel_size \* dilation = 5 \* 2 = 10"),
    "key shape": (dict(key=lambda k: k[:, :, :-1]), ValueError, "expected key of the query's shape"),
    "value dtype": (dict(value=lambda v: v.float()), TypeError, "value must be torch.float64 like query"),
    "rank": (dict(query=lambda q: q[0]), ValueError, r"expected query \(B, H, W, heads, D\)"),
    "integer query": (dict(query=lambda q: q.long()), TypeError, "query must be float32, float64"),
    "rpb shape": (dict(rpb=lambda r: r[:, :-1]), ValueError, r"expected rpb \(heads, 2K-1, 2K-1\) = \(2, 5, 5\)"),
    "rpb dtype": (dict(rpb=lambda r: r.float()), TypeError, "rpb must be torch.float64 like query"),
    "key device": (dict(key=lambda k: k.to("meta")), ValueError, "key is on meta but query is on cpu"),
    "scale": (dict(scale="big"), TypeError, "scale must be a float or None"),
}


@pytest.mark.parametrize("backend", ["reference", "native"])
@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_inputs_are_named(case, backend):
    q, k, v, rpb = make_inputs()
    args = dict(query=q, key=k, value=v, rpb=rpb, kernel_size=3, dilation=1)
    change, error, message = BAD_INPUTS[case]
    for name, new in change.items():
        args[name] = new(args[name]) if callable(new) else new
    with pytest.raises(error, match=message):
        neighborhood_attention_2d(**args, backend=backend)


def test_reference_validates_too():
    q, k, v, rpb = make_inputs()
    with pytest.raises(ValueError, match="kernel_size must be odd"):
        neighborhood_attention_2d_reference(q, k, v, rpb, kernel_size=2)


# ----------------------------------------------------------------------------------------------
# backend choice
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def native_broken(monkeypatch):
    def fail(device_type, op="ms_deform_attn"):
        raise build.NativeOpUnavailable(f"simulated: no {op} kernel")

    monkeypatch.setattr(build, "load_extension", fail)
    monkeypatch.setattr(dispatch, "_warned_fallback", set())
    monkeypatch.delenv(dispatch.STRICT_ENV, raising=False)
    return monkeypatch


def test_fallback_warns_once_naming_the_op(native_broken):
    q, k, v, rpb = make_inputs()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = neighborhood_attention_2d(q, k, v, rpb, kernel_size=3)
        neighborhood_attention_2d(q, k, v, rpb, kernel_size=3)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "neighborhood_attention" in messages[0] and "reference" in messages[0]
    torch.testing.assert_close(out, neighborhood_attention_2d_reference(q, k, v, rpb, kernel_size=3), rtol=0, atol=0)
    native_broken.setenv(dispatch.STRICT_ENV, "1")
    with pytest.raises(RuntimeError, match="MASKFORMERS_STRICT_OPS is set.*simulated: no neighborhood_attention"):
        neighborhood_attention_2d(q, k, v, rpb, kernel_size=3)
    with pytest.raises(RuntimeError, match="backend='native' is unavailable on cpu"):
        neighborhood_attention_2d(q, k, v, rpb, kernel_size=3, backend="native")


# ----------------------------------------------------------------------------------------------
# custom-op plumbing
# ----------------------------------------------------------------------------------------------


@needs_native_cpu
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_opcheck(dtype, bias):
    q, k, v, rpb = make_inputs(dtype=dtype, bias=bias)
    for t in (q, k, v, rpb):
        if t is not None:
            t.requires_grad_(True)
    op = torch.ops.maskformers.neighborhood_attention_2d.default
    torch.library.opcheck(op, (q, k, v, rpb, 3, 2, 0.5))
    out, lse = op(q.detach(), k.detach(), v.detach(), None if rpb is None else rpb.detach(), 3, 2, 0.5)
    torch.library.opcheck(
        torch.ops.maskformers.neighborhood_attention_2d_backward.default,
        (q.detach(), k.detach(), v.detach(), None if rpb is None else rpb.detach(), lse, torch.randn_like(out),
         3, 2, 0.5),
    )


@needs_native_cpu
def test_torch_compile_fullgraph_matches_eager():
    q, k, v, rpb = make_inputs(dtype=torch.float32)

    def block(x, bias):  # a miniature NA layer: projections of one input, attention, a residual
        out = neighborhood_attention_2d(x * 0.5, x.flip(1), x.tanh(), bias, kernel_size=3, dilation=2)
        return (out + x).square().sum()

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    args = [t.clone().requires_grad_(True) for t in (q, rpb)]
    args_c = [t.clone().requires_grad_(True) for t in (q, rpb)]
    eager = block(*args)
    eager.backward()
    comp = compiled(*args_c)
    comp.backward()
    torch.testing.assert_close(comp, eager)
    for a, b in zip(args_c, args):
        torch.testing.assert_close(a.grad, b.grad)


@needs_native_cpu
def test_double_backward_raises_naming_the_reference():
    q, k, v, rpb = (t.requires_grad_() for t in make_inputs())
    out = neighborhood_attention_2d(q, k, v, rpb, kernel_size=3, backend="native")
    with pytest.raises(RuntimeError, match=r"neighborhood_attention_2d: .*no double backward.*backend='reference'"):
        torch.autograd.grad(out.square().sum(), (q, k, v, rpb), create_graph=True)
    out = neighborhood_attention_2d_reference(q, k, v, rpb, kernel_size=3)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v, rpb), create_graph=True)
    assert all(g.requires_grad for g in grads)  # the reference is differentiable twice


@needs_native_cpu
def test_without_bias_and_with_batch_zero():
    q, k, v, _ = make_inputs(bias=False)
    out = neighborhood_attention_2d(q, k, v, kernel_size=3, dilation=3, backend="native")
    torch.testing.assert_close(out, neighborhood_attention_2d_reference(q, k, v, kernel_size=3, dilation=3),
                               rtol=0, atol=1e-12)
    empty = neighborhood_attention_2d(q[:0], k[:0], v[:0], kernel_size=3, backend="native")
    assert empty.shape == (0, *q.shape[1:])


@pytest.mark.parametrize("case", [(9, 11, 3, 3), (13, 10, 5, 2), (23, 25, 11, 2), (21, 22, 7, 3)])
def test_matches_natten_when_installed(case):
    # Only where NATTEN (0.14 - 0.17, with its CPU kernels) is importable; CI does not have it.
    functional = pytest.importorskip("natten.functional")
    H, W, K, d = case
    q, k, v, rpb = make_inputs(B=2, H=H, W=W, heads=3, D=8, kernel_size=K, seed=H + K)
    heads_first = lambda t: t.permute(0, 3, 1, 2, 4).contiguous()  # NATTEN's (B, heads, H, W, D)
    qh, kh, vh = (heads_first(t) for t in (q, k, v))
    if hasattr(functional, "na2d_qk"):
        logits = functional.na2d_qk(qh * 0.4, kh, K, d, rpb=rpb)
        natten_out = functional.na2d_av(logits.softmax(-1), vh, K, d)
    else:
        logits = functional.natten2dqkrpb(qh * 0.4, kh, rpb, K, d)
        natten_out = functional.natten2dav(logits.softmax(-1), vh, K, d)
    expected = natten_out.permute(0, 2, 3, 1, 4)
    for backend in ("reference", "native"):
        out = neighborhood_attention_2d(q, k, v, rpb, kernel_size=K, dilation=d, scale=0.4, backend=backend)
        torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12, msg=backend)
