"""The original Deformable-DETR MultiScaleDeformableAttention CUDA op, built only to be timed beside ours.

Its source is not ours and is never committed: ``fetch`` copies fundamentalvision/Deformable-DETR's
``models/ops/src`` into ``benchmarks/_original/`` (git-ignored) from a checkout, a bare git mirror or the
GitHub URL, and ``load`` compiles a copy of it there with ``torch.utils.cpp_extension``, after the few
edits that let the 2020 sources build against torch 2.x: the ``THC/THCAtomics.cuh`` include (THC was
removed from torch; the op's atomicAdd on float/double is CUDA's own), ``Tensor.type()`` and
``Tensor.data<T>()`` (removed or deprecated APIs; ``scalar_type()``/``is_cuda()``/``data_ptr<T>()`` do the
same), and ``ATen/cuda/CUDAContext.h`` for the current stream (it pulls in cuSPARSE/cuBLAS headers that a
minimal toolkit lacks; ``c10/cuda/CUDAStream.h`` gives the same stream). The kernels themselves are
untouched. GPU machines without internet: fetch where there is access and
carry the folder along (it is small).

    python benchmarks/original_msda.py fetch [--from CHECKOUT|BARE_GIT_DIR|URL]
    python benchmarks/original_msda.py build        # compile for TORCH_CUDA_ARCH_LIST (no GPU needed)

The op is float32/float64 only, needs every input on the GPU (the level table too) and a batch divisible
by im2col_step (64 in Deformable-DETR, 128 in Mask2Former; min(batch, step) is used).
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ORIGINAL = HERE / "_original"
SOURCE = ORIGINAL / "Deformable-DETR-ops-src"  # models/ops/src of the original repository
BUILD = ORIGINAL / "build"
REPO_URL = "https://github.com/fundamentalvision/Deformable-DETR"
OPS_SRC = "models/ops/src"
FILES = ("vision.cpp", "ms_deform_attn.h", "cpu/ms_deform_attn_cpu.cpp", "cpu/ms_deform_attn_cpu.h",
         "cuda/ms_deform_attn_cuda.cu", "cuda/ms_deform_attn_cuda.h", "cuda/ms_deform_im2col_cuda.cuh")
# (old, new): API edits for torch 2.x, applied to the build copy only
EDITS = (("#include <THC/THCAtomics.cuh>", ""), (".type().is_cuda()", ".is_cuda()"),
         ("value.type()", "value.scalar_type()"), (".data<", ".data_ptr<"),
         ("#include <ATen/cuda/CUDAContext.h>", "#include <c10/cuda/CUDAStream.h>"),
         ("at::cuda::getCurrentCUDAStream()", "c10::cuda::getCurrentCUDAStream()"))

__all__ = ["fetch", "load", "original_ms_deform_attn", "unavailable_reason"]


def fetch(source: str | None = None) -> Path:
    """Copy the original op's sources into benchmarks/_original/ from a checkout (a folder holding
    models/ops/src), a bare git directory, or a git URL (default: the GitHub repository)."""
    source = source or os.environ.get("MASKFORMERS_ORIGINAL_MSDA") or REPO_URL
    target = SOURCE
    shutil.rmtree(target, ignore_errors=True)
    path = Path(source)
    if (path / OPS_SRC).is_dir():
        shutil.copytree(path / OPS_SRC, target)
    elif path.is_dir() and (path / "HEAD").is_file():  # a bare repository: export the folder at HEAD
        archive = subprocess.run(["git", f"--git-dir={path}", "archive", "HEAD", OPS_SRC], capture_output=True,
                                 check=True).stdout
        with tempfile.TemporaryDirectory() as tmp, tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(tmp, filter="data")
            shutil.copytree(Path(tmp) / OPS_SRC, target)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run(["git", "clone", "--depth", "1", source, tmp + "/repo"], check=True)
            shutil.copytree(Path(tmp) / "repo" / OPS_SRC, target)
    missing = [f for f in FILES if not (target / f).is_file()]
    if missing:
        raise RuntimeError(f"{source} has no {', '.join(missing)} under {OPS_SRC}")
    return target


def _prepared_sources() -> Path:
    """A copy of the fetched sources with EDITS applied (benchmarks/_original/build/src); files are rewritten
    only when their text changes, so that ninja does not rebuild an up-to-date library."""
    copy = BUILD / "src"
    for name in FILES:
        text = (SOURCE / name).read_text()
        for old, new in EDITS:
            text = text.replace(old, new)
        target = copy / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.is_file() or target.read_text() != text:
            target.write_text(text)
    return copy


_module = None
_reason = ""


def load():
    """The compiled original op (``ms_deform_attn_forward`` / ``ms_deform_attn_backward``), or None with
    ``unavailable_reason()`` saying why."""
    global _module, _reason
    if _module is not None or _reason:
        return _module
    if not all((SOURCE / f).is_file() for f in FILES):
        _reason = f"not fetched: run `python benchmarks/original_msda.py fetch` (expects {SOURCE})"
        return None
    if not torch.version.cuda:
        _reason = "torch is a CPU-only build"
        return None
    if not torch.cuda.is_available() and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        _reason = "no GPU visible: set TORCH_CUDA_ARCH_LIST (e.g. 9.0) to build it anyway"
        return None
    try:
        from torch.utils import cpp_extension

        from maskformers.ops import toolchain

        cuda_home, how = toolchain.find_cuda_home()  # torch's own guess follows an nvcc wrapper wrongly
        if cuda_home is None:
            _reason = f"no CUDA toolkit: {how}"
            return None
        cpp_extension.CUDA_HOME = str(cuda_home)
        src = _prepared_sources()
        _module = cpp_extension.load(
            name="deformable_detr_original_msda",
            sources=[str(src / "vision.cpp"), str(src / "cpu" / "ms_deform_attn_cpu.cpp"),
                     str(src / "cuda" / "ms_deform_attn_cuda.cu")],
            extra_include_paths=[str(src)],
            extra_cflags=["-O3", "-DWITH_CUDA"],
            extra_cuda_cflags=["-O3", "-DWITH_CUDA"],
            build_directory=str(BUILD),
            with_cuda=True,
            verbose=False,
        )
    except Exception as exc:  # the compiler's log is in the message
        _reason = f"building the original op failed: {str(exc)[-2000:]}"
    return _module


def unavailable_reason() -> str:
    """Why ``load()`` returned None ("" once it loaded)."""
    load()
    return _reason


class _OriginalFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, value, spatial_shapes, level_start_index, sampling_locations, attention_weights, step):
        ctx.step = step
        ctx.save_for_backward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
        return load().ms_deform_attn_forward(value, spatial_shapes, level_start_index, sampling_locations,
                                             attention_weights, step)

    @staticmethod
    def backward(ctx, grad_output):
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights = ctx.saved_tensors
        grad_value, grad_locations, grad_weights = load().ms_deform_attn_backward(
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
            grad_output.contiguous(), ctx.step)
        return grad_value, None, None, grad_locations, grad_weights, None


def original_ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                            im2col_step: int = 64):
    """The original op with autograd, on the GPU; same layouts as maskformers.ops.ms_deform_attn."""
    device = value.device
    step = min(im2col_step, value.shape[0])
    while value.shape[0] % step:
        step -= 1
    return _OriginalFunction.apply(value, spatial_shapes.to(device), level_start_index.to(device),
                                   sampling_locations, attention_weights, step)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    f = sub.add_parser("fetch", help="copy the original sources into benchmarks/_original/")
    f.add_argument("--from", dest="source", default=None, help=f"checkout, bare git dir or URL (default {REPO_URL})")
    sub.add_parser("build", help="compile the fetched sources (TORCH_CUDA_ARCH_LIST picks the architectures)")
    args = parser.parse_args(argv)
    if args.command == "fetch":
        print(f"fetched into {fetch(args.source)}")
        return 0
    if load() is None:
        print(f"original op unavailable: {unavailable_reason()}", file=sys.stderr)
        return 1
    print(f"original op built in {BUILD}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
