"""The CUDA kernels of neighborhood_attention_2d, run on the CPU by the cuda_on_cpu emulator.

No GPU runs these kernels in CI, so this test compiles csrc/neighborhood_attention_cuda.cu for the
project's CUDA-on-CPU emulator (launch syntax rewritten by its prepare_source.py, warp intrinsics and the
thread scheduler from its emu/), and compares forward and all four gradients with the reference in every
dtype, with and without bias, also checking that the emulator recorded no device fault (divergent or
non-participating shuffles, misaligned vector loads, deadlocks). It compiles for a few minutes, so it runs
only when asked: set MASKFORMERS_CUDA_ON_CPU to the emulator's folder (the one holding prepare_source.py
and emu/); MASKFORMERS_CUDA_ON_CPU_SANITIZE=1 adds AddressSanitizer + UBSan (then run pytest with
libasan preloaded, as the emulator's run.sh does).
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

from maskformers.ops import neighborhood_attention_2d_reference, toolchain

REPO = Path(__file__).resolve().parent.parent
EMULATOR = os.environ.get("MASKFORMERS_CUDA_ON_CPU", "")

pytestmark = pytest.mark.skipif(
    not EMULATOR or not (Path(EMULATOR) / "prepare_source.py").is_file() or shutil.which("g++") is None,
    reason="set MASKFORMERS_CUDA_ON_CPU to the cuda_on_cpu emulator folder (and have g++) to run the CUDA kernels",
)

# (B, H, W, heads, D, kernel, dilation): one lane, partial chunks, the vector path, 8 and 32 lanes, K = 11
CASES = [(1, 7, 9, 2, 5, 3, 1), (2, 9, 7, 3, 8, 3, 2), (1, 10, 13, 1, 3, 3, 3), (1, 15, 11, 1, 32, 5, 2),
         (1, 11, 13, 2, 24, 11, 1), (1, 7, 8, 1, 256, 3, 2), (1, 12, 12, 4, 64, 3, 4)]
TOLERANCE = {torch.float64: 1e-12, torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 2e-2}


def _run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, f"{' '.join(cmd[:3])} ... failed:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}"


@pytest.fixture(scope="module")
def emulated(tmp_path_factory):
    from torch.utils import cpp_extension

    tool, out = Path(EMULATOR), tmp_path_factory.mktemp("na_cuda_emu")
    cuda_home, how = toolchain.find_cuda_home()
    assert cuda_home is not None, f"the emulator needs the CUDA headers: {how}"
    release = toolchain.nvcc_version(cuda_home) or "12.4"
    major, minor = release.split(".")
    sanitize = ["-fsanitize=address,undefined,float-cast-overflow", "-fsanitize-recover=all"] if os.environ.get(
        "MASKFORMERS_CUDA_ON_CPU_SANITIZE") else []
    common = ["-std=c++20", "-fPIC", f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
              "-ffp-contract=off", "-O1" if sanitize else "-O2"]
    includes = [x for p in cpp_extension.include_paths() for x in ("-isystem", p)]
    includes += ["-isystem", sysconfig.get_paths()["include"]]
    emu = ["-I", str(tool / "emu" / "shim"), "-I", str(tool / "emu"), "-isystem", str(cuda_home / "include")]
    arch = ["-DEMU_CUDA_ARCH=900", f"-DEMU_CUDACC_VER_MAJOR={major}", f"-DEMU_CUDACC_VER_MINOR={minor}"]
    csrc = REPO / "csrc"
    prepared = out / "neighborhood_attention_cuda_emu.cpp"
    _run([sys.executable, str(tool / "prepare_source.py"), str(csrc / "neighborhood_attention_cuda.cu"), str(prepared),
          "--expect", "6"])
    _run(["g++", *common, *arch, *sanitize, "-c", str(prepared), "-o", str(out / "kernels.o"), *emu, "-iquote",
          str(csrc), *includes])
    _run(["g++", *common, *arch, *sanitize, "-c", str(tool / "emu" / "cuda_emu.cpp"), "-o", str(out / "emu.o"), *emu])
    _run(["g++", *common, "-DTORCH_EXTENSION_NAME=na_cuda_emu", "-DTORCH_API_INCLUDE_EXTENSION_H", "-c",
          str(csrc / "neighborhood_attention_cuda_bind.cpp"), "-o", str(out / "bind.o"), *includes])
    libs = cpp_extension.library_paths()
    so = out / "na_cuda_emu.so"
    _run(["g++", "-shared", "-o", str(so), *(str(out / f) for f in ("kernels.o", "emu.o", "bind.o")),
          *(f"-L{d}" for d in libs), *(f"-Wl,-rpath,{d}" for d in libs), "-lc10", "-ltorch", "-ltorch_cpu",
          "-ltorch_python", "-pthread", *sanitize])
    spec = importlib.util.spec_from_file_location("na_cuda_emu", so)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    faults = ctypes.CDLL(str(so)).emu_fault_count
    faults.restype = ctypes.c_longlong
    return module, faults


@pytest.mark.parametrize("dtype", list(TOLERANCE), ids=str)
@pytest.mark.parametrize("case", CASES, ids=[f"{c[1]}x{c[2]}-h{c[3]}-D{c[4]}-K{c[5]}-d{c[6]}" for c in CASES])
def test_emulated_cuda_kernels_match_the_reference(emulated, case, dtype):
    module, fault_count = emulated
    B, H, W, heads, D, K, d = case
    g = torch.Generator().manual_seed(sum(case))
    q, k, v, grad = (torch.randn(B, H, W, heads, D, generator=g, dtype=torch.float64) for _ in range(4))
    rpb = torch.randn(heads, 2 * K - 1, 2 * K - 1, generator=g, dtype=torch.float64)
    for bias in (rpb, None):
        leaves = [t.clone().requires_grad_() for t in (q, k, v) + ((rpb,) if bias is not None else ())]
        truth = neighborhood_attention_2d_reference(*leaves[:3], leaves[3] if bias is not None else None,
                                                    kernel_size=K, dilation=d, scale=0.3)
        truths = (truth.detach(), *torch.autograd.grad(truth, leaves, grad))
        before = fault_count()
        args = [t.to(dtype) for t in (q, k, v)]
        bias_arg = bias.to(dtype) if bias is not None else args[0].new_empty(0)
        out, lse = module.forward(*args, bias_arg, K, d, 0.3)
        grads = module.backward(*args, bias_arg, lse, grad.to(dtype), K, d, 0.3)
        assert fault_count() == before, "the emulator recorded a device fault"
        for name, got, want in zip(("out", "grad_query", "grad_key", "grad_value", "grad_rpb"), (out, *grads), truths):
            error = ((got.double() - want).abs().max() / want.abs().max()).item()
            assert error <= TOLERANCE[dtype], f"{name} with{'out' if bias is None else ''} bias: {error:.3g}"
        if bias is None:
            assert grads[3].numel() == 0
