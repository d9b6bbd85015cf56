"""The CUDA kernels of neighborhood_attention_2d, run on the CPU by the cuda_on_cpu emulator.

No GPU runs these kernels in CI, so this test compiles csrc/neighborhood_attention_cuda.cu (the default
kernels) and csrc/neighborhood_attention_cuda_variants.cu (the "tensor_core" forward and "tensor_core_bwd"
backward, whose nvcuda::wmma calls run on tests/cuda_emu_ext/shim/mma.h) for the emulator (see
cuda_emu_helpers.py), and compares the forward and all four gradients with the float64 reference in every
dtype, with and without bias, also checking that the emulator recorded no device fault (divergent or
non-participating shuffles, wmma calls by part of a warp or with different arguments, misaligned loads,
deadlocks). The tensor-core forward is also checked through the default backward fed its log-sum-exp, and
both tensor-core kernels under other thread and block orders. It compiles for a few minutes, so it runs
only when MASKFORMERS_CUDA_ON_CPU names the emulator's folder.
"""

from __future__ import annotations

import pytest
import torch
from cuda_emu_helpers import build_emulated, relative_error, requires_emulator

from maskformers.ops import neighborhood_attention_2d_reference

pytestmark = requires_emulator

# (B, H, W, heads, D, kernel, dilation): one lane, partial chunks, the vector path, 8 and 32 lanes, K = 11
CASES = [(1, 7, 9, 2, 5, 3, 1), (2, 9, 7, 3, 8, 3, 2), (1, 10, 13, 1, 3, 3, 3), (1, 15, 11, 1, 32, 5, 2),
         (1, 11, 13, 2, 24, 11, 1), (1, 7, 8, 1, 256, 3, 2), (1, 12, 12, 4, 64, 3, 4)]
TOLERANCE = {torch.float64: 1e-12, torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 2e-2}

# tensor-core forward: head dims 16/32/64; maps that are not multiples of the 8 x 8 query tile; dilation
# groups of different sizes; K = 11 (a (8 + 10)^2 key region in six chunks); a map of exactly K * dilation
TC_CASES = [(1, 9, 11, 2, 32, 3, 1), (2, 17, 12, 1, 16, 5, 2), (1, 13, 22, 1, 64, 3, 3), (1, 12, 13, 1, 32, 11, 1),
            (1, 15, 14, 2, 32, 7, 2), (1, 9, 9, 1, 16, 3, 3)]
TC_DTYPES = (torch.bfloat16, torch.float16)


@pytest.fixture(scope="module")
def emulated(tmp_path_factory):
    return build_emulated(tmp_path_factory.mktemp("na_cuda_emu"), "na_cuda_emu", "neighborhood_attention_cuda.cu",
                          "neighborhood_attention_cuda_bind.cpp", launches=6)


@pytest.fixture(scope="module")
def emulated_variants(tmp_path_factory):
    return build_emulated(tmp_path_factory.mktemp("na_variants_emu"), "na_variants_emu",
                          "neighborhood_attention_cuda_variants.cu", "neighborhood_attention_cuda_variants_bind.cpp",
                          launches=3)


def random_inputs(case, seed):
    B, H, W, heads, D, K, d = case
    g = torch.Generator().manual_seed(seed)
    q, k, v, grad = (torch.randn(B, H, W, heads, D, generator=g, dtype=torch.float64) for _ in range(4))
    rpb = torch.randn(heads, 2 * K - 1, 2 * K - 1, generator=g, dtype=torch.float64)
    return q, k, v, grad, rpb


def reference(q, k, v, bias, grad, K, d, scale):
    """float64 output and gradients of (q, k, v[, rpb]) for the inputs as given."""
    leaves = [t.detach().double().clone().requires_grad_() for t in (q, k, v) + ((bias,) if bias is not None else ())]
    out = neighborhood_attention_2d_reference(*leaves[:3], leaves[3] if bias is not None else None,
                                              kernel_size=K, dilation=d, scale=scale)
    return (out.detach(), *torch.autograd.grad(out, leaves, grad.double()))


@pytest.mark.parametrize("dtype", list(TOLERANCE), ids=str)
@pytest.mark.parametrize("case", CASES, ids=[f"{c[1]}x{c[2]}-h{c[3]}-D{c[4]}-K{c[5]}-d{c[6]}" for c in CASES])
def test_emulated_cuda_kernels_match_the_reference(emulated, case, dtype):
    module = emulated.module
    B, H, W, heads, D, K, d = case
    q, k, v, grad, rpb = random_inputs(case, sum(case))
    for bias in (rpb, None):
        truths = reference(q, k, v, bias, grad, K, d, 0.3)
        before = emulated.fault_count()
        args = [t.to(dtype) for t in (q, k, v)]
        bias_arg = bias.to(dtype) if bias is not None else args[0].new_empty(0)
        out, lse = module.forward(*args, bias_arg, K, d, 0.3)
        grads = module.backward(*args, bias_arg, lse, grad.to(dtype), K, d, 0.3)
        assert emulated.fault_count() == before, "the emulator recorded a device fault"
        for name, got, want in zip(("out", "grad_query", "grad_key", "grad_value", "grad_rpb"), (out, *grads), truths):
            error = ((got.double() - want).abs().max() / want.abs().max()).item()
            assert error <= TOLERANCE[dtype], f"{name} with{'out' if bias is None else ''} bias: {error:.3g}"
        if bias is None:
            assert grads[3].numel() == 0


@pytest.mark.parametrize("dtype", TC_DTYPES, ids=str)
@pytest.mark.parametrize("case", TC_CASES, ids=[f"{c[1]}x{c[2]}-h{c[3]}-D{c[4]}-K{c[5]}-d{c[6]}" for c in TC_CASES])
def test_tensor_core_forward_matches_the_reference(emulated, emulated_variants, case, dtype):
    """Output against the float64 reference on the same rounded inputs; the log-sum-exp through the
    default backward, whose gradients need it exact."""
    B, H, W, heads, D, K, d = case
    q, k, v, grad, rpb = (t.to(dtype) for t in random_inputs(case, sum(case)))
    for bias in (rpb, None):
        truths = reference(q, k, v, bias, grad, K, d, D**-0.5)
        bias_arg = bias if bias is not None else q.new_empty(0)
        before = emulated_variants.fault_count()
        out, lse = emulated_variants.module.forward_tensor_core(q, k, v, bias_arg, K, d, D**-0.5)
        assert emulated_variants.fault_count() == before, "the emulator recorded a device fault"
        assert out.dtype == dtype and lse.dtype == torch.float32 and lse.shape == (B, H, W, heads)
        _, default_lse = emulated.module.forward(q, k, v, bias_arg, K, d, D**-0.5)
        assert relative_error(lse, default_lse) <= 1e-5
        grads = emulated.module.backward(q, k, v, bias_arg, lse, grad, K, d, D**-0.5)
        for name, got, want in zip(("out", "grad_query", "grad_key", "grad_value", "grad_rpb"), (out, *grads), truths):
            error = relative_error(got, want)
            assert error <= TOLERANCE[dtype], f"{name} with{'out' if bias is None else ''} bias: {error:.3g}"


def tensor_core_backward(module, q, k, v, bias_arg, grad, K, d, scale):
    """The tensor-core forward, then the tensor-core backward with delta = rowsum(grad * out)."""
    out, lse = module.forward_tensor_core(q, k, v, bias_arg, K, d, scale)
    delta = (grad.float() * out.float()).sum(-1)
    return module.backward_tensor_core_bwd(q, k, v, bias_arg, lse, grad, delta, K, d, scale)


@pytest.mark.parametrize("dtype", TC_DTYPES, ids=str)
@pytest.mark.parametrize("case", TC_CASES, ids=[f"{c[1]}x{c[2]}-h{c[3]}-D{c[4]}-K{c[5]}-d{c[6]}" for c in TC_CASES])
def test_tensor_core_backward_matches_the_reference(emulated_variants, case, dtype):
    B, H, W, heads, D, K, d = case
    q, k, v, grad, rpb = (t.to(dtype) for t in random_inputs(case, sum(case) + 1))
    for bias in (rpb, None):
        truths = reference(q, k, v, bias, grad, K, d, D**-0.5)[1:]
        bias_arg = bias if bias is not None else q.new_empty(0)
        before = emulated_variants.fault_count()
        grads = tensor_core_backward(emulated_variants.module, q, k, v, bias_arg, grad, K, d, D**-0.5)
        assert emulated_variants.fault_count() == before, "the emulator recorded a device fault"
        for name, got, want in zip(("grad_query", "grad_key", "grad_value", "grad_rpb"), grads, truths):
            assert got.dtype == dtype, name
            error = relative_error(got, want)
            assert error <= TOLERANCE[dtype], f"{name} with{'out' if bias is None else ''} bias: {error:.3g}"
        if bias is None:
            assert grads[3].numel() == 0


@pytest.mark.parametrize("order", [("reverse", "reverse", 1), ("random", "random", 9)])
def test_tensor_core_kernels_do_not_depend_on_thread_order(emulated_variants, order):
    """Every sum has a fixed order, so another thread or block order must give the same bits (a missing
    barrier or a race between the threads of a block would not)."""
    case = TC_CASES[3]
    B, H, W, heads, D, K, d = case
    q, k, v, grad, rpb = (t.to(torch.bfloat16) for t in random_inputs(case, 3))
    module = emulated_variants.module
    first = (*module.forward_tensor_core(q, k, v, rpb, K, d, 0.2), *tensor_core_backward(module, q, k, v, rpb, grad,
                                                                                          K, d, 0.2))
    blocks, lanes, seed = order
    emulated_variants.schedule(blocks=blocks, lanes=lanes, seed=seed)
    try:
        again = (*module.forward_tensor_core(q, k, v, rpb, K, d, 0.2), *tensor_core_backward(module, q, k, v, rpb,
                                                                                              grad, K, d, 0.2))
    finally:
        emulated_variants.schedule()
    for a, b in zip(first, again):
        assert torch.equal(a, b)


def test_tensor_core_forward_refuses_what_it_does_not_handle(emulated_variants):
    module = emulated_variants.module
    q = torch.randn(1, 9, 9, 1, 32)
    assert "dtype Float" in module.tensor_core_unsupported(q)
    assert "head dim 24" in module.tensor_core_unsupported(torch.randn(1, 9, 9, 1, 24, dtype=torch.bfloat16))
    assert module.tensor_core_unsupported(q.bfloat16()) == ""
    with pytest.raises(RuntimeError, match="the tensor-core forward does not apply: dtype Float"):
        module.forward_tensor_core(q, q, q, q.new_empty(0), 3, 1, 0.2)
    lse = torch.zeros(1, 9, 9, 1)
    with pytest.raises(RuntimeError, match="the tensor-core backward does not apply: dtype Float"):
        module.backward_tensor_core_bwd(q, q, q, q.new_empty(0), lse, q, lse, 3, 1, 0.2)
    b = q.bfloat16()
    with pytest.raises(RuntimeError, match=r"expected delta = sum\(grad_out \* out, -1\)"):
        module.backward_tensor_core_bwd(b, b, b, b.new_empty(0), lse, b, lse.double(), 3, 1, 0.2)
