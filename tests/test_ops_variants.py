"""Selecting CUDA kernel variants of the native ops: names, the environment variables and the context
manager, bad names, the choice travelling from the forward to the backward, CPU tensors ignoring it, the
once-only warning (an error under MASKFORMERS_STRICT_OPS) when a variant does not apply, and the separate
variants extension's build plan. The kernels themselves are checked by the *_cuda_variants_emulated tests
and compiled for sm_80 and sm_90 in test_cuda_variants_compile_for_sm80_and_sm90.
"""

from __future__ import annotations

import threading
import warnings

import pytest
import torch
from toolchain_helpers import cuda_build_skip_reason

from maskformers.ops import (
    build,
    functional,
    kernel_variants,
    ms_deform_attn,
    ms_deform_attn_reference,
    neighborhood_attention,
    toolchain,
    use_kernel_variant,
    variants,
)


def test_every_op_lists_default_first_and_its_pass_kernels():
    names = kernel_variants()
    assert names["ms_deform_attn"] == ("default", "coalesced", "tiled", "coalesced+tiled")
    assert names["neighborhood_attention"][0] == "default" and "tensor_core" in names["neighborhood_attention"]
    assert variants.pass_kernels("ms_deform_attn", "default") == ("default", "default")
    assert variants.pass_kernels("ms_deform_attn", "tiled") == ("default", "tiled")
    assert variants.pass_kernels("ms_deform_attn", "coalesced") == ("coalesced", "default")
    assert variants.pass_kernels("ms_deform_attn", "coalesced+tiled") == ("coalesced", "tiled")
    assert variants.pass_kernels("neighborhood_attention", "tensor_core") == ("tensor_core", "default")
    assert variants.pass_kernels("neighborhood_attention", "tensor_core+tensor_core_bwd") == (
        "tensor_core", "tensor_core_bwd")
    assert set(variants.VARIANT_ENV) == set(build.OPS)


def test_environment_and_context_manager(monkeypatch):
    monkeypatch.delenv("MASKFORMERS_MSDA_VARIANT", raising=False)
    assert variants.current_variant("ms_deform_attn") == "default"
    monkeypatch.setenv("MASKFORMERS_MSDA_VARIANT", "tiled")
    assert variants.current_variant("ms_deform_attn") == "tiled"
    with use_kernel_variant("ms_deform_attn", "coalesced"):
        assert variants.current_variant("ms_deform_attn") == "coalesced"
        with use_kernel_variant("ms_deform_attn", None):  # back to the environment's choice
            assert variants.current_variant("ms_deform_attn") == "tiled"
        seen = []
        worker = threading.Thread(target=lambda: seen.append(variants.current_variant("ms_deform_attn")))
        worker.start()
        worker.join()
        assert seen == ["tiled"]  # the override is per thread
        assert variants.current_variant("ms_deform_attn") == "coalesced"
    assert variants.current_variant("ms_deform_attn") == "tiled"


def test_bad_names_are_refused_with_the_choices(monkeypatch):
    with pytest.raises(ValueError, match=r"variant must name a ms_deform_attn kernel variant \(default, coalesced"):
        with use_kernel_variant("ms_deform_attn", "fast"):
            pass
    with pytest.raises(ValueError, match="op must be one of ms_deform_attn, neighborhood_attention, got 'msda'"):
        with use_kernel_variant("msda", "default"):
            pass
    monkeypatch.setenv("MASKFORMERS_NA_VARIANT", "tensorcore")
    with pytest.raises(ValueError, match="MASKFORMERS_NA_VARIANT must name a neighborhood_attention kernel variant.*"
                       "got 'tensorcore'"):
        variants.current_variant("neighborhood_attention")


def small_problem(dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    shapes = [(3, 4), (2, 2)]
    value = torch.randn(1, 16, 2, 4, generator=g, dtype=dtype)
    loc = torch.rand(1, 5, 2, 2, 3, 2, generator=g, dtype=dtype)
    w = torch.rand(1, 5, 2, 2, 3, generator=g, dtype=dtype)
    return value, shapes, loc, w


def test_cpu_tensors_run_the_cpu_kernel_whatever_the_variant(monkeypatch):
    monkeypatch.setenv("MASKFORMERS_MSDA_VARIANT", "coalesced+tiled")
    monkeypatch.setattr(variants, "load_variants", lambda op: pytest.fail("CPU tensors must not load CUDA variants"))
    value, shapes, loc, w = small_problem()
    leaves = [t.clone().requires_grad_() for t in (value, loc, w)]
    out = ms_deform_attn(leaves[0], shapes, None, leaves[1], leaves[2], backend="native")
    out.sum().backward()
    ref = ms_deform_attn_reference(value, shapes, None, loc, w)
    torch.testing.assert_close(out.detach(), ref, rtol=0, atol=1e-12)
    # the custom op called directly with a variant name on CPU tensors runs the CPU kernel too
    table = torch.tensor(shapes)
    starts = torch.tensor([0, 12])
    direct = torch.ops.maskformers.ms_deform_attn(value, table, starts, loc, w, "coalesced+tiled")
    torch.testing.assert_close(direct, ref, rtol=0, atol=1e-12)


def test_the_backward_runs_the_variant_of_its_forward(monkeypatch):
    seen = []
    real = functional._native_backward

    def spy(*args):
        seen.append(args[-1])
        return real(*args)

    monkeypatch.setattr(functional, "_native_backward", spy)
    value, shapes, loc, w = small_problem()
    table, starts = torch.tensor(shapes), torch.tensor([0, 12])
    leaves = [t.clone().requires_grad_() for t in (value, loc, w)]
    with use_kernel_variant("ms_deform_attn", "coalesced+tiled"):  # the variant the forward ran with ...
        out = torch.ops.maskformers.ms_deform_attn(leaves[0], table, starts, leaves[1], leaves[2], "tiled")
    out.sum().backward()  # ... not the one in force at the backward
    assert seen == ["tiled"]


def test_na_backward_variant_gets_the_forward_output(monkeypatch):
    """A variant backward kernel of neighborhood attention needs the forward's output (delta = rowsum(dO O)):
    it is kept only then, and reaches the backward op with the variant's name."""
    seen = []
    real = neighborhood_attention._native_backward

    def spy(*args):
        seen.append((args[-2], None if args[-1] is None else args[-1].shape))
        return real(*args)

    monkeypatch.setattr(neighborhood_attention, "_native_backward", spy)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 6, 7, 2, 4, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    for variant in ("tensor_core_bwd", "tensor_core"):
        out, _ = torch.ops.maskformers.neighborhood_attention_2d(q, k, v, None, 3, 2, 0.5, variant)
        out.sum().backward()
    assert seen == [("tensor_core_bwd", (1, 6, 7, 2, 4)), ("tensor_core", None)]


def test_a_variant_that_does_not_apply_warns_once_or_raises_when_strict(monkeypatch):
    monkeypatch.setattr(variants, "_warned", set())
    monkeypatch.delenv("MASKFORMERS_STRICT_OPS", raising=False)
    with pytest.warns(RuntimeWarning, match="kernel variant 'tiled' does not apply: D too big; running the default"):
        variants.not_applicable("ms_deform_attn", "tiled", "D too big")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        variants.not_applicable("ms_deform_attn", "tiled", "D too big")  # said once
    monkeypatch.setenv("MASKFORMERS_STRICT_OPS", "1")
    with pytest.raises(RuntimeError, match="does not apply: D too big; running the default kernel is not allowed"):
        variants.not_applicable("ms_deform_attn", "tiled", "D too big")


def test_variants_extension_plan(monkeypatch, tmp_path):
    monkeypatch.setenv(build.CACHE_ENV, str(tmp_path / "cache"))
    with pytest.raises(build.NativeOpUnavailable, match="ms_deform_attn has no CPU kernel variants"):
        build.build_plan("cpu", "ms_deform_attn", variants=True)
    if cuda_build_skip_reason():
        pytest.skip(cuda_build_skip_reason())
    plan = build.build_plan("cuda", "ms_deform_attn", variants=True)
    default = build.build_plan("cuda", "ms_deform_attn")
    assert plan.directory != default.directory and plan.name != default.name
    assert [p.name for p in plan.sources] == list(build.OPS["ms_deform_attn"].variant_sources)
    assert plan.label == "ms_deform_attn CUDA kernel variants"


def test_unavailable_variants_raise_naming_the_reason(monkeypatch):
    def broken(device_type, op=build.DEFAULT_OP, variants=False):
        raise build.NativeOpUnavailable("simulated: nvcc missing")

    monkeypatch.setattr(build, "load_extension", broken)
    with pytest.raises(RuntimeError, match="ms_deform_attn: the CUDA kernel variants are unavailable: simulated"):
        variants.load_variants("ms_deform_attn")


@pytest.mark.skipif(bool(cuda_build_skip_reason()), reason=cuda_build_skip_reason() or "ok")
@pytest.mark.parametrize("op", [op for op, spec in build.OPS.items() if spec.variant_sources])
def test_cuda_variants_compile_for_sm80_and_sm90(monkeypatch, op):
    """Every kernel variant compiles for the A100 and H100 architectures (nvcc, no GPU needed)."""
    monkeypatch.setattr(build, "_loaded", {})
    monkeypatch.setattr(build, "_failed", {})
    root, _ = toolchain.find_cuda_home()
    supported = toolchain.nvcc_archs(root)
    assert (8, 0) in supported and (9, 0) in supported, f"nvcc in {root} lacks sm_80 or sm_90: {supported}"
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    ext = build.load_extension("cuda", op, variants=True)
    plan = build.build_plan("cuda", op, variants=True)
    assert build.is_built(plan) and "TORCH_CUDA_ARCH_LIST=8.0;9.0" in plan.description["architectures"]
    for variant in kernel_variants()[op][1:]:
        forward, backward = variants.pass_kernels(op, variant)
        for name in (f"forward_{forward}", f"backward_{backward}"):
            assert name.endswith("_default") or callable(getattr(ext, name)), name
