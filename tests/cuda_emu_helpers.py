"""Build CUDA sources of csrc/ for the cuda_on_cpu emulator and load them as Python modules.

The emulator (shared/tools/cuda_on_cpu, given by MASKFORMERS_CUDA_ON_CPU) runs unchanged kernels on the
CPU: its prepare_source.py rewrites only the launch syntax, its emu/ provides threads, warps and the warp
intrinsics. tests/cuda_emu_ext/ adds what the kernel variants use beyond the default kernels (block-shared
``__shared__`` variables, a portable ``nvcuda::wmma``); it is put in front of the emulator's shadows.
Compiling takes minutes, so the tests that use this run only when MASKFORMERS_CUDA_ON_CPU is set;
MASKFORMERS_CUDA_ON_CPU_SANITIZE=1 adds AddressSanitizer + UBSan (then run pytest with libasan preloaded,
as the emulator's run.sh does).
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest
import torch

from maskformers.ops import toolchain

REPO = Path(__file__).resolve().parent.parent
EXTENSIONS = Path(__file__).resolve().parent / "cuda_emu_ext"
EMULATOR = os.environ.get("MASKFORMERS_CUDA_ON_CPU", "")

requires_emulator = pytest.mark.skipif(
    not EMULATOR or not (Path(EMULATOR) / "prepare_source.py").is_file() or shutil.which("g++") is None,
    reason="set MASKFORMERS_CUDA_ON_CPU to the cuda_on_cpu emulator folder (and have g++) to run the CUDA kernels",
)

LANE_ORDERS = {"forward": 0, "reverse": 1, "random": 2}


@dataclass
class Emulated:
    """A compiled module and the emulator's controls (ctypes)."""

    module: ModuleType
    library: ctypes.CDLL

    def fault_count(self) -> int:
        return self.library.emu_fault_count()

    def schedule(self, *, workers: int = 2, blocks: str = "forward", lanes: str = "forward", seed: int = 1) -> None:
        """Order in which the emulator runs blocks and the threads of a block (a missing barrier or a
        race between threads shows up as a result that depends on it)."""
        self.library.emu_set_config(workers, LANE_ORDERS[blocks], LANE_ORDERS[lanes], seed)


def _run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, f"{' '.join(cmd[:3])} ... failed:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}"


def build_emulated(out: Path, name: str, source: str, bind: str, launches: int, arch: int = 900) -> Emulated:
    """Compile csrc/<source> (with exactly `launches` kernel launch sites) and csrc/<bind> for the emulator
    as the Python module `name` in folder `out`, emulating compute capability arch / 100."""
    from torch.utils import cpp_extension

    tool = Path(EMULATOR)
    cuda_home, how = toolchain.find_cuda_home()
    assert cuda_home is not None, f"the emulator needs the CUDA headers: {how}"
    release = toolchain.nvcc_version(cuda_home) or "12.4"
    major, minor = release.split(".")[:2]
    sanitize = ["-fsanitize=address,undefined,float-cast-overflow", "-fsanitize-recover=all"] if os.environ.get(
        "MASKFORMERS_CUDA_ON_CPU_SANITIZE") else []
    common = ["-std=c++20", "-fPIC", f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
              "-ffp-contract=off", "-O1" if sanitize else "-O2"]
    includes = [x for p in cpp_extension.include_paths() for x in ("-isystem", p)]
    includes += ["-isystem", sysconfig.get_paths()["include"]]
    emu = ["-I", str(EXTENSIONS / "shim"), "-I", str(EXTENSIONS), "-I", str(tool / "emu" / "shim"),
           "-I", str(tool / "emu"), "-isystem", str(cuda_home / "include")]
    defines = [f"-DEMU_CUDA_ARCH={arch}", f"-DEMU_CUDACC_VER_MAJOR={major}", f"-DEMU_CUDACC_VER_MINOR={minor}"]
    csrc = REPO / "csrc"
    prepared = out / f"{name}_kernels.cpp"
    _run([sys.executable, str(tool / "prepare_source.py"), str(csrc / source), str(prepared),
          "--expect", str(launches)])
    _run(["g++", *common, *defines, *sanitize, "-c", str(prepared), "-o", str(out / "kernels.o"), *emu, "-iquote",
          str(csrc), *includes])
    _run(["g++", *common, *defines, *sanitize, "-c", str(tool / "emu" / "cuda_emu.cpp"), "-o", str(out / "emu.o"),
          *emu])
    _run(["g++", *common, f"-DTORCH_EXTENSION_NAME={name}", "-DTORCH_API_INCLUDE_EXTENSION_H", "-c",
          str(csrc / bind), "-o", str(out / "bind.o"), *includes])
    libs = cpp_extension.library_paths()
    so = out / f"{name}.so"
    _run(["g++", "-shared", "-o", str(so), *(str(out / f) for f in ("kernels.o", "emu.o", "bind.o")),
          *(f"-L{d}" for d in libs), *(f"-Wl,-rpath,{d}" for d in libs), "-lc10", "-ltorch", "-ltorch_cpu",
          "-ltorch_python", "-pthread", *sanitize])
    spec = importlib.util.spec_from_file_location(name, so)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    library = ctypes.CDLL(str(so))
    library.emu_fault_count.restype = ctypes.c_longlong
    library.emu_set_config.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_ulonglong]
    return Emulated(module, library)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max |want| (NaN positions must agree; they are compared separately)."""
    got, want = got.double(), want.double()
    nan = want.isnan()
    assert torch.equal(got.isnan(), nan), "NaN in different places"
    got, want = got[~nan], want[~nan]
    if want.numel() == 0:
        return 0.0
    scale = want.abs().max().item()
    return (got - want).abs().max().item() / (scale if scale > 0 else 1.0)
