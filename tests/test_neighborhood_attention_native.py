"""Numerical tests of the native neighborhood-attention kernels against the reference.

float64 forward and all four gradients over odd map sizes, kernel sizes 3/5/7/11, dilations up to
map/kernel, several head counts and head dims that are not powers of two; gradcheck through the
functional; 16-bit accuracy measured against a float64 truth next to the reference's own error in that
dtype; thread-count independence; the C++ argument checks of direct calls; the CUDA extension compiling.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from toolchain_helpers import cuda_build_skip_reason

from maskformers.ops import (
    build,
    neighborhood_attention_2d,
    neighborhood_attention_2d_reference,
    toolchain,
)

OP = "neighborhood_attention"

# (B, H, W, heads, D, kernel_size, dilation): odd and even sides, dilations from 1 to side // kernel
CASES = [
    (2, 7, 9, 2, 5, 3, 1), (1, 9, 7, 3, 1, 3, 2), (1, 10, 13, 1, 3, 3, 3), (2, 13, 12, 2, 6, 3, 4),
    (1, 11, 11, 2, 17, 5, 1), (1, 15, 11, 1, 4, 5, 2), (2, 17, 16, 3, 7, 5, 3), (1, 14, 21, 2, 9, 7, 1),
    (1, 15, 14, 1, 33, 7, 2), (1, 22, 29, 2, 3, 7, 3), (1, 11, 13, 2, 8, 11, 1), (1, 23, 25, 1, 5, 11, 2),
    (2, 12, 11, 4, 2, 11, 1), (1, 19, 20, 2, 24, 3, 6),
]


@pytest.fixture(scope="session")
def ext():
    try:
        return build.load_extension("cpu", OP)
    except build.NativeOpUnavailable as exc:
        if shutil.which("c++") is None or shutil.which("ninja") is None:
            pytest.skip(f"native CPU kernel cannot be built here: {exc}")
        raise


def problem(case, dtype=torch.float64, seed=0, bias=True):
    B, H, W, heads, D, K, d = case
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, W, heads, D, generator=g, dtype=torch.float64) for _ in range(3))
    rpb = torch.randn(heads, 2 * K - 1, 2 * K - 1, generator=g, dtype=torch.float64) if bias else None
    grad = torch.randn(B, H, W, heads, D, generator=g, dtype=torch.float64)
    cast = lambda t: None if t is None else t.to(dtype)
    return cast(q), cast(k), cast(v), cast(rpb), cast(grad), K, d


def with_grads(fn, q, k, v, rpb, grad):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    if rpb is not None:
        leaves.append(rpb.detach().clone().requires_grad_())
    out = fn(*leaves[:3], leaves[3] if rpb is not None else None)
    return out.detach(), torch.autograd.grad(out, leaves, grad)


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


@pytest.mark.parametrize("case", CASES, ids=[f"B{c[0]}-{c[1]}x{c[2]}-h{c[3]}-D{c[4]}-K{c[5]}-d{c[6]}" for c in CASES])
def test_forward_and_gradients_match_reference_float64(ext, case):
    q, k, v, rpb, grad, K, d = problem(case, seed=sum(case))
    scale = 0.37
    ref_out, ref_grads = with_grads(
        lambda *a: neighborhood_attention_2d_reference(*a, kernel_size=K, dilation=d, scale=scale), q, k, v, rpb, grad)
    out, grads = with_grads(
        lambda *a: neighborhood_attention_2d(*a, kernel_size=K, dilation=d, scale=scale, backend="native"),
        q, k, v, rpb, grad)
    assert out.dtype == torch.float64 and out.shape == q.shape
    torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-12)
    for name, nat, ref in zip(("query", "key", "value", "rpb"), grads, ref_grads):
        torch.testing.assert_close(nat, ref, rtol=0, atol=1e-11, msg=f"grad of {name}")


def test_direct_extension_call_without_bias(ext):
    q, k, v, _, grad, K, d = problem(CASES[2], bias=False)
    out, lse = ext.forward(q, k, v, q.new_empty(0), K, d, 0.5)
    torch.testing.assert_close(out, neighborhood_attention_2d_reference(q, k, v, kernel_size=K, dilation=d, scale=0.5),
                               rtol=0, atol=1e-12)
    assert lse.shape == q.shape[:4] and lse.dtype == torch.float64
    gq, gk, gv, grpb = ext.backward(q, k, v, q.new_empty(0), lse, grad, K, d, 0.5)
    assert grpb.numel() == 0 and gq.shape == gk.shape == gv.shape == q.shape


@pytest.mark.parametrize("bias", [True, False])
def test_gradcheck_native(ext, bias):
    q, k, v, rpb, _, K, d = problem((1, 7, 8, 2, 3, 3, 2), bias=bias)
    inputs = [t.requires_grad_() for t in (q, k, v)] + ([rpb.requires_grad_()] if bias else [])

    def fn(*args):
        return neighborhood_attention_2d(*args[:3], args[3] if bias else None, kernel_size=K, dilation=d,
                                         backend="native")

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_results_do_not_depend_on_the_thread_count(ext, threads):
    q, k, v, rpb, grad, K, d = problem(CASES[6], dtype=torch.float32, seed=3)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = with_grads(lambda *a: neighborhood_attention_2d(*a, kernel_size=K, dilation=d, backend="native"),
                         q, k, v, rpb, grad)
        torch.set_num_threads(threads)
        many = with_grads(lambda *a: neighborhood_attention_2d(*a, kernel_size=K, dilation=d, backend="native"),
                          q, k, v, rpb, grad)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one[0], many[0]) and all(torch.equal(a, b) for a, b in zip(one[1], many[1]))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_reduced_precision_error_no_worse_than_the_reference(ext, dtype):
    # DiNAT-like: head dim 32, kernel 7, logits of a few units
    q, k, v, rpb, grad, K, d = problem((2, 16, 18, 2, 32, 7, 2), seed=11)
    truth_out, truth_grads = with_grads(
        lambda *a: neighborhood_attention_2d_reference(*a, kernel_size=K, dilation=d), q, k, v, rpb, grad)
    low = [t.to(dtype) for t in (q, k, v, rpb, grad)]
    ref_out, ref_grads = with_grads(
        lambda *a: neighborhood_attention_2d_reference(*a, kernel_size=K, dilation=d), *low)
    out, grads = with_grads(
        lambda *a: neighborhood_attention_2d(*a, kernel_size=K, dilation=d, backend="native"), *low)
    assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
    names = ("output", "grad_query", "grad_key", "grad_value", "grad_rpb")
    for name, nat, ref, truth in zip(names, (out, *grads), (ref_out, *ref_grads), (truth_out, *truth_grads)):
        nat_err, ref_err = max_err(nat, truth), max_err(ref, truth)
        assert ref_err > 0, name
        if dtype == torch.float32:  # both are float32 rounding noise (a few 1e-7 relative): same order
            assert nat_err <= 4 * ref_err and nat_err <= 1e-5 * truth.abs().max().item(), (name, nat_err, ref_err)
        else:  # float32 accumulation: one rounding to the 16-bit type; the reference rounds at every step
            assert nat_err <= ref_err, f"{name}: native error {nat_err:.3g} vs reference {ref_err:.3g} in {dtype}"


BAD_DIRECT_CALLS = {
    "even kernel": (dict(kernel_size=4), "kernel_size must be odd"),
    "map too small": (dict(kernel_size=5, dilation=2), r"must be at least kernel_size \* dilation = 10"),
    "dilation 0": (dict(dilation=0), "dilation must be >= 1"),
    "key shape": (dict(key=lambda t: t[:, :-1].contiguous()), "expected key of the query's shape"),
    "value dtype": (dict(value=lambda t: t.float()), "value must be Double like query"),
    "non-contiguous key": (
        dict(key=lambda t: t.transpose(1, 2).contiguous().transpose(1, 2)), "key must be contiguous"),
    "rpb shape": (dict(rpb=lambda t: t[:, 1:].contiguous()), r"expected rpb \(heads, 2K-1, 2K-1\)"),
    "rpb dtype": (dict(rpb=lambda t: t.float()), "rpb must be Double like query"),
    "integer query": (dict(query=lambda t: t.long(), key=lambda t: t.long(), value=lambda t: t.long()),
                      "query must be float32, float64, bfloat16 or float16"),
}


@pytest.mark.parametrize("case", list(BAD_DIRECT_CALLS))
def test_direct_call_argument_checks(ext, case):
    q, k, v, rpb, grad, K, d = problem((1, 9, 10, 2, 3, 3, 1))
    args = dict(query=q, key=k, value=v, rpb=rpb, kernel_size=K, dilation=d, scale=0.5)
    for name, new in BAD_DIRECT_CALLS[case][0].items():
        args[name] = new(args[name]) if callable(new) else new
    with pytest.raises(RuntimeError, match=BAD_DIRECT_CALLS[case][1]):
        ext.forward(**args)
    lse = torch.zeros(q.shape[:4], dtype=torch.float64)
    with pytest.raises(RuntimeError, match=BAD_DIRECT_CALLS[case][1]):
        ext.backward(**args, lse=lse, grad_out=grad)


def test_direct_call_checks_backward_inputs(ext):
    q, k, v, rpb, grad, K, d = problem((1, 9, 10, 2, 3, 3, 1))
    _, lse = ext.forward(q, k, v, rpb, K, d, 0.5)
    with pytest.raises(RuntimeError, match="expected grad_out of the query's shape"):
        ext.backward(q, k, v, rpb, lse, grad[:, 1:], K, d, 0.5)
    with pytest.raises(RuntimeError, match=r"expected lse \(B, H, W, heads\)"):
        ext.backward(q, k, v, rpb, lse[..., :1], grad, K, d, 0.5)
    with pytest.raises(RuntimeError, match="lse must be contiguous Double"):
        ext.backward(q, k, v, rpb, lse.float(), grad, K, d, 0.5)


@pytest.mark.skipif(bool(cuda_build_skip_reason()), reason=cuda_build_skip_reason() or "ok")
def test_cuda_extension_compiles_and_imports(monkeypatch):
    monkeypatch.setattr(build, "_loaded", {})
    monkeypatch.setattr(build, "_failed", {})
    root, how = toolchain.find_cuda_home()
    assert root is not None, f"nvcc is present but the CUDA toolkit was not found: {how}"
    supported = toolchain.nvcc_archs(root)
    arch = (8, 0) if (8, 0) in supported or not supported else supported[0]
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", f"{arch[0]}.{arch[1]}")
    ext = build.load_extension("cuda", OP)
    q, k, v, rpb, grad, K, d = problem((1, 9, 10, 2, 3, 3, 1), dtype=torch.float32)
    with pytest.raises(RuntimeError, match="the cuda kernel needs query on cuda"):
        ext.forward(q, k, v, rpb, K, d, 0.5)
    with pytest.raises(RuntimeError, match="the cuda kernel needs query on cuda"):
        ext.backward(q, k, v, rpb, torch.zeros(q.shape[:4]), grad, K, d, 0.5)
